"""Settings of `ExponentialMovingAverage` that cannot change once averages exist.

A compiled train step reads Python attributes once, when it is traced: a
value set later would be ignored on TensorFlow and JAX and applied on torch,
and `get_config` would save a setting that never took effect. So these
settings can be changed freely until the averages exist (the optimizer is
built), and raise after that. The decay, which users do change during
training, lives in a variable instead (`ExponentialMovingAverage.average_decay`).
Their values live in the optimizer's `State`. The config, which saves them
all, is built here too.
"""

import keras

from keras_ema import _checks
from keras_ema import _schedule_base
from keras_ema import schedules


class FixedOnceBuilt:
    """A data descriptor over `optimizer._ema_state.<name>`:
    `check(value, state)` on every set, refused once built."""

    def __init__(self, check, why):
        self.check = check
        self.why = why

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, optimizer, owner=None):
        if optimizer is None:
            return self
        return getattr(optimizer._ema_state, self.name)

    def __set__(self, optimizer, value):
        state = optimizer._ema_state
        if state.built:
            raise ValueError(
                f"ExponentialMovingAverage does not support changing "
                f"`{self.name}` once its averages exist: {self.why} "
                f"Received: {self.name}={value!r}. Instead, create a new "
                f"`ExponentialMovingAverage(..., {self.name}=...)` and "
                "compile the model with it."
            )
        setattr(state, self.name, self.check(value, state))


_TRACED = "the compiled train step reads it once, when it is traced."
_CHOSEN = "the averages of the model's variables were chosen with it."


def _step_count(name, minimum):
    def check(value, state):
        return _checks.check_step_count(
            value, name, minimum, state.road.step_count_limit()
        )

    return check


def _bool(name):
    return lambda value, state: _checks.check_bool(value, name)


def _dtype(value, state):
    if value is None:
        return None
    return _checks.check_float_dtype(value, state.road)


class Settings:
    """The settings of `ExponentialMovingAverage` fixed once it is built."""

    trainable_weights_only = FixedOnceBuilt(
        _bool("trainable_weights_only"), _CHOSEN
    )
    start_step = FixedOnceBuilt(_step_count("start_step", 0), _TRACED)
    dynamic_decay = FixedOnceBuilt(_bool("dynamic_decay"), _TRACED)
    update_every = FixedOnceBuilt(_step_count("update_every", 1), _TRACED)
    average_dtype = FixedOnceBuilt(_dtype, "the averages were created with it.")
    exclude = FixedOnceBuilt(
        lambda value, state: _checks.compile_patterns(value), _CHOSEN
    )
    compensated = FixedOnceBuilt(
        _bool("compensated"), "the averages' buffers were created with it."
    )


def get_config(optimizer):
    """The config of an `ExponentialMovingAverage`: its own arguments, with
    the inner optimizer and a schedule serialized."""
    average_decay = optimizer.average_decay
    if not _schedule_base.is_real(average_decay):
        average_decay = schedules.serialize(average_decay)
    return {
        "name": optimizer.name,
        "optimizer": keras.saving.serialize_keras_object(
            optimizer.inner_optimizer
        ),
        "trainable_weights_only": optimizer.trainable_weights_only,
        "average_decay": average_decay,
        "start_step": optimizer.start_step,
        "dynamic_decay": optimizer.dynamic_decay,
        "update_every": optimizer.update_every,
        "average_dtype": optimizer.average_dtype,
        "exclude": [p.pattern for p in optimizer.exclude],
        "compensated": optimizer.compensated,
    }


def from_config(config, custom_objects=None):
    """The constructor's arguments from `get_config`'s dict (not mutated)."""
    config = dict(config)
    config["optimizer"] = keras.saving.deserialize_keras_object(
        config["optimizer"], custom_objects=custom_objects
    )
    if isinstance(config.get("average_decay"), dict):
        config["average_decay"] = schedules.deserialize(
            config["average_decay"], custom_objects=custom_objects
        )
    return config
