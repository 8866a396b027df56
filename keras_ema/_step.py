"""One training step of `ExponentialMovingAverage`, as `apply` runs it.

The inner optimizer's step, then the averages, in that order and all or
nothing: the step refuses before anything moves while averages are swapped
in (a Python check eagerly, an in-graph gate in a traced step), and the
averages move only after a real update of the inner optimizer. An optimizer
that wraps others of its kind (the profiles of `PostHocEMA`) runs the whole
chain in one step: one gate, one step of the optimizer at the bottom, one
real-update check, then every profile's averages. JAX's trainer calls
`stateless_apply` instead (`_jax.py`).
"""

from keras import ops

from keras_ema import _layout
from keras_ema import _packing
from keras_ema import _slots
from keras_ema import _update

SWAPPED_IN = (
    "ExponentialMovingAverage cannot train while the averages are swapped "
    "into the model (after `swap_weights()`, or loaded from a checkpoint "
    "saved that way). Instead, call `optimizer.swap_weights()` to put the "
    "training weights back."
)

UNINITIALIZED = (
    "ExponentialMovingAverage could not create the averages of weights that "
    "are created inside this `tf.function`: TensorFlow ran the function "
    "before it initialized them. Instead, build the model before its first "
    "step (`model.build(input_shape)`, or start it with `keras.Input`)."
)


NO_MODEL = (
    "ExponentialMovingAverage(trainable_weights_only=False) averages the "
    "model's non-trainable variables too, but was not told its model. "
    "Instead, call `optimizer.shadow_copy(model)` after `compile()`, or pass "
    "a keras-ema callback (e.g. `keras_ema.SwapAverageWeights()`) to `fit`."
)


def refuse_unknown(state, variables):
    """Raises, naming them, if `variables` are not the ones the optimizer
    of `state` was built with."""
    known = {state.var_key(v) for v in state.built_for}
    unknown = [v for v in variables if state.var_key(v) not in known]
    if unknown and state.built_by_teacher is not None:
        raise ValueError(
            "ExponentialMovingAverage does not support training variables "
            f"it was not built with: {_update.describe(unknown)}. Its "
            "averages were created by the first `call_with_averages("
            f"{state.built_by_teacher})`, for that model's weights only. "
            "Instead, for a teacher made of several models, create the "
            "averages of every variable it trains before the first teacher "
            "call: `optimizer.build(encoder.trainable_variables + "
            "head.trainable_variables)` (in the order the steps pass them)."
        )
    if unknown:
        model = state.bound_model()
        raise ValueError(
            "ExponentialMovingAverage does not support training variables "
            f"it was not built with: {_update.describe(unknown)}"
            + (f" (it averages the weights of {model.name!r})"
               if model is not None else "")
            + ". Instead, compile each model with its own optimizer, e.g. "
            "`keras_ema.ExponentialMovingAverage.from_config("
            "opt.get_config())`, or call `optimizer.shadow_copy(model)` "
            "with the model you train before its first step."
        )


def prepare(state):
    """Starts the averages whose weights have a value now, then loads the
    values a file gave before the optimizer was built."""
    _slots.start_waiting(state)
    if state.built:
        _layout.restore_deferred(state)


def refuse_if_swapped_in(states, message=SWAPPED_IN):
    """Raises, eagerly, while an average of `states` is swapped in."""
    if any(state.swapped_in for state in states):
        raise ValueError(message)


def apply(road, states, base, grads, trainable_variables):
    """`optimizer.apply(grads, trainable_variables)`, once it is built."""
    for state in states:
        prepare(state)
        _layout.check_no_pending(state, "train")
    refuse_if_swapped_in(states)
    for state in states:
        if not state.trainable_weights_only and state.bound_model() is None:
            raise ValueError(NO_MODEL)
        state.trained = True
    # A compiled step refuses too, before anything moves: everything
    # that moves waits for the gradients or, as the inner optimizer's
    # `iterations` increment does, for this read of `iterations`.
    before, *grads = road.gate(
        [state.swapped for state in states],
        SWAPPED_IN,
        [base.iterations, *grads],
        never=UNINITIALIZED if any(s.todo for s in states) else None,
    )
    # Did the inner optimizer really update? One rule covers gradient
    # accumulation (its `iterations` counts real updates only) and an
    # inner LossScaleOptimizer that skips a non-finite step.
    before = ops.copy(before)
    try:
        base.apply(grads, trainable_variables)
    except ValueError:
        # Keras' own check refused unknown variables before anything
        # moved; ours names them and the model. Only here: it costs a
        # lookup per variable, every step on torch.
        if trainable_variables is not None:
            refuse_unknown(states[0], trainable_variables)
        raise
    moved = ops.not_equal(base.iterations, before)
    joins = _packing.Joins(road.graph_key)
    for state in states:
        _update.update_averages(state, moved, joins=joins)

