"""Swapping the averages in and out, all or nothing.

`swap_weights` exchanges each weight with its average exactly (values are
moved, never computed) and, eagerly, with signals deferred (`_atomic.py`), so
that a Ctrl-C takes effect once the swap is complete. A JAX model variable
that a trainer left without a value is put back first (`_model.sync`); one
whose value is gone gets its raw weight back from the slot, and its average
restarts from it.
"""

import warnings

from keras import ops

from keras_ema import _atomic
from keras_ema import _averages
from keras_ema import _checks
from keras_ema import _creating
from keras_ema import _model
from keras_ema import _tf

_ASSIGN_SWAPPED = (
    "`assign_average_vars` does not support being called while the averages "
    "are swapped in: the model already holds them. Instead, call it after "
    "swapping back."
)


_LOST = (
    "keras-ema: a compiled JAX step failed while the averages were swapped "
    "in, and consumed their buffers (Keras donates the state to each step). "
    "The raw weights are back; the lost averages restart from them."
)


def swap_weights(optimizer):
    """`optimizer.swap_weights()`, once it has averages."""
    if not _tf.executing_eagerly():
        swap(optimizer)
        return
    model = _model.get(optimizer._averaged)
    if model is not None:
        # A refused step must find the guard (installed once).
        _model.install_guard(model, optimizer)
    with _atomic.deferred_signals():
        going_in = not optimizer.averages_swapped_in
        lost = lost_weights(optimizer, going_in)
        swap(optimizer)
        # An eager `strategy.run` runs this once per replica: set, not flip.
        optimizer._swapped_in = going_in
    if lost:
        warnings.warn(_LOST)


def swap(optimizer):
    """The exchange itself; in a traced `tf.function`, one graph run."""
    swapped = ops.copy(optimizer._swapped)
    _averages.for_each(
        optimizer, optimizer._averaged.entries, _averages.swap, swapped
    )
    optimizer._swapped.assign(ops.subtract(1, swapped))


def lost_weights(optimizer, going_in):
    """Model variables that a JAX trainer left without a value."""
    entries = optimizer._averaged.entries
    lost = [e[0] for e in entries if _averages.is_lost(e[0])]
    if lost:
        _model.sync(optimizer._averaged)
        lost = [v for v in lost if _averages.is_lost(v)]
    if lost and going_in:
        raise ValueError(
            "ExponentialMovingAverage cannot swap the averages in: "
            f"{_averages.paths(lost)} hold no value (a JAX `fit`, `evaluate` "
            "or `predict` that raised left them cleared). Instead, call "
            "`model.jax_state_sync()` first."
        )
    return lost


def assign_average_vars(optimizer, var_list):
    """`optimizer.assign_average_vars(var_list)`, once it has averages."""
    var_list = _checks.check_variables(var_list, "assign_average_vars")
    if _tf.executing_eagerly() and optimizer.averages_swapped_in:
        raise ValueError(_ASSIGN_SWAPPED)
    index = optimizer._averaged.index
    chosen, missing = [], []
    for v in var_list:
        if optimizer._var_key(v) in index:
            chosen.append(v)
        elif _creating.should_average(optimizer, v) and (
            v.trainable or not optimizer.trainable_weights_only
        ):
            missing.append(v)
    if missing:
        raise ValueError(
            "`assign_average_vars` got variables that should have an "
            f"average but have none: {_averages.paths(missing)}. Instead, "
            "pass the variables of the model this optimizer trains, or create "
            "their averages with `shadow_copy(model)` "
            "(`trainable_weights_only=False` for non-trainable ones)."
        )
    entries = [
        optimizer._averaged.entries[index[optimizer._var_key(v)]]
        for v in chosen
    ]
    with optimizer._not_swapped_in(_ASSIGN_SWAPPED), \
            _atomic.deferred_signals():
        _averages.for_each(optimizer, entries, _averages.assign)
