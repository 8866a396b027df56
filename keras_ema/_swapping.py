"""Swapping the averages in and out, all or nothing.

`swap_weights` exchanges each weight with its average exactly (values are
moved, never computed) and, eagerly, with signals deferred (`_atomic.py`), so
that a Ctrl-C takes effect once the swap is complete. A JAX model variable
that a trainer left without a value is put back first (the road's `sync`);
one whose value is gone gets its raw weight back from the slot, and its
average restarts from it.
"""

import warnings

from keras import ops

from keras_ema import _atomic
from keras_ema import _binding
from keras_ema import _checks
from keras_ema import _slots
from keras_ema import _step
from keras_ema import _update

ASSIGN_SWAPPED = (
    "`assign_average_vars` does not support being called while the averages "
    "are swapped in: the model already holds them. Instead, call it after "
    "swapping back."
)

_LOST = (
    "keras-ema: a compiled JAX step failed while the averages were swapped "
    "in, and consumed their buffers (Keras donates the state to each step). "
    "The raw weights are back; the lost averages restart from them."
)


def swapped_in(state):
    """Whether the model holds the averages, read from the swap flag."""
    if not state.built:
        return False
    state.swapped_in = bool(ops.convert_to_numpy(state.swapped))
    return state.swapped_in


def swap_weights(state):
    """`optimizer.swap_weights()`, once it has averages."""
    if not state.road.executing_eagerly():
        swap(state)
        return
    with _atomic.deferred_signals():
        going_in = not swapped_in(state)
        lost = lost_weights(state, going_in)
        swap(state)
        # An eager `strategy.run` runs this once per replica: set, not flip.
        state.swapped_in = going_in
    if lost:
        warnings.warn(_LOST)


def swap(state):
    """The exchange itself; in a traced `tf.function`, one graph run."""
    swapped = ops.copy(state.swapped)
    _update.for_each(
        state, state.entries, _update.swap, swapped, state.road.is_lost
    )
    state.swapped.assign(ops.subtract(1, swapped))


def lost_weights(state, going_in):
    """Model variables that a JAX trainer left without a value."""
    is_lost = state.road.is_lost
    lost = [e[0] for e in state.entries if is_lost(e[0])]
    if lost:
        _binding.sync(state)
        lost = [v for v in lost if is_lost(v)]
    if lost and going_in:
        raise ValueError(
            "ExponentialMovingAverage cannot swap the averages in: "
            f"{_update.paths(lost)} hold no value (a JAX `fit`, `evaluate` "
            "or `predict` that raised left them cleared). Instead, call "
            "`model.jax_state_sync()` first."
        )
    return lost


def assign_average_vars(state, var_list):
    """`optimizer.assign_average_vars(var_list)`, once it has averages."""
    road = state.road
    var_list = _checks.check_variables(
        var_list, "assign_average_vars", road.is_variable
    )
    if road.executing_eagerly() and swapped_in(state):
        raise ValueError(ASSIGN_SWAPPED)
    chosen, missing = [], []
    for v in var_list:
        if state.var_key(v) in state.index:
            chosen.append(v)
        elif _slots.should_average(state, v) and (
            v.trainable or not state.trainable_weights_only
        ):
            missing.append(v)
    if missing:
        raise ValueError(
            "`assign_average_vars` got variables that should have an "
            f"average but have none: {_update.paths(missing)}. Instead, "
            "pass the variables of the model this optimizer trains, or create "
            "their averages with `shadow_copy(model)` "
            "(`trainable_weights_only=False` for non-trainable ones)."
        )
    entries = [state.entries[state.index[state.var_key(v)]] for v in chosen]
    _step.refuse_if_swapped_in([state], ASSIGN_SWAPPED)
    with road.refusing([state.swapped], ASSIGN_SWAPPED), \
            _atomic.deferred_signals():
        _update.for_each(state, entries, _update.assign)
