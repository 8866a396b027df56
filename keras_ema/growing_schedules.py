"""Schedules whose average grows with training: SWA's mean, EDM2's power
function, BYOL's cosine (see `_schedule_base.py` for the protocol)."""

import math

import keras
import numpy as np
from keras import ops

from keras_ema._schedule_base import DecaySchedule
from keras_ema._schedule_base import check_decay as _check_decay
from keras_ema._schedule_base import check_positive as _check_positive
from keras_ema._schedule_base import invalid as _invalid
from keras_ema._schedule_base import is_real as _is_real
from keras_ema._schedule_base import wide as _wide
from keras_ema._schedule_base import wide_complement as _wide_complement
from keras_ema._schedule_base import wide_minimum


@keras.saving.register_keras_serializable(package="keras_ema")
class Uniform(DecaySchedule):
    """The equal-weight mean of the weights: stochastic weight averaging.

    The average is the arithmetic mean of the weight at `start_step` and of
    the weights after each averaging update (every `update_every` real
    updates): the k-th averaging update (k = 0, 1, ...) uses
    `decay_k = (k + 1) / (k + 2)`. It is the average of SWA (Izmailov et al.
    2018), of TF Addons' `SWA(start_averaging, average_period)` and of
    `torch.optim.swa_utils`; start it late in training (`start_step`), with
    a high constant or cyclic learning rate, and recompute the BatchNorm
    statistics of the averages with `keras_ema.update_bn`. The count is an
    integer and `1 - decay_k = 1 / (k + 2)` is computed directly; with
    `ExponentialMovingAverage(compensated=True)` the float32 mean stays
    within 1e-7 relative of the exact mean over a million updates
    (without, each update rounds it, and the error grows with the count:
    see the performance guide).

    Example:

    ```python
    optimizer = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05),
        average_decay=keras_ema.schedules.Uniform(),
        start_step=1000, update_every=100)
    ```
    """

    counts_averages = True

    def __call__(self, step):
        k = ops.cast(step, "float32")
        return (k + 1.0) / (k + 2.0)

    def complement(self, step):
        return 1.0 / (_wide(step) + 2.0)

    def get_config(self):
        return {}


def sigma_rel_to_gamma(sigma_rel):
    """The exponent `gamma` of the power-function EMA of width `sigma_rel`.

    Inverts `sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))`
    on `gamma >= 0`, as EDM2's `std_to_exp`: the largest real root of
    `gamma**3 + 7 gamma**2 + (16 - s) gamma + 12 - s`, `s = sigma_rel ** -2`.
    """
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    # Widths between sqrt(1/12) (gamma = 0) and the documented bound 0.2887,
    # its rounding, are the plain mean: their root is slightly negative.
    return max(float(roots.real[np.abs(roots.imag) < 1e-9].max()), 0.0)


def gamma_to_sigma_rel(gamma):
    """The relative width of the power-function EMA of exponent `gamma`."""
    gamma = float(gamma)
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


# The widest power-function EMA is gamma = 0, the plain mean, of width
# sqrt(1/12) = 0.28868; the bound accepted is the documented 0.2887.
_MAX_SIGMA_REL = 0.2887


