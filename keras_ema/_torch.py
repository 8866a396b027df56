"""The torch road of `ExponentialMovingAverage`.

On torch the optimizer runs eagerly, one Python call per operation, so a model
with thousands of small variables spends its EMA update in dispatch. Here the
averages of same-dtype weights move with torch's multi-tensor (`_foreach`)
kernels, per group of variables instead of per variable. On CPU, where
reading the factor costs nothing, a factor below one half moves each group
with one `lerp`: one pass, no temporary, and the rule's result with one
rounding (a fused multiply-add, as XLA computes it on JAX); else, on
accelerators (where the read would wait for the device) and under
torch.compile, the three kernels of `_update.move`, bit for bit.
"""

import torch

# Keras has no public way to ask whether a `StatelessScope` is active, where
# variables' values live in the scope instead of their tensors.
from keras.src.backend.common.stateless_scope import in_stateless_scope

from keras_ema import _road
from keras_ema import _update

# Elements per group: bounds the temporary `average - weight` of one group.
_GROUP_SIZE = 1 << 22


class TorchRoad(_road.Road):
    """The eager road, with the averages moved by multi-tensor kernels."""

    def for_each(self, state, entries, packs, fn, args, when, joins):
        # Reads one boolean from the device, and only when the user asked
        # for `update_every > 1`: the read saves k - 1 of every k updates.
        if when is not None and not bool(when):
            return
        if fn is _update.move and not in_stateless_scope():
            _move_all(state, entries, *args)
            return
        if fn is _update.move_compensated and not in_stateless_scope():
            _move_all_compensated(state, entries, *args)
            return
        super().for_each(state, entries, packs, fn, args, None, joins)


def _move_all(state, entries, factor):
    """`average -= factor * (average - weight)` for every entry.

    `state.torch_groups` keeps the grouping, made once: per step only the
    kernels run, on the variables' own tensors.
    """
    singles, groups = _plan(state, entries)
    for weight, average, backup in singles:
        _update.move(average, weight, backup, factor)
    # `a + f * (w - a)` is `a - f * (a - w)` exactly below one half; from
    # there on torch's `lerp` computes `w - (1 - f) * (w - a)`, which is not.
    # Read once a step; under torch.compile the read would break the graph.
    lerp = None
    if factor.device.type == "cpu" and not torch.compiler.is_compiling():
        lerp = float(factor)
        if lerp >= 0.5:
            lerp = None
    with torch.no_grad():
        for weights, averages, _ in groups:
            # `_value`: the tensor itself, which `assign` updates in place.
            averages = [a._value for a in averages]
            weights = [w._value for w in weights]
            if lerp is not None:
                torch._foreach_lerp_(averages, weights, lerp)
                continue
            deltas = torch._foreach_sub(averages, weights)
            torch._foreach_mul_(deltas, factor.to(averages[0].dtype))
            torch._foreach_sub_(averages, deltas)


def _move_all_compensated(state, entries, factor):
    """`_update.move_compensated` for every entry, with the same operations
    in the same order, as multi-tensor kernels (bit for bit)."""
    singles, groups = _plan(state, entries)
    for weight, average, compensation in singles:
        _update.move_compensated(average, weight, compensation, factor)
    with torch.no_grad():
        for weights, averages, compensations in groups:
            a = [v._value for v in averages]
            c = [v._value for v in compensations]
            dtype = a[0].dtype
            f = factor.to(dtype)
            moving = (f != 0).to(dtype)
            delta = torch._foreach_sub(a, [w._value for w in weights])
            torch._foreach_add_(delta, c)
            torch._foreach_mul_(delta, f)
            y = torch._foreach_mul(c, moving)
            torch._foreach_sub_(y, delta)
            new = torch._foreach_add(a, y)
            y_part = torch._foreach_sub(new, a)
            error = torch._foreach_sub(a, torch._foreach_sub(new, y_part))
            torch._foreach_sub_(y, y_part)
            torch._foreach_add_(error, y)
            torch._foreach_mul_(c, 1 - moving)
            torch._foreach_add_(c, error)
            torch._foreach_copy_(a, new)


def _plan(state, entries):
    """`_groups(entries)`, made once per list of entries and kept in
    `state.torch_groups`."""
    plan = state.torch_groups
    if plan is None or plan[0] is not entries or plan[1] != len(entries):
        plan = state.torch_groups = (entries, len(entries), _groups(entries))
    return plan[2]


def _groups(entries):
    """Entries whose average has another dtype than their weight (those
    with a backup), alone; the others as `(weights, averages, thirds)`
    groups of one dtype and device, and of bounded size (`thirds`: the
    entries' third variables, the compensation buffers of a compensated
    move)."""
    singles, by_kind = [], {}
    for entry in entries:
        weight, average, _ = entry
        if average.dtype != weight.dtype:
            singles.append(entry)
        else:
            key = (average.dtype, average._value.device)
            by_kind.setdefault(key, []).append(entry)
    groups = []
    for kind in by_kind.values():
        group, size = [], 0
        for entry in kind:
            numel = entry[1]._value.numel()
            if group and size + numel > _GROUP_SIZE:
                groups.append(tuple(map(list, zip(*group))))
                group, size = [], 0
            group.append(entry)
            size += numel
        groups.append(tuple(map(list, zip(*group))))
    return singles, groups
