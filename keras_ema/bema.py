"""BEMA: the bias-corrected EMA of Block & Zhang (arXiv 2508.00180, 2025).

An EMA lags behind the weights it averages. BEMA keeps the EMA's variance
reduction and removes the lag with a correction towards the weights:

    ema_t     = (1 - beta_t) * ema_{t-1} + beta_t * theta_t
    average_t = ema_t + alpha_t * (theta_t - theta_0)

where `theta_0` are the weights when averaging starts, `t` the real updates
since then, `beta_t = (lag + multiplier * t) ** -ema_power` and
`alpha_t = (lag + multiplier * t) ** -bias_power`. `BEMA` is the schedule
that says so (`average_decay=keras_ema.schedules.BEMA()`); `average_t` is
what the optimizer keeps as the average, so swaps, files, exports and
`call_with_averages` all give the corrected weights. Each average keeps
`ema_t` and `theta_0` in one more variable, a "companion" of twice its size
(`move` and `start` below; created by `_slots.add_companion`).
"""

import keras
from keras import ops

from keras_ema._schedule_base import DecaySchedule
from keras_ema._schedule_base import invalid
from keras_ema._schedule_base import is_real
from keras_ema._schedule_base import wide
from keras_ema._schedule_base import wide_maximum


@keras.saving.register_keras_serializable(package="keras_ema")
class BEMA(DecaySchedule):
    """Bias-corrected EMA (BEMA): an average without the EMA's lag.

    The average is `ema_t + alpha_t * (theta_t - theta_0)`: an EMA of the
    weights with decay `1 - beta_t`, plus a correction towards the weights
    `theta_t` that fades as `alpha_t` does. `theta_0` are the weights when
    averaging starts (after `start_step` updates) and `t` counts the real
    updates since then, also with `update_every` (the paper's and Hugging
    Face TRL's `BEMACallback`'s steps):

    - `beta_t = max((lag + multiplier * t) ** -ema_power, min_ema_multiplier)`
    - `alpha_t = (lag + multiplier * t) ** -bias_power`

    The defaults are TRL's (the paper's `kappa=0.5`, `eta=0.2`, `rho=10`,
    `gamma=1`). With `start_step=0` and `update_every=1` every average is
    TRL's BEMA weights at the same step. Costs one more variable of twice
    the weights' size (the EMA and `theta_0`). The parameters can be set
    during training, like other schedules' (`optimizer.average_decay =
    BEMA(bias_power=0.4)`). Not with `compensated=True`.

    Args:
        ema_power: float >= 0, the paper's `kappa`. Larger values forget
            the early weights faster; 0 makes the EMA the weights.
        bias_power: float >= 0, the paper's `eta`. Larger values fade the
            correction faster (towards the plain EMA).
        lag: float >= 0, the paper's `rho`: the virtual age of the average
            when averaging starts.
        multiplier: float > 0, the paper's `gamma`: how fast `t` ages it.
        min_ema_multiplier: float in [0, 1], the smallest `beta_t`.

    Example:

    ```python
    optimizer = keras_ema.ExponentialMovingAverage(
        keras.optimizers.AdamW(1e-3),
        average_decay=keras_ema.schedules.BEMA(),
        update_every=10,
    )
    ```
    """

    parameters = ("ema_power", "bias_power", "lag", "multiplier",
                  "min_ema_multiplier")

    def __init__(self, ema_power=0.5, bias_power=0.2, lag=10.0,
                 multiplier=1.0, min_ema_multiplier=0.0):
        owner = type(self).__name__
        self.ema_power = _check(owner, "ema_power", ema_power, 0.0, "0.5")
        self.bias_power = _check(owner, "bias_power", bias_power, 0.0, "0.2")
        self.lag = _check(owner, "lag", lag, 0.0, "10")
        self.multiplier = _check(owner, "multiplier", multiplier, None, "1")
        self.min_ema_multiplier = _check(
            owner, "min_ema_multiplier", min_ema_multiplier, 0.0, "0.0"
        )
        if self.min_ema_multiplier > 1.0:
            raise invalid(owner, "min_ema_multiplier", min_ema_multiplier,
                          "a real number in [0, 1]", "0.0")
        if self.lag + self.multiplier < 1.0:
            # beta_1 would exceed 1: the EMA would overshoot the weights.
            raise ValueError(
                f"`{owner}` requires `lag + multiplier >= 1`, so that no "
                f"update moves the EMA past the weights. Received: lag={lag!r}"
                f", multiplier={multiplier!r}. Instead, pass e.g. lag=10."
            )

    def coefficients(self, t):
        """`(beta_t, alpha_t)` as float32, for `t` real updates since
        averaging started; computed in `wide_float()`."""
        age = wide(self.lag) + wide(self.multiplier) * wide(t)
        beta = wide_maximum(ops.power(age, -wide(self.ema_power)),
                            self.min_ema_multiplier)
        alpha = ops.power(age, -wide(self.bias_power))
        return ops.cast(beta, "float32"), ops.cast(alpha, "float32")

    def __call__(self, step):
        # The EMA's decay at averaging update `step` (t = step + 1).
        return 1.0 - self.coefficients(ops.add(step, 1))[0]

    def complement(self, step):
        return self.coefficients(ops.add(step, 1))[0]

    def get_config(self):
        return {name: getattr(self, name) for name in self.parameters}


def is_bema(schedule):
    return isinstance(schedule, BEMA)


def check_settings(schedule, compensated):
    """Raises if BEMA is combined with what it cannot take."""
    if is_bema(schedule) and compensated:
        raise ValueError(
            "ExponentialMovingAverage does not support `compensated=True` "
            "with `schedules.BEMA`: its averages are not moved by one EMA "
            "update each. Instead, pass `compensated=False`."
        )


def move(average, weight, companion, beta, alpha, averaging, copying):
    """One BEMA update of `average`; `companion` holds `[ema, theta_0]`.

    Where `averaging`, the EMA moves `beta` of the way to the weight and
    the average becomes `ema + alpha * (weight - theta_0)`; where
    `copying` (the first `start_step` updates; None without them), all
    three become the weight; else nothing changes (branch-free selects:
    bit-exact).
    """
    weight = ops.cast(weight, average.dtype)
    held = ops.convert_to_tensor(companion)
    ema, start = held[0], held[1]
    moved = ops.subtract(ema, ops.multiply(beta, ops.subtract(ema, weight)))
    lead = ops.multiply(alpha, ops.subtract(weight, start))
    new_ema = ops.where(averaging, moved, ema)
    new_average = ops.where(averaging, ops.add(moved, lead),
                            ops.convert_to_tensor(average))
    if copying is not None:
        new_ema = ops.where(copying, weight, new_ema)
        start = ops.where(copying, weight, start)
        new_average = ops.where(copying, weight, new_average)
    companion.assign(ops.stack([new_ema, start]))
    average.assign(new_average)


def start(average, weight, companion):
    """Sets the average, its EMA and `theta_0` to the weight."""
    weight = ops.copy(ops.cast(weight, average.dtype))
    average.assign(weight)
    companion.assign(ops.stack([weight, weight]))


def _check(owner, name, value, low, example):
    # `low=None`: strictly positive.
    ok = is_real(value) and value < float("inf") and (
        value > 0.0 if low is None else value >= low
    )
    if not ok:
        expected = ("a finite real number > 0" if low is None
                    else f"a finite real number >= {low:g}")
        raise invalid(owner, name, value, expected, example)
    return float(value)
