"""Decay schedules: the decay of each EMA update, as a function of `n`.

A schedule is a small serializable object, `schedule(n) -> decay`, where `n`
counts EMA updates after `start_step` (`n = 0` for the first one); it returns
a float32 scalar tensor computed with `keras.ops`, so one compiled train step
serves every `n`. `Constant(decay)` is `decay`; `Dynamic(max_decay)` is
`min(max_decay, (1 + n) / (10 + n))`; `Warmup(max_decay, inv_gamma, power,
min_decay)` is `clip(1 - (1 + n / inv_gamma) ** -power, min_decay, max_decay)`;
`HalfLife(half_life)` is `0.5 ** (1 / half_life)`. In `growing_schedules.py`:
`Cosine(initial_decay, final_decay, steps)`, BYOL's teacher schedule, and
`Uniform()` and `Power(sigma_rel)`, which count averaging updates instead
(see `complement`): the equal-weight mean of stochastic weight averaging, and
EDM2's power-function EMA. In `bema.py`: `BEMA()`, the bias-corrected EMA,
whose averages also keep their EMA and the weights averaging started from.
"""

import copy
import math

import keras
from keras import ops

from keras_ema._schedule_base import DecaySchedule
from keras_ema._schedule_base import check_decay as _check_decay
from keras_ema._schedule_base import check_positive as _check_positive
from keras_ema._schedule_base import is_real as _is_real
from keras_ema._schedule_base import own_complement
from keras_ema._schedule_base import wide as _wide
from keras_ema._schedule_base import wide_complement as _wide_complement
from keras_ema._schedule_base import wide_maximum
from keras_ema.bema import BEMA
from keras_ema.growing_schedules import Cosine
from keras_ema.growing_schedules import Power
from keras_ema.growing_schedules import Uniform
from keras_ema.growing_schedules import gamma_to_sigma_rel
from keras_ema.growing_schedules import sigma_rel_to_gamma

__all__ = [
    "BEMA", "Constant", "Cosine", "DecaySchedule", "Dynamic", "HalfLife", "Power",
    "Uniform", "Warmup", "complement", "deserialize", "gamma_to_sigma_rel",
    "get", "number_complement", "number_rule", "parameters", "serialize",
    "sigma_rel_to_gamma", "with_values",
]


@keras.saving.register_keras_serializable(package="keras_ema")
class Constant(DecaySchedule):
    """The same decay for every EMA update.

    `decay_n = decay`: each update moves the average `1 - decay` of the way
    to the weights, so it mostly reflects the last `1 / (1 - decay)` updates.

    Args:
        decay: float in [0, 1]. 0 keeps the average equal to the weights,
            1 freezes it.

    Example:

    ```python
    optimizer = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.1),
        average_decay=keras_ema.schedules.Constant(0.999))
    ```
    """

    parameters = ("decay",)

    def __init__(self, decay):
        self.decay = _check_decay(type(self).__name__, "decay", decay)

    def __call__(self, step):
        return number_rule(step, self.decay, dynamic=False)

    def complement(self, step):
        return number_complement(step, self.decay, dynamic=False)

    def get_config(self):
        return {"decay": self.decay}


@keras.saving.register_keras_serializable(package="keras_ema")
class Dynamic(DecaySchedule):
    """A decay that grows from 0.1 to `max_decay`, as TF1's `num_updates`.

    `decay_n = min(max_decay, (1 + n) / (10 + n))`: 0.1, 2/11, 3/12, ...,
    so the first, poor weights do not linger in the average; `max_decay` is
    reached after about `9 / (1 - max_decay)` updates. It is the formula of
    `tf.train.ExponentialMovingAverage(num_updates=n)`, with `n` counting
    from 0 at the first update after `start_step`; TF Addons'
    `MovingAverage(dynamic_decay=True)` gives the same decays with the same
    `start_step`, Model Garden's with `start_step` one higher (it also
    counts the update in progress).

    Args:
        max_decay: float in [0, 1], the decay once the ramp reaches it.

    Example:

    ```python
    optimizer = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.1),
        average_decay=keras_ema.schedules.Dynamic(0.999))
    ```
    """

    parameters = ("max_decay",)

    def __init__(self, max_decay):
        owner = type(self).__name__
        self.max_decay = _check_decay(owner, "max_decay", max_decay)

    def __call__(self, step):
        return number_rule(step, self.max_decay, dynamic=True)

    def complement(self, step):
        return number_complement(step, self.max_decay, dynamic=True)

    def get_config(self):
        return {"max_decay": self.max_decay}


