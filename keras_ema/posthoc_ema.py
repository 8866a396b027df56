"""`PostHocEMA`: several power-function EMAs of the weights at once (EDM2)."""

import math

import keras
import numpy as np
from keras import ops

from keras_ema import _checks
from keras_ema import _state
from keras_ema import schedules
from keras_ema._atomic import SwappedIn
from keras_ema._schedule_base import is_real
from keras_ema.optimizer import ExponentialMovingAverage

# The settings every profile shares (`_settings.Settings`, less the decay's).
_SHARED = (
    "trainable_weights_only", "start_step", "update_every", "average_dtype",
    "exclude", "compensated",
)


@keras.saving.register_keras_serializable(package="keras_ema")
class PostHocEMA(ExponentialMovingAverage):
    """Optimizer that keeps one power-function EMA per `sigma_rel`.

    EDM2's post-hoc EMA (Karras et al. 2024): during training, keep a few
    power-function averages of the weights (`schedules.Power`, relative
    widths `sigma_rels`) and save snapshots of them every so often with
    `keras_ema.PostHocSnapshots`; after training, `keras_ema.synthesize`
    builds the average of any other width from the snapshots, and
    `keras_ema.sweep_sigma_rel` finds the best width on validation data,
    without training again.

    Each profile is an `ExponentialMovingAverage` with decay
    `schedules.Power(sigma_rel)`; the first wraps the second, and so on, and
    the last wraps `optimizer`, so every profile moves after each real update
    and is saved with the optimizer. `swap_weights`, `averaged_weights`,
    `assign_average_vars`, `average`, the callbacks and `export_averaged`
    use the first `sigma_rel` unless given another. One profile at most is
    swapped in at a time, and training refuses while one is.

    Args:
        optimizer: The optimizer to wrap, as for `ExponentialMovingAverage`.
        sigma_rels: The relative widths of the averages, distinct floats in
            (0, 0.2887]. EDM2 tracks 0.05 and 0.10.
        trainable_weights_only: As for `ExponentialMovingAverage`; like
            the next five, shared by every profile.
        start_step: As for `ExponentialMovingAverage`.
        update_every: As for `ExponentialMovingAverage`.
        average_dtype: As for `ExponentialMovingAverage`.
        exclude: As for `ExponentialMovingAverage`.
        compensated: As for `ExponentialMovingAverage`; EDM2-style runs of
            10**5 updates or more should turn it on.
        name: The optimizer's name.

    Example:

    ```python
    opt = keras_ema.PostHocEMA(keras.optimizers.Adam(1e-3))
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, epochs=10,
              callbacks=[keras_ema.PostHocSnapshots("snapshots", every=100)])
    with opt.averaged_weights(sigma_rel=0.10):
        model.evaluate(x_val, y_val)
    keras_ema.synthesize("snapshots", model, sigma_rel=0.07)
    ```
    """

    def __init__(
        self,
        optimizer,
        sigma_rels=(0.05, 0.10),
        trainable_weights_only=True,
        start_step=0,
        update_every=1,
        average_dtype=None,
        exclude=None,
        compensated=False,
        name="PostHocEMA",
        **kwargs,
    ):
        for refused in ("average_decay", "dynamic_decay"):
            if refused in kwargs:
                raise ValueError(
                    f"PostHocEMA does not support `{refused}`: each average's "
                    "decay is `schedules.Power(sigma_rel)`. Instead, pass "
                    "`sigma_rels=(...)`, or use `ExponentialMovingAverage` "
                    "for another decay."
                )
        sigma_rels = _check_sigma_rels(sigma_rels)
        shared = dict(
            trainable_weights_only=trainable_weights_only,
            start_step=start_step, update_every=update_every,
            average_dtype=average_dtype, exclude=exclude,
            compensated=compensated,
        )
        inner = _checks.get_optimizer(optimizer)
        for i in range(len(sigma_rels) - 1, 0, -1):
            inner = ExponentialMovingAverage(
                inner, average_decay=schedules.Power(sigma_rel=sigma_rels[i]),
                name=f"{name}_sigma_rel_{i}", **shared,
            )
        super().__init__(
            inner, average_decay=schedules.Power(sigma_rel=sigma_rels[0]),
            name=name, **shared, **kwargs,
        )
        self._sigma_rels = sigma_rels

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        # A shared setting changed before building applies to every profile.
        if name in _SHARED and "_sigma_rels" in self.__dict__:
            for profile in self._profiles()[1:]:
                setattr(profile, name, value)

    @property
    def sigma_rels(self):
        """The relative widths of the averages kept, in order."""
        return self._sigma_rels

    # Methods, not properties: Keras' saving walks every attribute, and
    # would save twice, or recurse into, what a property returns.
    def _profiles(self):
        """The `ExponentialMovingAverage` of each `sigma_rel`, in order."""
        return _state.averaging_chain(self)[: len(self._sigma_rels)]

    def _base_optimizer(self):
        """The optimizer that updates the weights (`optimizer`)."""
        return self._profiles()[-1].inner_optimizer

    def profile(self, sigma_rel=None):
        """The `ExponentialMovingAverage` of `sigma_rel` (default: the first).

        Raises if `sigma_rel` is not tracked: use `keras_ema.synthesize` for
        other widths.
        """
        if sigma_rel is None:
            return self
        for kept, profile in zip(self._sigma_rels, self._profiles()):
            if math.isclose(kept, sigma_rel, rel_tol=1e-9):
                return profile
        raise ValueError(
            f"PostHocEMA does not keep an average of sigma_rel={sigma_rel!r}: "
            f"it keeps sigma_rels={self._sigma_rels}. Instead, pass one of "
            "them, or synthesize that width from snapshots after training "
            "with `keras_ema.synthesize`."
        )

    # -- building: every profile knows the model ------------------------------

    def build(self, var_list):
        super().build(var_list)
        model = self._ema_state.bound_model()
        if model is not None:
            self._share_model(model)

    def shadow_copy(self, model):
        super().shadow_copy(model)
        self._share_model(model)

    def _share_model(self, model):
        for profile in self._profiles()[1:]:
            ExponentialMovingAverage.shadow_copy(profile, model)

    # -- swapping one profile -------------------------------------------------

    @property
    def averages_swapped_in(self):
        """Whether the averages of one of the profiles are in the model."""
        return self._swapped_profile() is not None

    def _swapped_profile(self):
        for profile in self._profiles():
            if ExponentialMovingAverage.averages_swapped_in.fget(profile):
                return profile
        return None

    def _chosen(self, sigma_rel, what):
        profile = self.profile(sigma_rel)
        swapped = self._swapped_profile()
        if swapped is not None and swapped is not profile:
            i = self._profiles().index(swapped)
            raise ValueError(
                f"`{what}` cannot use sigma_rel={profile_sigma(self, profile)}"
                f" while the averages of sigma_rel={self._sigma_rels[i]} are "
                "swapped in. Instead, swap those back first "
                f"(`swap_weights(sigma_rel={self._sigma_rels[i]})`)."
            )
        return profile

    def swap_weights(self, sigma_rel=None):
        """Swaps the averages of `sigma_rel` in or out (see
        `ExponentialMovingAverage.swap_weights`).

        Without `sigma_rel`, swaps back the profile that is in, if one is,
        else swaps the first one in.
        """
        if sigma_rel is None and self._swapped_profile() is not None:
            profile = self._swapped_profile()
        else:
            profile = self._chosen(sigma_rel, "swap_weights")
        ExponentialMovingAverage.swap_weights(profile)

    def averaged_weights(self, sigma_rel=None):
        """Context manager: the averages of `sigma_rel` (default: the
        first) are in the model inside the block."""
        profile = self._chosen(sigma_rel, "averaged_weights")
        profile._check_ready("averaged_weights")
        return SwappedIn(_OneProfile(profile))

    def assign_average_vars(self, var_list, sigma_rel=None):
        """Overwrites each variable of `var_list` with its average of
        `sigma_rel` (default: the first)."""
        profile = self._chosen(sigma_rel, "assign_average_vars")
        ExponentialMovingAverage.assign_average_vars(profile, var_list)

    def average(self, variable, sigma_rel=None):
        """The average of `variable` of `sigma_rel` (default: the first)."""
        return ExponentialMovingAverage.average(self.profile(sigma_rel), variable)

    # -- saving ---------------------------------------------------------------

    def get_config(self):
        config = ExponentialMovingAverage.get_config(self)
        del config["average_decay"], config["dynamic_decay"]
        config["optimizer"] = keras.saving.serialize_keras_object(
            self._base_optimizer()
        )
        config["sigma_rels"] = list(self._sigma_rels)
        return config


