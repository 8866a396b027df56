"""The torch road of `ExponentialMovingAverage`.

On torch the optimizer runs eagerly, one Python call per operation, so a model
with thousands of small variables spends its EMA update in dispatch. Here the
averages of same-dtype weights move with torch's multi-tensor (`_foreach`)
kernels: three calls per group of variables instead of three per variable,
with the same arithmetic as `_averages.move`, bit for bit.
"""

import torch

# Elements per group: bounds the temporary `average - weight` of one group.
_GROUP_SIZE = 1 << 22


def due(when):
    """Whether an update with condition `when` (or `None`) has work to do.

    Reads one boolean from the device, and only when the user asked for
    `update_every > 1`: the read saves k - 1 of every k updates.
    """
    return when is None or bool(when)


def move_all(entries, factor, move):
    """`average -= factor * (average - weight)` for every entry."""
    groups = {}
    for weight, average, backup in entries:
        if backup is not None or average.dtype != weight.dtype:
            move(average, weight, backup, factor)
            continue
        groups.setdefault(str(average.dtype), []).append((weight, average))
    with torch.no_grad():
        for dtype, pairs in groups.items():
            for chunk in _chunks(pairs):
                averages = [a.value for _, a in chunk]
                deltas = torch._foreach_sub(averages, [w.value for w, _ in chunk])
                torch._foreach_mul_(deltas, factor.to(averages[0].dtype))
                torch._foreach_sub_(averages, deltas)


def _chunks(pairs):
    chunk, size = [], 0
    for weight, average in pairs:
        if chunk and size + average.value.numel() > _GROUP_SIZE:
            yield chunk
            chunk, size = [], 0
        chunk.append((weight, average))
        size += average.value.numel()
    if chunk:
        yield chunk
