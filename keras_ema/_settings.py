"""Settings of `ExponentialMovingAverage` that cannot change once averages exist.

A compiled train step reads Python attributes once, when it is traced: a
value set later would be ignored on TensorFlow and JAX and applied on torch,
and `get_config` would save a setting that never took effect. So these
settings can be changed freely until the averages exist (the optimizer is
built), and raise after that. The decay, which users do change during
training, lives in a variable instead (`ExponentialMovingAverage.average_decay`).
"""

from keras_ema import _checks


class FixedOnceBuilt:
    """A data descriptor: `check(value)` on every set, refused once built."""

    def __init__(self, check, why):
        self.check = check
        self.why = why

    def __set_name__(self, owner, name):
        self.name = name
        self.slot = f"_setting_{name}"

    def __get__(self, optimizer, owner=None):
        if optimizer is None:
            return self
        try:
            return optimizer.__dict__[self.slot]
        except KeyError:
            raise AttributeError(self.name) from None

    def __set__(self, optimizer, value):
        if optimizer.__dict__.get("built", False):
            raise ValueError(
                f"ExponentialMovingAverage does not support changing "
                f"`{self.name}` once its averages exist: {self.why} "
                f"Received: {self.name}={value!r}. Instead, create a new "
                f"`ExponentialMovingAverage(..., {self.name}=...)` and "
                "compile the model with it."
            )
        # Stored past Keras' attribute tracking, which would wrap lists.
        optimizer.__dict__[self.slot] = self.check(value)


_TRACED = "the compiled train step reads it once, when it is traced."
_CHOSEN = "the averages of the model's variables were chosen with it."


def _step_count(name, minimum):
    return lambda value: _checks.check_step_count(value, name, minimum=minimum)


def _bool(name):
    return lambda value: _checks.check_bool(value, name)


class Settings:
    """The settings of `ExponentialMovingAverage` fixed once it is built."""

    trainable_weights_only = FixedOnceBuilt(
        _bool("trainable_weights_only"), _CHOSEN
    )
    start_step = FixedOnceBuilt(_step_count("start_step", 0), _TRACED)
    dynamic_decay = FixedOnceBuilt(_bool("dynamic_decay"), _TRACED)
    update_every = FixedOnceBuilt(_step_count("update_every", 1), _TRACED)
    average_dtype = FixedOnceBuilt(
        lambda v: None if v is None else _checks.check_float_dtype(v),
        "the averages were created with it.",
    )
    exclude = FixedOnceBuilt(_checks.compile_patterns, _CHOSEN)