@keras.saving.register_keras_serializable(package="keras_ema")
class Power(DecaySchedule):
    """EDM2's power-function EMA, whose length grows with training.

    The k-th averaging update (k = 0, 1, ...) uses
    `decay_k = (1 - 1 / (k + 1)) ** (gamma + 1)`: with `update_every=m`
    that is `(1 - m / t) ** (gamma + 1)`, `t = m * (k + 1)` the real updates
    since `start_step`. At any time `t` the average weighs the weights of
    time `tau` in proportion to `tau ** gamma`: it covers a fixed fraction
    of training, `sigma_rel`, its standard deviation relative to `t`
    (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
    Diffusion Models"). `sigma_rel = sqrt((gamma + 1) / ((gamma + 2) ** 2 *
    (gamma + 3)))`: 0.05 is `gamma` 16.97, 0.10 is 6.94. The first update
    (k = 0) sets the average to the weights. Keep several with
    `keras_ema.PostHocEMA` to choose the width after training.

    Args:
        sigma_rel: float in (0, 0.2887], the relative width; or
        gamma: float >= 0, the exponent. Give exactly one.

    Example:

    ```python
    optimizer = keras_ema.ExponentialMovingAverage(
        keras.optimizers.Adam(1e-3),
        average_decay=keras_ema.schedules.Power(sigma_rel=0.10))
    ```
    """

    counts_averages = True
    parameters = ("gamma",)

    def __init__(self, sigma_rel=None, gamma=None):
        owner = type(self).__name__
        if (sigma_rel is None) == (gamma is None):
            raise ValueError(
                f"`{owner}` requires exactly one of `sigma_rel` and `gamma`. "
                f"Received: sigma_rel={sigma_rel!r}, gamma={gamma!r}. "
                "Instead, pass e.g. sigma_rel=0.10."
            )
        if sigma_rel is not None:
            if not (_is_real(sigma_rel) and 0.0 < sigma_rel <= _MAX_SIGMA_REL):
                raise _invalid(owner, "sigma_rel", sigma_rel,
                               "a real number in (0, 0.2887]", "0.10")
            gamma = sigma_rel_to_gamma(sigma_rel)
            self._given = ("sigma_rel", float(sigma_rel))
        else:
            if not (_is_real(gamma) and 0.0 <= gamma < math.inf):
                raise _invalid(owner, "gamma", gamma,
                               "a finite real number >= 0", "6.94")
            self._given = ("gamma", float(gamma))
        self.gamma = float(gamma)

    @property
    def sigma_rel(self):
        """The relative width of the average."""
        given, value = self._given
        if given == "sigma_rel" and sigma_rel_to_gamma(value) == self.gamma:
            return value
        return gamma_to_sigma_rel(self.gamma)

    def _log_decay(self, step):
        k = _wide(step)
        # log1p(-1) is -inf at k = 0: decay 0, the average takes the weights.
        return (_wide(self.gamma) + 1.0) * ops.log1p(-1.0 / (k + 1.0))

    def __call__(self, step):
        return ops.cast(ops.exp(self._log_decay(step)), "float32")

    def complement(self, step):
        return -ops.expm1(self._log_decay(step))

    def get_config(self):
        given, value = self._given
        if given == "sigma_rel" and sigma_rel_to_gamma(value) == self.gamma:
            return {"sigma_rel": value}
        return {"gamma": self.gamma}


@keras.saving.register_keras_serializable(package="keras_ema")
class Cosine(DecaySchedule):
    """A decay that rises from `initial_decay` to `final_decay` along a cosine.

    `decay_n = final - (final - initial) * (cos(pi * min(n, steps) / steps)
    + 1) / 2`: BYOL's and DINO's teacher schedule (BYOL: from 0.996 to 1
    over the whole training), so the teacher follows the student closely at
    first and freezes at the end. `n` counts EMA updates after `start_step`.

    Args:
        initial_decay: float in [0, 1], the decay at `n = 0`.
        final_decay: float in [0, 1], the decay from `n = steps` on.
        steps: float > 0, the EMA updates the rise takes (e.g. the training
            run's length).

    Example:

    ```python
    optimizer = keras_ema.ExponentialMovingAverage(
        keras.optimizers.Adam(1e-3),
        average_decay=keras_ema.schedules.Cosine(0.996, 1.0, steps=10_000))
    ```
    """

    parameters = ("initial_decay", "final_decay", "steps")

    def __init__(self, initial_decay, final_decay=1.0, steps=None):
        owner = type(self).__name__
        self.initial_decay = _check_decay(owner, "initial_decay", initial_decay)
        self.final_decay = _check_decay(owner, "final_decay", final_decay)
        self.steps = _check_positive(owner, "steps", steps, "10000")

    def _rise(self, step):
        steps = _wide(self.steps)
        n = wide_minimum(step, steps)
        return (ops.cos(math.pi * n / steps) + 1.0) / 2.0

    def __call__(self, step):
        final, initial = _wide(self.final_decay), _wide(self.initial_decay)
        return ops.cast(final - (final - initial) * self._rise(step), "float32")

    def complement(self, step):
        # `1 - decay` directly: near 1 a float32 decay keeps few digits.
        final, initial = self.final_decay, self.initial_decay
        span = (final - initial if _is_real(final) and _is_real(initial)
                else _wide(final) - _wide(initial))
        return _wide_complement(final) + _wide(span) * self._rise(step)

    def get_config(self):
        return {"initial_decay": self.initial_decay,
                "final_decay": self.final_decay, "steps": self.steps}
