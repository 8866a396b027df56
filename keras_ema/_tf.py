"""The TensorFlow road of `ExponentialMovingAverage`.

Under `tf.distribute` the averages must be created in the strategy's scope
and colocated with their weights, and updated per device through the
strategy, as Keras' own optimizers update their slots. A compiled
`tf.function` step runs long after it was traced, so its refusals are
in-graph checks of the swap flag; and per-variable op dispatch, not
arithmetic, dominates a model with thousands of small weights: one
in-place kernel per average, small averages packed (`_packing.py`).
"""

import contextlib
import functools
import json

import keras
import tensorflow as tf

from keras_ema import _layout
from keras_ema import _packing
from keras_ema import _road
from keras_ema import _step
from keras_ema import _update


class TensorFlowRoad(_road.Road):
    packs_averages = True

    def eager_scope(self):
        return tf.init_scope()

    def executing_eagerly(self):
        return tf.executing_eagerly()

    def initialized(self, variable):
        # A weight created by a model's first call inside a `tf.function`
        # has no value in the function's first trace: TensorFlow initializes
        # it afterwards and traces the function again.
        with tf.init_scope():
            return bool(_tf_variable(variable).is_initialized())

    def strategy_scope(self, state):
        # `shadow_copy` runs where the user calls it (after `compile()`), or
        # in a callback's `on_train_begin`: outside the scope, where TF
        # would create plain, unmirrored variables or refuse to colocate.
        if tf.distribute.has_strategy():
            return contextlib.nullcontext()
        return state.strategy.scope()

    def colocate_with(self, state, variable):
        return state.strategy.extended.colocate_vars_with(
            _tf_variable(variable)
        )

    def checkpoint_layout(self, state):
        return CheckpointLayout(state)

    def graph_key(self):
        return id(tf.compat.v1.get_default_graph())

    def is_variable(self, value):
        return isinstance(value, (keras.Variable, tf.Variable))

    # -- refusing while the averages are swapped in ---------------------------

    def gate(self, flags, message, values, never=None):
        """In a traced step: `values`, released only once `flags` are
        checked 0.

        A compiled step is traced once but may run after any later swap.
        Gating what the optimizer consumes, rather than making every op of
        its update wait on the check, keeps the step's order: each weight
        still updates as soon as its gradient is ready. Given a message
        `never`, the traced step fails with it if it ever runs (a first
        trace, which TensorFlow discards once it has initialized the
        variables created in it). Eagerly, `values`.

        In a replica context, a value that every replica passes as the same
        object (a gradient captured from outside `strategy.run`) is gated
        once, across replicas, and stays one object: the inner optimizer's
        all-reduce takes such a value once, as it takes it ungated. Gated by
        each replica, it would be one value per replica, and summed.
        """
        if tf.executing_eagerly():
            return values
        values = list(values)
        if not tf.distribute.has_strategy() or (
            tf.distribute.in_cross_replica_context()
        ):
            return _gate(flags, message, values, never)

        def gate_shared(strategy, values):
            # Here a value that differs across replicas is a `PerReplica`.
            # The all-reduce sends a shared one from its device: it keeps it.
            shared = [None] * len(values)
            devices = {}
            for i, value in enumerate(values):
                if isinstance(value, (tf.Tensor, tf.IndexedSlices)):
                    devices.setdefault(value.device, []).append(i)
            for device, indices in devices.items():
                with tf.device(device):
                    gated = _gate(
                        flags, message, [values[i] for i in indices], never
                    )
                for i, value in zip(indices, gated):
                    shared[i] = value
            return shared

        shared = tf.__internal__.distribute.interim.maybe_merge_call(
            gate_shared, tf.distribute.get_strategy(), values
        )
        local = [v if s is None else None for v, s in zip(values, shared)]
        local = _gate(flags, message, local, never)
        return [v if s is None else s for v, s in zip(local, shared)]

    def refusing(self, flags, message):
        if tf.executing_eagerly():
            return contextlib.nullcontext()
        return tf.control_dependencies([_assert_zero(flags, message)])

    def run_guarded(self, model, states, original, args):
        if tf.executing_eagerly():
            return super().run_guarded(model, states, original, args)
        # Traced: the step's input waits for the check, so the forward pass
        # (and the BatchNorm statistics it moves) runs only once the swap
        # flags are checked 0. Gating the input, not the whole step, keeps
        # the variables that the step creates liftable out of an XLA step
        # (a LossScaleOptimizer built in the first trace).
        flags = [state.swapped for state in states if state.built]
        if not flags:
            # Built in this very trace (a lazily built model): not swapped.
            return original(*args)
        # The step runs only with the averages out: a teacher in it needs
        # no choice at run time.
        for state in states:
            state.step_swapped = False
        try:
            return original(*self.gate(flags, _step.SWAPPED_IN, args))
        finally:
            for state in states:
                state.step_swapped = None

    # -- the averages' updates ------------------------------------------------

    def for_each(self, state, entries, packs, fn, args, when, joins):
        if fn is _update.move:
            fn = _move
        value = _update_value

        def update_all(distribution, *args):
            for weight, average, backup in entries:
                distribution.extended.update(
                    value(average),
                    fn,
                    args=(value(weight), value(backup), *args),
                    group=False,
                )
            for pack, chosen in packs:
                distribution.extended.update(
                    pack.buffer.value,
                    functools.partial(
                        _update.run_packed, fn, pack, chosen, joins
                    ),
                    args=([value(w) for w in pack.weights],
                          value(pack.compensation), *args),
                    group=False,
                )

        def update(distribution, *args):
            if when is None:
                update_all(distribution, *args)
                return
            # In cross-replica context, like LossScaleOptimizer's
            # conditional; every replica computed the same `when`.
            flag = distribution.experimental_local_results(when)[0]
            tf.cond(flag, lambda: update_all(distribution, *args),
                    lambda: None)

        if tf.distribute.in_cross_replica_context():
            update(state.strategy, *args)
        else:
            tf.__internal__.distribute.interim.maybe_merge_call(
                update, state.strategy, *args
            )


