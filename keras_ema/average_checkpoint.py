"""`AverageModelCheckpoint`: checkpoints of the averaged weights."""

import keras

from keras_ema import _binding
from keras_ema._binding import find_in_model
from keras_ema._files import atomic_path
from keras_ema.callbacks import _check_sigma_rel
from keras_ema.callbacks import _swap_out


class AverageModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Saves the averaged weights, like `ModelCheckpoint` saves the weights.

    Each save swaps the averages into the model for the save only (the whole
    model as `.keras`, or with `save_weights_only=True` the weights), so
    training continues on the raw weights, untouched; the optimizer state in
    the file records the swap, so the file also resumes training correctly.
    With `update_weights=True` the model's weights are set to their averages
    at each save opportunity instead, and training continues from them.
    Each file is written aside and renamed into place: a process killed
    mid-save leaves the previous checkpoint whole (and at most a stray
    `.tmp-<hex>.<name>` next to it), and a save that raises leaves nothing.

    With `save_best_only=True`, "best" must be measured on the averages it
    saves: monitor a validation metric and add `SwapAverageWeights` to the
    same `fit`, so that validation runs on the averages, with a `PostHocEMA`
    those of the same `sigma_rel`. Other set-ups raise an error before
    training.

    Args:
        filepath: Where to save, as for `keras.callbacks.ModelCheckpoint`.
        update_weights: If `True`, overwrite the model's weights with their
            averages before each save; training continues from them. Else
            the model keeps its training weights.
        sigma_rel: With a `PostHocEMA` optimizer, the width whose averages
            to save (default: its first).
        **kwargs: Any other argument of `keras.callbacks.ModelCheckpoint`:
            `monitor`, `save_best_only`, `save_weights_only`, `save_freq`...

    Example:

    ```python
    model.fit(
        x, y, validation_data=(x_val, y_val), epochs=10,
        callbacks=[
            keras_ema.SwapAverageWeights(),
            keras_ema.AverageModelCheckpoint(
                "best_ema.keras", monitor="val_loss", save_best_only=True
            ),
        ],
    )
    ```
    """

    def __init__(self, filepath, update_weights=False, sigma_rel=None,
                 **kwargs):
        super().__init__(filepath, **kwargs)
        self.sigma_rel = sigma_rel
        # What `averaged_weights` and `assign_average_vars` are given.
        self._which = {} if sigma_rel is None else {"sigma_rel": sigma_rel}
        if not isinstance(update_weights, bool):
            raise ValueError(
                "AverageModelCheckpoint requires `update_weights` to be True "
                f"or False. Received: update_weights={update_weights!r}."
            )
        if self.save_best_only and not self.monitor.startswith("val_"):
            raise ValueError(
                "AverageModelCheckpoint does not support `save_best_only=True` "
                f"with monitor={self.monitor!r}: training metrics are measured "
                "on the raw weights, not on the averages it saves. Instead, "
                "monitor a validation metric such as 'val_loss' and add "
                "`keras_ema.SwapAverageWeights()` to the same `fit`."
            )
        self.update_weights = update_weights

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        # The callback's `model` is the optimizer's model (`shadow_copy`).
        opt = find_in_model(self.model, "AverageModelCheckpoint")
        opt.shadow_copy(self.model)
        if self._which:
            _check_sigma_rel(opt, self.sigma_rel, "AverageModelCheckpoint")

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        # Here, not in `on_train_begin`: `SwapAverageWeights` may come later
        # in the callback list. Failing now costs no training time.
        if self.save_best_only:
            self._check_monitor_on_averages()

    def _save_model(self, epoch, batch, logs):
        opt = find_in_model(self.model, "AverageModelCheckpoint")
        if self.save_best_only and self.monitor in (logs or {}):
            # Again here: a wrapper left by a fit that raised passes the
            # check above, then removes itself at the first validation.
            self._check_monitor_on_averages()
        if not self.update_weights:
            with opt.averaged_weights(**self._which):
                self._save_model_atomically(epoch, batch, logs)
            return
        # While swapped in, the optimizer holds the raw weights in place of
        # the averages: swap back before copying the averages in.
        _swap_out(opt)
        opt.assign_average_vars(
            [v for v in self.model.variables if opt.average(v) is not None],
            **self._which,
        )
        self._save_model_atomically(epoch, batch, logs)

    def _save_model_atomically(self, epoch, batch, logs):
        name = "save_weights" if self.save_weights_only else "save"
        with _binding.saving_atomically(self.model, name, atomic_path):
            super()._save_model(epoch, batch, logs)

    def _check_monitor_on_averages(self):
        swap = _binding.validating_callback(self.model)
        if swap is None or (
            swap.log_raw_metrics and self.monitor.startswith("val_raw_")
        ):
            raise ValueError(
                "AverageModelCheckpoint does not support `save_best_only=True` "
                f"with monitor={self.monitor!r} measured on the raw weights. "
                "Instead, add `keras_ema.SwapAverageWeights()` to the same "
                "`fit`, so that validation runs on the averages, and monitor "
                "a metric 'val_<name>', not 'val_raw_<name>'."
            )
        # One width is validated per epoch; the best of another width cannot
        # be told from its scores.
        opt = find_in_model(self.model, "AverageModelCheckpoint")
        if hasattr(opt, "sigma_rels") and opt.profile(
            swap.sigma_rel
        ) is not opt.profile(self.sigma_rel):
            saved, validated = (
                _width(opt, s) for s in (self.sigma_rel, swap.sigma_rel)
            )
            raise ValueError(
                "AverageModelCheckpoint does not support `save_best_only=True` "
                f"for the averages of sigma_rel={saved} while validation runs "
                f"on those of sigma_rel={validated} "
                f"(`SwapAverageWeights(sigma_rel={swap.sigma_rel!r})`): "
                f"{self.monitor!r} would not measure what it saves. Instead, "
                f"pass sigma_rel={saved} to `SwapAverageWeights` too, or the "
                "same `sigma_rel` to both callbacks."
            )


def _width(opt, sigma_rel):
    """The width `sigma_rel` selects (`None`: the optimizer's first)."""
    return opt.sigma_rels[0] if sigma_rel is None else sigma_rel