@keras.saving.register_keras_serializable(package="keras_ema")
class Warmup(DecaySchedule):
    """The inverse-power warm-up of timm, diffusers and ema-pytorch.

    `decay_n = clip(1 - (1 + n / inv_gamma) ** -power, min_decay, max_decay)`,
    as timm's `ModelEmaV3(use_warmup=True)`, diffusers'
    `EMAModel(use_ema_warmup=True)` and ema-pytorch's `EMA`, with their
    defaults. At `n = 0` the decay is 0, so the first EMA update sets the
    average to the weights, as in those libraries (they return 0 there even
    when `min_decay > 0`; here `min_decay` bounds every `n`). With
    `inv_gamma=1, power=1` the average is the plain mean of the weights seen.

    Choosing `power` (with `inv_gamma=1`, the guidance of those libraries):
    `power=2/3` for runs of a million updates or more (the decay reaches
    0.999 at n = 31,622 and 0.9999 at n = 999,999); `power=3/4` for shorter
    runs (0.999 at n = 9,999 and 0.9999 at n = 215,443).

    Args:
        max_decay: float in [0, 1], the upper bound of the decay.
        inv_gamma: float > 0. The decay at `n` is the `inv_gamma=1` decay
            at `n / inv_gamma`: larger values stretch the warm-up.
        power: float > 0. Larger values reach `max_decay` sooner.
        min_decay: float in [0, `max_decay`], the lower bound of the decay.

    Example:

    ```python
    optimizer = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.1),
        average_decay=keras_ema.schedules.Warmup(0.9999, power=3 / 4))
    ```
    """

    parameters = ("max_decay", "inv_gamma", "power", "min_decay")

    def __init__(self, max_decay, inv_gamma=1.0, power=2 / 3, min_decay=0.0):
        owner = type(self).__name__
        self.max_decay = _check_decay(owner, "max_decay", max_decay)
        self.inv_gamma = _check_positive(owner, "inv_gamma", inv_gamma, "1.0")
        self.power = _check_positive(owner, "power", power, "2/3")
        self.min_decay = _check_decay(owner, "min_decay", min_decay)
        if self.min_decay > self.max_decay:
            raise ValueError(
                f"`{owner}` requires `min_decay <= max_decay`. Received: "
                f"min_decay={min_decay!r}, max_decay={max_decay!r}. Instead, "
                "lower `min_decay` (0.0 lets the warm-up start from 0)."
            )

    def __call__(self, step):
        n = ops.cast(step, "float32")
        decay = 1.0 - ops.power(1.0 + n / self.inv_gamma, -self.power)
        return ops.clip(decay, self.min_decay, self.max_decay)

    def complement(self, step):
        n = _wide(step)
        rest = ops.power(1.0 + n / _wide(self.inv_gamma), -_wide(self.power))
        return ops.clip(rest, _wide_complement(self.max_decay),
                        _wide_complement(self.min_decay))

    def get_config(self):
        return {"max_decay": self.max_decay, "inv_gamma": self.inv_gamma,
                "power": self.power, "min_decay": self.min_decay}


@keras.saving.register_keras_serializable(package="keras_ema")
class HalfLife(Constant):
    """A constant decay given as the half-life of the average's memory.

    `decay = 0.5 ** (1 / half_life)`: after `half_life` EMA updates, what the
    average held before them makes up half of it. Easier to reason about
    than a decay near 1 (`half_life=693` is about `decay=0.999`).

    Args:
        half_life: float > 0, in EMA updates (fractions allowed).

    Example:

    ```python
    optimizer = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.1),
        average_decay=keras_ema.schedules.HalfLife(1000))
    ```
    """

    parameters = ("half_life", "decay")

    def __init__(self, half_life):
        owner = type(self).__name__
        self.half_life = _check_positive(owner, "half_life", half_life, "1000")
        super().__init__(0.5 ** (1.0 / self.half_life))

    def complement(self, step):
        # From the half-life: `decay` holds 0.5 ** (1 / half_life) rounded
        # to float32, a relative error of `1 - decay` of up to 1e-7 / it.
        if _is_real(self.half_life):
            return -ops.expm1(_wide(-math.log(2.0) / self.half_life))
        return -ops.expm1(-math.log(2.0) / _wide(self.half_life))

    def get_config(self):
        return {"half_life": self.half_life}