def _move(average, weight, backup, factor):
    """`_update.move` as one in-place kernel instead of a multiply and an
    assignment: with thousands of small variables the step costs per op."""
    delta = average - tf.cast(weight, average.dtype)
    tf.raw_ops.ResourceApplyGradientDescent(
        var=average.handle, alpha=tf.cast(factor, average.dtype), delta=delta
    )


def _update_value(variable):
    """The `tf.Variable` behind a `keras.Variable` (per device under a
    strategy, as `extended.update` passes it); anything else as it is."""
    if isinstance(variable, keras.Variable):
        return variable.value
    return variable


def _tf_variable(variable):
    return variable.value if isinstance(variable, keras.Variable) else variable


# Tensors of at most this many elements pass the gate in bunches of at most
# `_packing.PACK_LIMIT` elements, one `IdentityN` per bunch (one graph op
# costs as much as moving 10k floats); the others one by one.
_SMALL = _packing.WEIGHT_LIMIT


def _gate(flags, message, values, never):
    # `IndexedSlices` gradients pass as their component tensors.
    flat = list(tf.nest.flatten(values, expand_composites=True))
    if not any(map(_gateable, flat)):
        return values
    check = _assert_zero(flags, message)
    if never is not None:
        with tf.control_dependencies([check]):
            check = tf.debugging.Assert(False, [never])
    bunches, size = [[]], 0
    for i, tensor in enumerate(flat):
        if not _gateable(tensor):
            continue
        count = tensor.shape.num_elements()
        if count is None or count > _SMALL:
            bunches.append([i])
            continue
        if size + count > _packing.PACK_LIMIT:
            bunches.append([])
            size = 0
        bunches[-1].append(i)
        size += count
    for indices in bunches:
        if not indices:
            continue
        with tf.control_dependencies([check]):
            gated = tf.identity_n([flat[i] for i in indices])
        for i, tensor in zip(indices, gated):
            flat[i] = tensor
    return tf.nest.pack_sequence_as(values, flat, expand_composites=True)


def _gateable(value):
    """A tensor or a variable (a step's input may hold Python values too)."""
    return tf.is_tensor(value) or isinstance(value, (tf.Variable, keras.Variable))


def _assert_zero(flags, message):
    value = tf.add_n([_tf_variable(f) for f in flags])
    return tf.debugging.assert_equal(
        value, tf.zeros_like(value), message=message
    )


class CheckpointLayout(tf.train.experimental.PythonState):
    """The layout of the averages in a `tf.train.Checkpoint`.

    A checkpoint finds each optimizer variable by its place in the variable
    list, whichever variable's average it holds; this entry says which, as
    the layout of a Keras file does (`_layout.py`). TensorFlow restores
    Python state before any variable, so a layout that is not this
    optimizer's is refused before the checkpoint writes a value.
    """

    def __init__(self, state):
        self._state = state

    def serialize(self):
        return json.dumps(_layout.layout_of(self._state))

    def deserialize(self, string_value):
        if hasattr(string_value, "numpy"):
            string_value = string_value.numpy()
        _layout.hold_checkpoint_layout(self._state, json.loads(string_value))
