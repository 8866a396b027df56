"""One training step of `ExponentialMovingAverage` on TensorFlow and torch.

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

from keras_ema import _averages
from keras_ema import _creating
from keras_ema import _model
from keras_ema import _packing
from keras_ema import _saving
from keras_ema import _tf

SWAPPED_IN = (
    "ExponentialMovingAverage cannot train while the averages are swapped "
    "into the model (after `swap_weights()`, or loaded from a checkpoint "
    "saved that way). Instead, call `optimizer.swap_weights()` to put the "
    "training weights back."
)


def apply(optimizer, grads, trainable_variables):
    """`optimizer.apply(grads, trainable_variables)`, once it is built."""
    # This optimizer moves the averages of the ones it wraps too (the
    # profiles of `PostHocEMA`): one gate and one real-update check.
    chain = _model.chain(optimizer)
    for averaging in chain:
        _creating.start_averages(averaging)
        _saving.check_no_pending(averaging, "train")
        if averaging._swapped_in:
            raise ValueError(SWAPPED_IN)
        averaging._trained = True
    base = chain[-1].inner_optimizer
    # A compiled step refuses too, before anything moves: everything
    # that moves waits for the gradients or, as the inner optimizer's
    # `iterations` increment does, for this read of `iterations`.
    before, *grads = _tf.gate(
        [averaging._swapped for averaging in chain],
        SWAPPED_IN,
        [base.iterations, *grads],
        small=_packing.WEIGHT_LIMIT,
        bunch=_packing.PACK_LIMIT,
        never=_tf.UNINITIALIZED
        if any(a._averaged.todo for a in chain) else None,
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
            _model.check_known(optimizer, trainable_variables)
        raise
    moved = ops.not_equal(base.iterations, before)
    with _packing.sharing_joins():
        for averaging in chain:
            _averages.update_averages(averaging, moved)