def profile_sigma(optimizer, profile):
    return optimizer.sigma_rels[optimizer._profiles().index(profile)]


def updates_seen(optimizer):
    """The real updates `optimizer`'s profiles have averaged over (they count
    together): not the inner optimizer's `iterations`, which also counts the
    updates it made before it was wrapped."""
    state = optimizer._ema_state
    return 0 if state.step is None else int(ops.convert_to_numpy(state.step))


def held_averages(optimizer, variable):
    """The average of `variable` of each profile, whatever is swapped in.

    While a profile is swapped in, the model variable holds its average and
    the profile's slot the raw weight; a float32 average of a low-precision
    weight stays in its slot (the raw weight waits in a backup).
    """
    values = []
    for profile in optimizer._profiles():
        state = profile._ema_state
        average = ExponentialMovingAverage.average(profile, variable)
        backup = state.entries[state.index[state.var_key(variable)]][2]
        swapped = ExponentialMovingAverage.averages_swapped_in.fget(profile)
        values.append(np.asarray(
            variable if swapped and backup is None else average))
    return values


class _OneProfile:
    """What `SwappedIn` needs of one profile: its own swap state."""

    def __init__(self, profile):
        self.profile = profile

    @property
    def averages_swapped_in(self):
        return ExponentialMovingAverage.averages_swapped_in.fget(self.profile)

    def swap_weights(self):
        ExponentialMovingAverage.swap_weights(self.profile)


def _check_sigma_rels(sigma_rels):
    try:
        values = tuple(float(s) for s in sigma_rels)
        valid = (
            bool(values) and all(is_real(s) for s in sigma_rels)
            and len(set(values)) == len(values)
        )
        for s in values if valid else ():
            schedules.Power(sigma_rel=s)  # the one home of the bounds
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(
            "PostHocEMA requires `sigma_rels` to be a non-empty sequence of "
            f"distinct floats in (0, 0.2887]. Received: sigma_rels={sigma_rels!r}. "
            "Instead, pass e.g. sigma_rels=(0.05, 0.10)."
        )
    return values
