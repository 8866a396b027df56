"""Callbacks that validate and checkpoint on the averaged weights."""

import warnings

import keras

from keras_ema.optimizer import find_in_model


class SwapAverageWeights(keras.callbacks.Callback):
    """Runs validation, `evaluate` and `predict` on the averaged weights.

    Inside `fit`, validation runs on the averages, and the training weights
    are back, bit for bit, when it ends, also when it raises (an error, a
    `KeyboardInterrupt`): for the duration of `fit`, the model's `evaluate`,
    which `fit` validates with, runs inside `averaged_weights()`. Passed to
    `evaluate` or `predict`, it swaps the averages in for that call, and back
    at its end or when a compiled step raises. An error outside the steps
    (another callback, `predict`'s input pipeline) can leave the averages in:
    `averages_swapped_in` says so, and the next use of this callback, or any
    `fit` with one, swaps them out. The fully exception-safe form is
    `with opt.averaged_weights(): model.predict(x)`.

    With `swap_on_epoch=True` the averages also stay in the model from the
    end of each epoch until the next one begins, so the callbacks placed
    after this one (`ModelCheckpoint`, `EarlyStopping` with
    `restore_best_weights=True`) see them. Whenever training starts or an
    epoch begins with the averages in, e.g. after `BackupAndRestore` restored
    a backup written while they were, they are swapped out first: training
    never runs on the averages. With `trainable_weights_only=False`, `fit`
    creates the averages of the non-trainable variables by itself
    (`shadow_copy(model)`).

    Args:
        swap_on_epoch: If `True`, the averages stay in the model between
            epochs, for the callbacks that come after this one.
        end_with_averages: If `True`, `fit` ends with the averages in the
            model (`averages_swapped_in` is `True`; the raw weights stay in
            the optimizer). Else it ends with the raw weights.
        log_raw_metrics: If `True`, validation also runs on the raw weights
            and logs those metrics as `val_raw_<name>` next to the
            `val_<name>` measured on the averages.

    Example:

    ```python
    opt = keras_ema.ExponentialMovingAverage("adam", average_decay=0.999)
    model.compile(optimizer=opt, loss="mse")
    model.fit(
        x, y, validation_data=(x_val, y_val), epochs=10,
        callbacks=[
            keras_ema.SwapAverageWeights(log_raw_metrics=True),
            keras.callbacks.EarlyStopping(restore_best_weights=True),
        ],
    )
    model.predict(x_val, callbacks=[keras_ema.SwapAverageWeights()])
    ```
    """

    def __init__(
        self,
        swap_on_epoch=False,
        end_with_averages=False,
        log_raw_metrics=False,
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
        self._call = None

    # -- fit ------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self._end_call()
        opt = find_in_model(self.model, "SwapAverageWeights")
        opt.shadow_copy(self.model)
        _swap_out(opt)
        _uninstall(self.model)
        self._install()

    def on_epoch_begin(self, epoch, logs=None):
        _swap_out(find_in_model(self.model, "SwapAverageWeights"))

    def on_epoch_end(self, epoch, logs=None):
        if self.swap_on_epoch:
            _swap_in(find_in_model(self.model, "SwapAverageWeights"))

    def on_train_end(self, logs=None):
        _uninstall(self.model, owner=self)
        opt = find_in_model(self.model, "SwapAverageWeights")
        if opt.averages_swapped_in != self.end_with_averages:
            opt.swap_weights()

    def _install(self):
        # `fit` has no try/finally, so hooks alone cannot swap back when
        # validation raises; but it validates through `self.evaluate`, an
        # instance attribute lookup, which this wraps until `on_train_end`.
        model = self.model
        evaluate = model.evaluate

        def evaluate_on_averages(*args, **kwargs):
            callbacks = kwargs.get("callbacks")
            if not isinstance(callbacks, keras.callbacks.CallbackList):
                return evaluate(*args, **kwargs)
            if self not in callbacks.callbacks:
                # The validation of a fit without this callback: the fit
                # that installed the wrapper raised before `on_train_end`.
                _uninstall(model)
                return evaluate(*args, **kwargs)
            return self._validate(evaluate, *args, **kwargs)

        evaluate_on_averages._keras_ema_swap = self
        evaluate_on_averages._keras_ema_previous = vars(model).get("evaluate")
        model.evaluate = evaluate_on_averages

    def _validate(self, evaluate, *args, **kwargs):
        opt = find_in_model(self.model, "SwapAverageWeights")
        raw = None
        if self.log_raw_metrics:
            # Quietly and without the fit's callbacks: they should see one
            # validation per epoch, the one on the averages.
            quiet = {**kwargs, "callbacks": None, "verbose": 0}
            raw = evaluate(*args, **quiet)
        with opt.averaged_weights():
            try:
                logs = evaluate(*args, **kwargs)
            finally:
                _reattach(self.model)
        if raw is not None:
            logs.update({f"raw_{name}": value for name, value in raw.items()})
        return logs

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
        function = getattr(self.model, name)
        function = getattr(function, "_keras_ema_original", function)
        swapped = _swap_in(opt)

        # A step that raises swaps back before the error leaves `evaluate`
        # or `predict`, which have no try/finally either.
        def guarded(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except BaseException:
                _reattach(self.model)
                self._end_call()
                raise

        guarded._keras_ema_original = function
        setattr(self.model, name, guarded)
        self._call = (opt, name, function, swapped)

    def _end_call(self):
        if self._call is None:
            return
        opt, name, function, swapped = self._call
        self._call = None
        setattr(self.model, name, function)
        # Only what this call swapped in, and only if it still is in: a call
        # that ended by an error elsewhere is cleaned up later, safely.
        if swapped:
            _swap_out(opt)


class AverageModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Saves the averaged weights, like `ModelCheckpoint` saves the weights.

    Each save swaps the averages into the model for the save only (the whole
    model as `.keras`, or with `save_weights_only=True` the weights), so
    training continues on the raw weights, untouched; the optimizer state in
    the file records the swap, so the file also resumes training correctly.
    With `update_weights=True` the model's weights are set to their averages
    at each save opportunity instead, and training continues from them.

    With `save_best_only=True`, "best" must be measured on the averages:
    monitor a validation metric and add `SwapAverageWeights` to the same
    `fit`, so that validation runs on the averages. Other set-ups raise an
    error before training.

    Args:
        filepath: Where to save, as for `keras.callbacks.ModelCheckpoint`.
        update_weights: If `True`, overwrite the model's weights with their
            averages before each save; training continues from them. Else
            the model keeps its training weights.
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

    def __init__(self, filepath, update_weights=False, **kwargs):
        super().__init__(filepath, **kwargs)
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

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        # Here, not in `on_train_begin`: `SwapAverageWeights` may come later
        # in the callback list. Failing now costs no training time.
        find_in_model(self.model, "AverageModelCheckpoint")
        if self.save_best_only:
            self._check_monitor_on_averages()

    def _save_model(self, epoch, batch, logs):
        opt = find_in_model(self.model, "AverageModelCheckpoint")
        if self.save_best_only and self.monitor in (logs or {}):
            # Again here: a wrapper left by a fit that raised passes the
            # check above, then removes itself at the first validation.
            self._check_monitor_on_averages()
        if not self.update_weights:
            with opt.averaged_weights():
                super()._save_model(epoch, batch, logs)
            return
        # While swapped in, the optimizer holds the raw weights in place of
        # the averages: swap back before copying the averages in.
        _swap_out(opt)
        opt.assign_average_vars(
            [v for v in self.model.variables if opt.average(v) is not None]
        )
        super()._save_model(epoch, batch, logs)

    def _check_monitor_on_averages(self):
        wrapper = vars(self.model).get("evaluate")
        swap = getattr(wrapper, "_keras_ema_swap", None)
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


def _reattach(model):
    """Gives the model's variables back their values after a JAX error.

    While JAX's `evaluate` and `predict` run, the trainer keeps the model's
    state outside its variables; one that raises leaves them empty, and the
    swap back would fail.
    """
    if keras.backend.backend() != "jax":
        return
    model.jax_state_sync()
    if any(v.value.is_deleted() for v in model.variables):
        warnings.warn(
            "keras-ema: a compiled JAX step failed while the averages were "
            "swapped in, and consumed their buffers (Keras donates the state "
            "to each step). The raw weights come back; the lost averages "
            "restart from them."
        )


def _swap_in(opt):
    """Swaps the averages in unless they are; returns whether it did."""
    if opt.averages_swapped_in:
        return False
    opt.swap_weights()
    return True


def _swap_out(opt):
    if opt.averages_swapped_in:
        opt.swap_weights()


def _uninstall(model, owner=None):
    wrapper = vars(model).get("evaluate")
    swap = getattr(wrapper, "_keras_ema_swap", None)
    if swap is None or (owner is not None and swap is not owner):
        return
    previous = wrapper._keras_ema_previous
    if previous is None:
        del model.evaluate
    else:
        model.evaluate = previous
