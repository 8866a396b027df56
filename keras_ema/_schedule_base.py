"""The protocol of decay schedules and the checks of their arguments.

`schedules.py` holds the schedules and the rules that apply them; the
schedules whose average grows with training are in `growing_schedules.py`.
Both build on `DecaySchedule` here.
"""

import math
import numbers

import keras
from keras import ops


def is_real(value):
    # `bool` is a `numbers.Real`, but `decay=True` is a bug, not a decay.
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def invalid(owner, name, value, expected, example):
    return ValueError(
        f"`{owner}` requires `{name}` to be {expected}. Received: "
        f"{name}={value!r}. Instead, pass e.g. {name}={example}."
    )


def check_decay(owner, name, value):
    # NaN fails the comparison, so it is rejected too.
    if not (is_real(value) and 0.0 <= value <= 1.0):
        raise invalid(owner, name, value, "a real number in [0, 1]", "0.999")
    return float(value)


def check_positive(owner, name, value, example):
    if not (is_real(value) and 0.0 < value < math.inf):
        raise invalid(owner, name, value, "a finite real number > 0", example)
    return float(value)


def wide_float():
    """The widest float dtype the backend computes in: float64, except on
    JAX without `jax_enable_x64` (which would silently compute float32).

    Decays near 1 are computed in it, then rounded once to float32: a
    float32 step count holds integers only up to 2**24, and each float32
    operation on the way costs digits of `1 - decay`.
    """
    if keras.backend.backend() == "jax":
        import jax

        return "float64" if jax.config.jax_enable_x64 else "float32"
    return "float64"


def wide(value):
    """`value` (a number, a step count or a variable's value) as a tensor
    of `wide_float()`. A Python number directly: `ops.cast` of one goes
    through float32 on TensorFlow."""
    if is_real(value):
        return ops.convert_to_tensor(value, dtype=wide_float())
    return ops.cast(value, wide_float())


def wide_minimum(a, b):
    """`min(a, b)` in `wide_float()`. Not `ops.minimum`, which on torch
    computes two float64 tensors in float32."""
    a, b = wide(a), wide(b)
    return ops.where(ops.less(b, a), b, a)


def wide_maximum(a, b):
    """`max(a, b)` in `wide_float()` (see `wide_minimum`)."""
    a, b = wide(a), wide(b)
    return ops.where(ops.greater(b, a), b, a)


def wide_complement(value):
    """`1 - value` in `wide_float()`; of a Python number, in float64 first
    (exact), so that a decay near 1 keeps its digits on JAX without x64."""
    if is_real(value):
        return wide(1.0 - value)
    return 1.0 - wide(value)


class DecaySchedule:
    """Base class of decay schedules: `schedule(step) -> decay`.

    `step` is `n`, the number of EMA updates after `start_step` before this
    one: a Python int or an integer tensor. Subclasses implement `__call__`,
    returning a float32 scalar tensor computed with `keras.ops` only (no
    Python branching on `step`, so the decay changes inside a compiled train
    step without retracing), and `get_config`, returning every constructor
    argument. Register them so that saved models load again.

    `parameters` names the number attributes that `__call__` reads. A
    schedule that lists them can be replaced during training by another of
    its class (`optimizer.average_decay = Warmup(0.9999)`): the compiled step
    reads them from variables, so the change takes effect without retracing.

    Example:

    ```python
    @keras.saving.register_keras_serializable(package="my_package")
    class LinearRamp(keras_ema.schedules.DecaySchedule):
        # Ramps the decay linearly from 0 to `max_decay` in `steps` updates.
        def __init__(self, max_decay, steps):
            self.max_decay = max_decay
            self.steps = steps

        def __call__(self, step):
            n = keras.ops.cast(step, "float32")
            return keras.ops.minimum(n / self.steps, self.max_decay)

        def get_config(self):
            return {"max_decay": self.max_decay, "steps": self.steps}
    ```
    """

    parameters = ()
    # Whether `step` counts averaging updates (k = 0, 1, ... for the
    # averages moved every `update_every` real updates) rather than real
    # updates; see `complement`.
    counts_averages = False

    def __call__(self, step):
        raise NotImplementedError(
            f"`{type(self).__name__}` must implement `__call__(self, step)`: "
            "return the decay for EMA update `step` as a float32 scalar "
            "tensor computed with `keras.ops`."
        )

    def get_config(self):
        raise NotImplementedError(
            f"`{type(self).__name__}` must implement `get_config(self)`: "
            "return a dict of its constructor arguments so it can be saved."
        )

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def complement(self, step):
        """`1 - self(step)`, the fraction of the way an update moves the
        average. The schedules of keras-ema compute it directly, without
        subtracting a decay near 1 from 1 (which keeps few digits of it),
        in `wide_float()`; this default subtracts."""
        return 1.0 - ops.cast(self(step), "float32")

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


def computes_complement(schedule):
    """Whether `schedule` computes its own `1 - decay` (in `wide_float()`):
    not where `complement` is the base class's, nor where a subclass
    redefined `__call__` below the class that defines `complement`
    (`class Shifted(Warmup): def __call__(...)`), whose own rule must hold.
    Those compute `1 - schedule(step)` in float32, as `__call__` does."""
    mro = type(schedule).__mro__

    def owner(name):
        return next(k for k in mro if name in k.__dict__)

    defines = owner("complement")
    return defines is not DecaySchedule and (
        mro.index(defines) <= mro.index(owner("__call__"))
    )


def own_complement(schedule, step):
    """`1 - schedule(step)` by the schedule's own rule (see
    `computes_complement`)."""
    if computes_complement(schedule):
        return schedule.complement(step)
    return DecaySchedule.complement(schedule, step)
