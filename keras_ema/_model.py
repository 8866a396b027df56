"""The model whose weights an `ExponentialMovingAverage` averages.

Keras gives an optimizer no handle on its model: `compile` only stores the
optimizer on the model, and the trainers hand the optimizer variables or
their values. The optimizer learns its model from `shadow_copy(model)`, or,
when a trainer builds it (`fit` on JAX and torch, and on TensorFlow under a
distribution strategy), from the trainer's frame: the only place that knows
the model then. Knowing it, the optimizer

- refuses a second model before anything moves (on JAX the trainer passes
  values only, so the caller of the compiled step is checked);
- guards the model's train step, so that a step refused because the
  averages are swapped in changes nothing, not even the BatchNorm statistics
  that the forward pass moves before the optimizer is called;
- puts a JAX model's variables back (`jax_state_sync`) before a swap, after
  an `evaluate` or `predict` that raised left them cleared.

The model is held by a weak reference: the optimizer does not keep it alive.
"""

import sys
import warnings
import weakref

import keras

from keras_ema import _averages
from keras_ema import _tf

_SEARCH_DEPTH = 8


def calling_model(skip=1):
    """The `keras.Model` whose method called the caller, if any."""
    frame = sys._getframe(skip + 1)
    for _ in range(_SEARCH_DEPTH):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, keras.Model):
            return candidate
        frame = frame.f_back
    return None


def owns(model, variables):
    """Whether `variables` are exactly `model`'s trainable variables."""
    return [id(v) for v in model.trainable_variables] == [
        id(v) for v in variables
    ]


def get(averaged):
    """The registered model of an `_averages.Averaged` holder, or None."""
    ref = averaged.model
    return None if ref is None else ref()


def register(averaged, model):
    averaged.model = weakref.ref(model)


def other_model_error(optimizer, model, known):
    return ValueError(
        f"ExponentialMovingAverage does not support training a second "
        f"model: {optimizer.name!r} averages the weights of "
        f"{known.name!r} and cannot average those of {model.name!r} too. "
        "Instead, compile each model with its own optimizer, e.g. "
        "`keras_ema.ExponentialMovingAverage.from_config(opt.get_config())`."
    )


def sync(averaged):
    """Puts a JAX model's cleared variables back from its trainer state."""
    model = get(averaged)
    if model is not None and keras.backend.backend() == "jax":
        model.jax_state_sync()


def install_guard(model, optimizer):
    """Wraps `model.train_step` so that a refused step changes nothing.

    Keras has no hook that runs before a train step's forward pass, where the
    BatchNorm statistics move; wrapping the instance's `train_step` (as
    Keras' own `jax_state_sync` users do with callbacks) is the one place.
    """
    # Each `ExponentialMovingAverage` of a chain (`PostHocEMA`) adds its own.
    step = vars(model).get("train_step")
    while step is not None:
        if getattr(step, "_keras_ema", None) is optimizer:
            return
        step = getattr(step, "_keras_ema_wrapped", None)
    backend = keras.backend.backend()
    original = model.train_step
    if backend == "jax":
        from keras_ema import _jax

        train_step = _jax.guarded_train_step(model, optimizer, original)
    else:

        def train_step(data):
            with optimizer._not_swapped_in():
                return original(data)

    train_step._keras_ema = optimizer
    train_step._keras_ema_wrapped = vars(model).get("train_step")
    model.train_step = train_step
    if getattr(model, "train_function", None) is not None:
        # `make_train_function` bound the old `train_step`; rebuild it
        # rather than drop it, as `fit` builds it before `on_train_begin`.
        model.make_train_function(force=True)


def register_with(optimizer, model):
    """Makes `model` the optimizer's model, or raises if it has another."""
    known = get(optimizer._averaged)
    if known is model:
        return
    if known is not None or (
        optimizer.built and not owns(model, optimizer._trainable_variables)
    ):
        raise other_model_error(optimizer, model, known or model)
    register(optimizer._averaged, model)
    if _tf.executing_eagerly():
        install_guard(model, optimizer)


def chain(optimizer):
    """`optimizer` and the `ExponentialMovingAverage`s it wraps, outermost
    first (`PostHocEMA` keeps one per profile)."""
    from keras_ema.optimizer import ExponentialMovingAverage

    found = []
    while optimizer is not None:
        if isinstance(optimizer, ExponentialMovingAverage):
            found.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return found


def check_known(optimizer, variables):
    """Raises, naming them, if `variables` are not the ones it was built for."""
    unknown = [
        v for v in variables
        if optimizer._var_key(v) not in optimizer._trainable_variables_indices
    ]
    if unknown:
        model = get(optimizer._averaged)
        raise ValueError(
            "ExponentialMovingAverage does not support training "
            f"variables it was not built with: {_averages.paths(unknown)}"
            + (f" (it averages the weights of {model.name!r})"
               if model is not None else "")
            + ". Instead, compile each model with its own optimizer, "
            "e.g. `keras_ema.ExponentialMovingAverage.from_config("
            "opt.get_config())`."
        )


def foreign_step(optimizer, optimizer_variables, trainable_variables):
    """On JAX, the unchanged state for a step of another model's `fit`.

    Raising there would lose the state the trainer took out of the
    variables; the step changes nothing and `fit` raises at its end
    (`check_no_foreign`). None for a step of the optimizer's own model.
    """
    model, known = calling_model(skip=2), get(optimizer._averaged)
    if model is None or known is None or model is known:
        return None
    optimizer._averaged.foreign = model
    warnings.warn(str(other_model_error(optimizer, model, known)))
    from keras_ema import _jax

    return (
        [_jax._read(v) for v in trainable_variables],
        [_jax._read(v) for v in optimizer_variables],
    )


def check_no_foreign(optimizer):
    """Raises at the end of a JAX `fit` of another model (`foreign_step`)."""
    foreign, optimizer._averaged.foreign = optimizer._averaged.foreign, None
    if foreign is not None:
        raise other_model_error(optimizer, foreign, get(optimizer._averaged))


def find_in_model(model, user):
    """The model's `ExponentialMovingAverage`, also when it is wrapped.

    Under mixed_float16, `compile()` wraps it in a `LossScaleOptimizer`;
    `user` names the caller in the error raised when there is none.
    """
    from keras_ema.optimizer import ExponentialMovingAverage

    optimizer = getattr(model, "optimizer", None)
    found = optimizer
    while found is not None and not isinstance(found, ExponentialMovingAverage):
        found = getattr(found, "inner_optimizer", None)
    if found is None:
        raise ValueError(
            f"{user} does not support a model whose optimizer keeps no "
            f"averages. Received: optimizer={optimizer!r}. Instead, compile "
            "the model with `keras_ema.ExponentialMovingAverage(optimizer)`."
        )
    return found
