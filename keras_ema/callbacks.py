"""`SwapAverageWeights`: validation, `evaluate` and `predict` on the averages."""

import keras

from keras_ema import _binding
from keras_ema import batch_norm
from keras_ema._binding import find_in_model


class SwapAverageWeights(keras.callbacks.Callback):
    """Runs validation, `evaluate` and `predict` on the averaged weights.

    Inside `fit`, validation runs on the averages, and the training weights
    are back, bit for bit, when it ends, also when it raises (an error, a
    `KeyboardInterrupt`): for the duration of `fit`, the model's `evaluate`,
    which `fit` validates with, runs inside `averaged_weights()`. Passed to
    `evaluate` or `predict`, it swaps the averages in for that call, and back
    at its end or when a compiled step (on TensorFlow and JAX, also the input
    pipeline feeding it) raises. An error elsewhere (another callback; on
    torch, the input pipeline) can leave the averages in:
    `averages_swapped_in` says so, and the next use of this callback, or any
    `fit` with one, swaps them out, on JAX after putting back the model state
    that the trainer keeps outside the variables. The fully exception-safe
    form is `with opt.averaged_weights(): model.predict(x)`.

    With `swap_on_epoch=True` the averages also stay in the model from the
    end of each epoch until the next one begins, so the callbacks placed
    after this one (`ModelCheckpoint`, `EarlyStopping` with
    `restore_best_weights=True`) see them. Whenever training starts or an
    epoch begins with the averages in, e.g. after `BackupAndRestore` restored
    a backup written while they were, they are swapped out first: training
    never runs on the averages. With `trainable_weights_only=False`, `fit`
    creates the averages of the non-trainable variables by itself
    (`shadow_copy(model)`).

    Each callback sees what the model holds when its turn comes, so the order
    in `callbacks` decides what the others save and restore:

    - `ModelCheckpoint` and `BackupAndRestore` save the raw weights, or the
      averages when placed after a `SwapAverageWeights(swap_on_epoch=True)`;
      the optimizer state in the file records the swap, so every file resumes
      training exactly. `AverageModelCheckpoint` saves the averages anywhere.
    - `EarlyStopping(restore_best_weights=True)` after a
      `SwapAverageWeights(swap_on_epoch=True)` records and restores the best
      averages, the weights its `val_` metrics measured; the optimizer keeps
      the last averages, or, with `end_with_averages=True`, the last raw
      weights behind the best averages. With `swap_on_epoch=False` it
      restores the best raw weights, and the optimizer keeps the last
      averages; with `end_with_averages=True` too, `EarlyStopping` comes
      first, and the averages are swapped in over the best raw weights.
    - The two other orders would restore raw weights over the averages: they
      raise an error at the first validation, before `EarlyStopping` records
      anything, naming the order to use (Keras shows a callback the others
      only there, in the `callbacks` that `fit` passes to `evaluate`).

    Args:
        swap_on_epoch: If `True`, the averages stay in the model between
            epochs, for the callbacks that come after this one.
        end_with_averages: If `True`, `fit` ends with the averages in the
            model (`averages_swapped_in` is `True`; the raw weights stay in
            the optimizer). Else it ends with the raw weights.
        log_raw_metrics: If `True`, validation also runs on the raw weights
            and logs those metrics as `val_raw_<name>` next to the
            `val_<name>` measured on the averages.
        update_bn_data: Inputs to recompute the BatchNormalization
            statistics for the averaged weights with (`keras_ema.update_bn`,
            the step of stochastic weight averaging), typically (part of)
            the training inputs, in any form `update_bn` takes but an
            iterator, which the first pass would use up. Each validation in
            `fit`, and each `evaluate` and `predict` given this callback,
            then starts with one pass over it, once the averages are in.
            When it ends, the statistics that were in the model (the raw
            ones, or their averages under `trainable_weights_only=False`)
            are put back exactly: the recomputed ones serve that call only.
            `None` (default): the averages run with the statistics in the
            model.
        update_bn_steps: The most batches of `update_bn_data` to use per
            pass, or `None` (default) for all.
        sigma_rel: With a `PostHocEMA` optimizer, the width whose averages
            to swap in (default: its first).

    Example:

    ```python
    opt = keras_ema.ExponentialMovingAverage("adam", average_decay=0.999)
    model.compile(optimizer=opt, loss="mse")
    model.fit(
        x, y, validation_data=(x_val, y_val), epochs=10,
        callbacks=[keras_ema.SwapAverageWeights(log_raw_metrics=True)],
    )
    model.predict(x_val, callbacks=[keras_ema.SwapAverageWeights()])
    # SWA: validate with BatchNorm statistics recomputed for the averages.
    model.fit(
        x, y, validation_data=(x_val, y_val), epochs=10,
        callbacks=[keras_ema.SwapAverageWeights(update_bn_data=x)],
    )
    # Stop early, ending with the best averages in the model.
    model.fit(
        x, y, validation_data=(x_val, y_val), epochs=10,
        callbacks=[
            keras_ema.SwapAverageWeights(swap_on_epoch=True),
            keras.callbacks.EarlyStopping(restore_best_weights=True),
        ],
    )
    ```
    """

    def __init__(
        self,
        swap_on_epoch=False,
        end_with_averages=False,
        log_raw_metrics=False,
        update_bn_data=None,
        update_bn_steps=None,
        sigma_rel=None,
    ):
        super().__init__()
        for name, value in (
            ("swap_on_epoch", swap_on_epoch),
            ("end_with_averages", end_with_averages),
            ("log_raw_metrics", log_raw_metrics),
        ):
            if not isinstance(value, bool):
                raise ValueError(
                    f"SwapAverageWeights requires `{name}` to be True or "
                    f"False. Received: {name}={value!r}."
                )
        self.swap_on_epoch = swap_on_epoch
        self.end_with_averages = end_with_averages
        self.log_raw_metrics = log_raw_metrics
        self.sigma_rel = sigma_rel
        # What `swap_weights` and `averaged_weights` are given.
        self._which = {} if sigma_rel is None else {"sigma_rel": sigma_rel}
        self.update_bn_data = update_bn_data
        self.update_bn_steps = batch_norm.check_options(
            update_bn_data, update_bn_steps, "SwapAverageWeights"
        )
        self._call = None
        self._validating = False

    # -- fit ------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._end_call()
        opt = find_in_model(self.model, "SwapAverageWeights")
        opt.shadow_copy(self.model)
        _swap_out(opt)
        if self._which:
            _check_sigma_rel(opt, self.sigma_rel, "SwapAverageWeights")
        if self.update_bn_data is not None:
            batch_norm.check_has_layers(self.model, "SwapAverageWeights")
        _binding.install_validation(self.model, self, self._validate)

    def _check_order(self, callbacks):
        """Raises if an `EarlyStopping(restore_best_weights=True)` in the
        fit's `callbacks` would restore raw weights over the averages."""
        mine = next(i for i, c in enumerate(callbacks) if c is self)
        for i, callback in enumerate(callbacks):
            if not (
                isinstance(callback, keras.callbacks.EarlyStopping)
                and callback.restore_best_weights
            ):
                continue
            if i < mine and self.swap_on_epoch:
                raise ValueError(
                    "SwapAverageWeights(swap_on_epoch=True) does not support "
                    "EarlyStopping(restore_best_weights=True) before it in "
                    "`callbacks`: EarlyStopping would record the raw weights "
                    "at each epoch end, then restore them over the averages. "
                    "Instead, place SwapAverageWeights before EarlyStopping, "
                    "which then records and restores the best averages."
                )
            if i > mine and self.end_with_averages and not self.swap_on_epoch:
                raise ValueError(
                    "SwapAverageWeights(end_with_averages=True) does not "
                    "support EarlyStopping(restore_best_weights=True) after "
                    "it in `callbacks` without `swap_on_epoch=True`: "
                    "EarlyStopping would restore the best raw weights over "
                    "the averages. Instead, place SwapAverageWeights after "
                    "EarlyStopping, to swap the averages in over the best raw "
                    "weights, or set `swap_on_epoch=True` to restore the best "
                    "averages."
                )

    def on_epoch_begin(self, epoch, logs=None):
        _swap_out(find_in_model(self.model, "SwapAverageWeights"))

    def on_epoch_end(self, epoch, logs=None):
        if self.swap_on_epoch:
            _swap_in(find_in_model(self.model, "SwapAverageWeights"),
                     self._which)

    def on_train_end(self, logs=None):
        _binding.remove_validation(self.model, self)
        opt = find_in_model(self.model, "SwapAverageWeights")
        if self.end_with_averages:
            _swap_in(opt, self._which)
        else:
            _swap_out(opt)

    def _validate(self, evaluate, fit_callbacks, *args, **kwargs):
        """Validation inside `fit` (`model.evaluate`, wrapped until
        `on_train_end`), on the averages; `fit_callbacks` are the fit's."""
        try:
            self._check_order(fit_callbacks)
        except ValueError:
            _binding.remove_validation(self.model, self)
            raise
        opt = find_in_model(self.model, "SwapAverageWeights")
        raw = None
        if self.log_raw_metrics:
            # Quietly and without the fit's callbacks: they should see one
            # validation per epoch, the one on the averages.
            quiet = {**kwargs, "callbacks": None, "verbose": 0}
            raw = evaluate(*args, **quiet)
        with opt.averaged_weights(**self._which):
            saved = self._record_statistics()
            try:
                self._validating = True
                self._update_bn()
                logs = evaluate(*args, **kwargs)
            finally:
                self._validating = False
                _binding.reattach(self.model)
                batch_norm.put_back(saved)
        if raw is not None:
            logs.update({f"raw_{name}": value for name, value in raw.items()})
        return logs

    # -- BatchNormalization statistics (`update_bn_data`) ---------------------

    def _record_statistics(self):
        """Copies of the statistics `_update_bn` would overwrite."""
        if self.update_bn_data is None:
            return []
        return batch_norm.record_statistics(self.model)

    def _update_bn(self):
        if self.update_bn_data is not None:
            batch_norm.update_bn(
                self.model, self.update_bn_data, self.update_bn_steps
            )

    # -- evaluate and predict -------------------------------------------------

    def on_test_begin(self, logs=None):
        # Within fit's validation the averages are in already; this then
        # swaps nothing, and leaves swapping back to `_validate`.
        self._begin_call("test_function")

    def on_test_end(self, logs=None):
        self._end_call()

    def on_predict_begin(self, logs=None):
        self._begin_call("predict_function")

    def on_predict_end(self, logs=None):
        self._end_call()

    def _begin_call(self, name):
        self._end_call()
        opt = find_in_model(self.model, "SwapAverageWeights")
        swapped = _swap_in(opt, self._which)
        saved = []
        try:
            # Within fit's validation, `_validate` recomputes them.
            if not self._validating:
                saved = self._record_statistics()
                self._update_bn()
        except BaseException:
            batch_norm.put_back(saved)
            if swapped:
                _swap_out(opt)
            raise

        # A step that raises swaps back before the error leaves `evaluate`
        # or `predict`. On JAX the step gets the model's state (its variables
        # are empty meanwhile): that state goes back into them, unless the
        # failed step consumed it.
        def on_error(args):
            _binding.reattach(self.model, args[0] if args else ())
            self._end_call()

        _binding.guard_function(self.model, name, on_error)
        self._call = (opt, name, swapped, saved)

    def _end_call(self):
        if self._call is None:
            return
        opt, name, swapped, saved = self._call
        self._call = None
        _binding.unguard_function(self.model, name)
        # A call that an error ended outside the steps (another callback)
        # left the state of its last step outside the variables on JAX.
        _binding.reattach(self.model)
        batch_norm.put_back(saved)
        # Only what this call swapped in, and only if it still is in: a call
        # that ended by an error elsewhere is cleaned up later, safely.
        if swapped:
            _swap_out(opt)


def _swap_in(opt, which):
    """Swaps the averages in unless they are; returns whether it did."""
    if opt.averages_swapped_in:
        return False
    opt.swap_weights(**which)
    return True


def _check_sigma_rel(opt, sigma_rel, owner):
    """Raises unless `opt` keeps the average of `sigma_rel`."""
    if not hasattr(opt, "sigma_rels"):
        raise ValueError(
            f"{owner} does not support `sigma_rel` with an optimizer that "
            "keeps one average. Instead, leave `sigma_rel=None`, or train "
            "with `keras_ema.PostHocEMA`."
        )
    opt.profile(sigma_rel)  # raises for an untracked width


def _swap_out(opt):
    if opt.averages_swapped_in:
        opt.swap_weights()