def complement(schedule, n, every=1):
    """`1 - decay`: how far the averaging update after real update `n + 1`
    since `start_step` moves the averages towards the weights, as float32.

    This is the one place where `update_every` meets the decay. A schedule
    that counts real updates gets `n`, and `decay ** every` stands for the
    `every` updates the average skipped, so that its length in real updates
    stays the same. One that counts averaging updates (`counts_averages`:
    `Uniform`, `Power`) gets `k = (n + 1) // every - 1`, the number of
    averaging updates before this one: the mean of the sampled weights is
    not a decay raised to a power. Computed without cancellation, in
    `wide_float()`, and rounded to float32 once: `1 - decay ** every` as
    `-expm1(every * log1p(-(1 - decay)))`.
    """
    if getattr(schedule, "counts_averages", False):
        k = ops.maximum(ops.subtract(ops.floor_divide(ops.add(n, 1), every), 1), 0)
        return ops.cast(own_complement(schedule, k), "float32")
    if isinstance(schedule, DecaySchedule):
        rest = _wide(own_complement(schedule, n))
    else:
        rest = 1.0 - _wide(ops.cast(schedule(n), "float32"))
    if every > 1:
        # log1p(-1) is -inf: a decay of 0 stays 0.
        rest = -ops.expm1(float(every) * ops.log1p(-rest))
    return ops.cast(rest, "float32")


def number_rule(step, decay, dynamic):
    """The decay of update `step` for a number `average_decay`.

    `decay` is the number, or the scalar variable that holds it (so that it
    can change inside a compiled train step): `Constant(decay)` if not
    `dynamic`, else `Dynamic(decay)`.
    """
    decay = ops.cast(decay, "float32")
    if not dynamic:
        return decay
    n = ops.cast(step, "float32")
    return ops.minimum((1.0 + n) / (10.0 + n), decay)


def number_complement(step, decay, dynamic):
    """`1 - number_rule(step, decay, dynamic)`, in `wide_float()`: the
    dynamic cap's `1 - (1 + n) / (10 + n)` as `9 / (10 + n)`."""
    rest = _wide_complement(decay)
    if not dynamic:
        return rest
    return wide_maximum(9.0 / (10.0 + _wide(step)), rest)


def parameters(schedule):
    """The number attributes `schedule(n)` reads, if it declares them."""
    return tuple(getattr(schedule, "parameters", ()))


def with_values(schedule, values):
    """A copy of `schedule` whose parameters are `values` (variables that a
    compiled step reads, or the numbers they hold)."""
    replaced = copy.copy(schedule)
    replaced.__dict__.update(values)
    return replaced


def serialize(schedule):
    """Returns the JSON-safe config dict of `schedule`."""
    return keras.saving.serialize_keras_object(schedule)


def deserialize(config, custom_objects=None):
    """Rebuilds a schedule from the output of `serialize`."""
    return keras.saving.deserialize_keras_object(
        config, custom_objects=custom_objects
    )


def get(identifier, dynamic=False):
    """Turns what a user passes as `average_decay=` into a schedule.

    Args:
        identifier: a `DecaySchedule` (returned as is); a number in [0, 1]
            (`Dynamic(identifier)` if `dynamic` else `Constant(identifier)`);
            a config dict from `serialize`; or a function `f(step) -> decay`
            (returned as is) that takes an integer tensor and returns a
            float32 scalar computed with `keras.ops`.
        dynamic: bool, only used when `identifier` is a number.
    """
    if isinstance(identifier, DecaySchedule):
        return identifier
    if _is_real(identifier):
        return Dynamic(identifier) if dynamic else Constant(identifier)
    if isinstance(identifier, dict):
        return deserialize(identifier)
    # A class is callable too, but `average_decay=Warmup` is a missing `()`.
    if callable(identifier) and not isinstance(identifier, type):
        return identifier
    raise ValueError(
        "Could not interpret `average_decay`: expected a number in [0, 1], "
        "a `keras_ema.schedules.DecaySchedule` instance, its config dict, or "
        f"a function `f(step) -> decay`. Received: {identifier!r} (of type "
        f"{type(identifier).__name__}). Instead, pass e.g. 0.999 or "
        "`keras_ema.schedules.Warmup(0.9999)`."
    )

