"""`SwapAverageWeights` and `AverageModelCheckpoint` in real fits."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, bits, regression_data, small_model, sync

import keras_ema
from keras_ema import AverageModelCheckpoint, SwapAverageWeights

X, Y = regression_data(64)
X_VAL, Y_VAL = regression_data(32, seed=1)
# A NaN in the last batch makes a model built with `check_finite` fail
# inside the compiled step.
X_NAN = X_VAL.copy()
X_NAN[-1, 0] = np.nan
FIT = dict(batch_size=16, shuffle=False, verbose=0)


def _raise_if_not_finite(value):
    if not np.all(np.isfinite(np.asarray(value))):
        raise FloatingPointError("NaN in the input")


class _CheckFinite(keras.layers.Layer):
    """Fails the step that runs it on a non-finite input, at run time.

    TensorFlow: a graph op that raises `InvalidArgumentError`. JAX: a
    `jax.debug.callback` that raises, which fails the compiled call with a
    `JaxRuntimeError`. torch runs the step eagerly: a plain Python raise.
    """

    def call(self, inputs):
        if BACKEND == "tensorflow":
            import tensorflow as tf

            return tf.debugging.check_numerics(inputs, "NaN in the input")
        if BACKEND == "jax":
            import jax

            jax.debug.callback(_raise_if_not_finite, inputs)
        elif inputs.device.type != "meta":  # torch; meta: symbolic build
            _raise_if_not_finite(keras.ops.convert_to_numpy(inputs))
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _step_error():
    """What a step that `_CheckFinite` fails raises on this backend."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.errors.InvalidArgumentError
    if BACKEND == "jax":
        import jax

        return jax.errors.JaxRuntimeError
    return FloatingPointError


def _finite_checking_model():
    return keras.Sequential([
        keras.Input((4,)),
        _CheckFinite(),
        keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(1),
    ])


def _compiled(batchnorm=False, check_finite=False, **ema_kwargs):
    keras.utils.set_random_seed(0)
    model = _finite_checking_model() if check_finite else small_model(batchnorm)
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.02), average_decay=0.9, **ema_kwargs
    )
    model.compile(optimizer=opt, loss="mse", metrics=["mae"])
    return model, opt


def _weights(model):
    return [bits(v) for v in model.weights]


def _averages(model, opt):
    averages = [opt.average(v) for v in model.weights]
    return [bits(a) for a in averages if a is not None]


def _assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


def _fit(model, callbacks=(), epochs=2, validation=True):
    return model.fit(
        X, Y, epochs=epochs, callbacks=list(callbacks),
        validation_data=(X_VAL, Y_VAL) if validation else None, **FIT,
    )


def _load_weights(path):
    model, opt = _compiled()
    # Build the optimizer first, so the file's optimizer state loads too.
    opt.shadow_copy(model)
    model.load_weights(path)
    return model


def _evaluate(model, **kwargs):
    return model.evaluate(X_VAL, Y_VAL, batch_size=16, verbose=0,
                          return_dict=True, **kwargs)


class _Record(keras.callbacks.Callback):
    """Snapshots weights and averages at the hooks it is asked to watch."""

    def __init__(self, *hooks):
        super().__init__()
        self.seen = {hook: [] for hook in hooks}
        for hook in hooks:
            setattr(self, hook, self._snapshot(hook))

    def _snapshot(self, hook):
        def record(*args, **kwargs):
            model = self.model
            # On JAX, mid-fit the state lives outside the variables.
            sync(model)
            averages = _averages(model, model.optimizer)
            self.seen[hook].append((_weights(model), averages))
        return record


class _Raise(keras.callbacks.Callback):
    def __init__(self, hook, error):
        super().__init__()
        setattr(self, hook, self._raise)
        self.error = error

    def _raise(self, *args, **kwargs):
        raise self.error("interrupted")


# -- SwapAverageWeights in fit ------------------------------------------------


def test_validation_metrics_are_those_of_the_averages_and_raw_ones_are_logged():
    model, opt = _compiled()
    history = _fit(model, [SwapAverageWeights(log_raw_metrics=True)]).history
    assert sorted(history) == [
        "loss", "mae", "val_loss", "val_mae", "val_raw_loss", "val_raw_mae"
    ]
    raw = _evaluate(model)
    with opt.averaged_weights():
        averaged = _evaluate(model)
    assert history["val_loss"][-1] == averaged["loss"]
    assert history["val_mae"][-1] == averaged["mae"]
    assert history["val_raw_loss"][-1] == raw["loss"]
    assert history["val_raw_mae"][-1] == raw["mae"]
    assert abs(averaged["loss"] - raw["loss"]) > 1e-3


def _early_stop():
    return keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=0, min_delta=1e9
    )


class _StopMidEpoch(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        sync(self.model)
        if self.model.optimizer.iterations.numpy() == 6:
            self.model.stop_training = True


@pytest.mark.parametrize(
    "swap_on_epoch, stopper",
    [(False, None), (True, None), (False, _early_stop), (True, _early_stop),
     (True, _StopMidEpoch)],
)
def test_fit_ends_with_the_raw_weights_bit_for_bit_as_without_the_callback(
    swap_on_epoch, stopper
):
    stop = [] if stopper is None else [stopper()]
    reference, ref_opt = _compiled()
    _fit(reference, stop, epochs=4)
    model, opt = _compiled()
    stop = [] if stopper is None else [stopper()]
    history = _fit(model, [SwapAverageWeights(swap_on_epoch)] + stop, epochs=4)
    assert len(history.epoch) == len(reference.history.epoch) < 5
    assert not opt.averages_swapped_in
    assert "evaluate" not in vars(model)
    _assert_same(_weights(model), _weights(reference))
    _assert_same(_averages(model, opt), _averages(reference, ref_opt))


@pytest.mark.parametrize(
    "failure",
    ["RuntimeError in a callback", "KeyboardInterrupt", "bad step"],
)
def test_raw_weights_come_back_when_validation_raises(failure):
    model, opt = _compiled(check_finite=True)
    record = _Record("on_train_batch_end")
    callbacks = [SwapAverageWeights(), record]
    validation_data = (X_VAL, Y_VAL)
    error = RuntimeError
    if failure == "KeyboardInterrupt":
        error = KeyboardInterrupt
    if failure == "bad step":
        validation_data = (X_NAN, Y_VAL)
        error = _step_error()
    else:
        callbacks.append(_Raise("on_test_batch_begin", error))
    with pytest.raises(error):
        model.fit(X, Y, validation_data=validation_data, callbacks=callbacks,
                  **FIT)
    raw, averages = record.seen["on_train_batch_end"][-1]
    assert not opt.averages_swapped_in
    _assert_same(_weights(model), raw)
    # Known JAX limitation: the trainer donates the state buffers to each
    # compiled step, and a step that fails invalidates them; during the
    # validation those buffers hold the averages, which are lost. The raw
    # weights wait in the optimizer's slots and come back (asserted above).
    # An error raised from Python between steps loses nothing anywhere.
    if not (BACKEND == "jax" and failure == "bad step"):
        _assert_same(_averages(model, opt), averages)
    # The wrapper left by the failed fit validates a later fit on the raw
    # weights, and removes itself.
    history = _fit(model, epochs=1).history
    assert "evaluate" not in vars(model)
    assert history["val_loss"][-1] == _evaluate(model)["loss"]


def test_swap_on_epoch_shows_the_averages_to_the_callbacks_after_it(tmp_path):
    model, opt = _compiled()
    before, after = _Record("on_epoch_end"), _Record("on_epoch_end")
    path = str(tmp_path / "epoch{epoch}.weights.h5")
    checkpoint = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
    _fit(model, [before, SwapAverageWeights(swap_on_epoch=True), after,
                 checkpoint], epochs=3)
    for (_, averages), (weights, _) in zip(
        before.seen["on_epoch_end"], after.seen["on_epoch_end"]
    ):
        _assert_same(weights, averages)
    saved = _load_weights(path.format(epoch=3))
    _assert_same(_weights(saved), before.seen["on_epoch_end"][-1][1])


def test_end_with_averages_leaves_the_averages_in_the_model():
    reference, ref_opt = _compiled()
    _fit(reference)
    model, opt = _compiled()
    _fit(model, [SwapAverageWeights(end_with_averages=True)])
    assert opt.averages_swapped_in
    _assert_same(_weights(model), _averages(reference, ref_opt))
    opt.swap_weights()
    _assert_same(_weights(model), _weights(reference))


def test_restore_best_weights_after_it_restores_the_best_averages():
    model, opt = _compiled()
    record = _Record("on_epoch_end")
    # mode="max" on a falling loss makes the first epoch the best one.
    early = keras.callbacks.EarlyStopping(
        monitor="val_loss", mode="max", patience=9, restore_best_weights=True
    )
    _fit(model, [record, SwapAverageWeights(swap_on_epoch=True), early],
         epochs=3)
    assert early.best_epoch == 0
    assert not opt.averages_swapped_in
    _assert_same(_weights(model), record.seen["on_epoch_end"][0][1])


def test_finds_the_averages_under_mixed_float16():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    model, opt = _compiled()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = _fit(model, [SwapAverageWeights()]).history
    assert not opt.averages_swapped_in
    with opt.averaged_weights():
        assert history["val_loss"][-1] == _evaluate(model)["loss"]


def test_fit_creates_the_batchnorm_averages_without_shadow_copy():
    model, opt = _compiled(batchnorm=True, trainable_weights_only=False)
    history = _fit(model, [SwapAverageWeights()]).history
    mean = model.layers[1].moving_mean
    assert opt.average(mean) is not None
    assert np.abs(opt.average(mean).numpy() - mean.numpy()).max() > 1e-4
    with opt.averaged_weights():
        assert history["val_loss"][-1] == _evaluate(model)["loss"]


# -- SwapAverageWeights in evaluate and predict -------------------------------


def test_evaluate_and_predict_run_on_the_averages_and_swap_back():
    model, opt = _compiled()
    _fit(model, validation=False)
    raw = _weights(model)
    with opt.averaged_weights():
        expected = _evaluate(model)
        predictions = model.predict(X_VAL, verbose=0)
    assert _evaluate(model, callbacks=[SwapAverageWeights()]) == expected
    _assert_same(_weights(model), raw)
    on_averages = model.predict(
        X_VAL, verbose=0, callbacks=[SwapAverageWeights()]
    )
    np.testing.assert_array_equal(bits(on_averages), bits(predictions))
    _assert_same(_weights(model), raw)
    assert not opt.averages_swapped_in


@pytest.mark.parametrize("method", ["evaluate", "predict"])
def test_a_step_that_raises_in_evaluate_or_predict_swaps_back(method):
    model, opt = _compiled(check_finite=True)
    _fit(model, validation=False)
    raw = _weights(model)
    name = "test_function" if method == "evaluate" else "predict_function"
    data = (X_VAL,) if method == "predict" else (X_VAL, Y_VAL)
    getattr(model, method)(*data, verbose=0)
    function = getattr(model, name)
    data = (X_NAN,) if method == "predict" else (X_NAN, Y_VAL)
    with pytest.raises(_step_error(), match="NaN"):
        getattr(model, method)(*data, batch_size=16, verbose=0,
                               callbacks=[SwapAverageWeights()])
    assert not opt.averages_swapped_in
    assert getattr(model, name) is function
    # On JAX the averages of this moment are lost (the failed step consumed
    # their donated buffers; see the validation test above): the raw weights
    # come back, which is all this test asserts on every backend.
    _assert_same(_weights(model), raw)


def test_an_error_outside_the_steps_is_undone_by_the_next_use():
    model, opt = _compiled()
    _fit(model, validation=False)
    raw = _weights(model)
    with opt.averaged_weights():
        predictions = model.predict(X_VAL, verbose=0)
    swap = SwapAverageWeights()
    with pytest.raises(RuntimeError):
        model.predict(X_VAL, verbose=0, callbacks=[
            swap, _Raise("on_predict_batch_end", RuntimeError)
        ])
    # The documented gap: the averages are still in, and the state says so.
    assert opt.averages_swapped_in
    on_averages = model.predict(X_VAL, verbose=0, callbacks=[swap])
    np.testing.assert_array_equal(bits(on_averages), bits(predictions))
    assert not opt.averages_swapped_in
    assert not hasattr(model.predict_function, "_keras_ema_original")
    _assert_same(_weights(model), raw)


def test_a_model_without_averages_gets_an_error_naming_the_fix(tmp_path):
    model = small_model()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="ExponentialMovingAverage"):
        _fit(model, [SwapAverageWeights()])
    with pytest.raises(ValueError, match="ExponentialMovingAverage"):
        _fit(model, [AverageModelCheckpoint(str(tmp_path / "a.keras"))])
    assert model.optimizer.iterations.numpy() == 0


def test_bad_flags_are_rejected():
    with pytest.raises(ValueError, match="swap_on_epoch=1"):
        SwapAverageWeights(swap_on_epoch=1)
    with pytest.raises(ValueError, match="update_weights='yes'"):
        AverageModelCheckpoint("a.keras", update_weights="yes")


# -- AverageModelCheckpoint ---------------------------------------------------


@pytest.mark.parametrize("filename", ["ema.keras", "ema.weights.h5"])
def test_checkpoint_holds_the_averages_and_training_is_untouched(
    tmp_path, filename
):
    reference, ref_opt = _compiled()
    _fit(reference)
    model, opt = _compiled()
    path = str(tmp_path / filename)
    _fit(model, [AverageModelCheckpoint(
        path, save_weights_only=filename.endswith(".weights.h5")
    )])
    _assert_same(_weights(model), _weights(reference))
    _assert_same(_averages(model, opt), _averages(reference, ref_opt))
    if filename.endswith(".keras"):
        saved = keras.models.load_model(path)
    else:
        saved = _load_weights(path)
    _assert_same(_weights(saved), _averages(reference, ref_opt))
    # The optimizer state in the file records the swap, so the file also
    # resumes training from the raw weights.
    assert saved.optimizer.averages_swapped_in
    _assert_same(_averages(saved, saved.optimizer), _weights(reference))


def test_save_best_only_is_judged_on_the_averages(tmp_path):
    model, opt = _compiled()
    record = _Record("on_epoch_end")
    path = str(tmp_path / "best.weights.h5")
    # mode="max" on a falling loss makes the first epoch the best one.
    checkpoint = AverageModelCheckpoint(
        path, monitor="val_loss", mode="max", save_best_only=True,
        save_weights_only=True,
    )
    history = _fit(model, [record, checkpoint,
                           SwapAverageWeights(log_raw_metrics=True)], epochs=3)
    assert checkpoint.best == history.history["val_loss"][0]
    assert checkpoint.best != history.history["val_raw_loss"][0]
    saved = _load_weights(path)
    _assert_same(_weights(saved), record.seen["on_epoch_end"][0][1])


def test_save_best_only_without_averaged_validation_is_an_error(tmp_path):
    model, opt = _compiled()
    path = str(tmp_path / "best.keras")
    with pytest.raises(ValueError, match="SwapAverageWeights"):
        _fit(model, [AverageModelCheckpoint(path, save_best_only=True)])
    assert opt.iterations.numpy() == 0
    with pytest.raises(ValueError, match="monitor='loss'"):
        AverageModelCheckpoint(path, monitor="loss", save_best_only=True)
    checkpoint = AverageModelCheckpoint(
        path, monitor="val_raw_loss", save_best_only=True
    )
    with pytest.raises(ValueError, match="monitor='val_raw_loss'"):
        _fit(model, [SwapAverageWeights(log_raw_metrics=True), checkpoint])


@pytest.mark.parametrize("swap_on_epoch_first", [False, True])
def test_update_weights_continues_training_from_the_averages(
    tmp_path, swap_on_epoch_first
):
    model, opt = _compiled()
    record = _Record("on_epoch_begin", "on_epoch_end")
    path = str(tmp_path / "ema.weights.h5")
    checkpoint = AverageModelCheckpoint(
        path, update_weights=True, save_weights_only=True
    )
    swap = []
    if swap_on_epoch_first:
        swap = [SwapAverageWeights(swap_on_epoch=True)]
    _fit(model, [record] + swap + [checkpoint])
    second_epoch_start = record.seen["on_epoch_begin"][1][0]
    _assert_same(second_epoch_start, record.seen["on_epoch_end"][0][1])
    assert not opt.averages_swapped_in
    _assert_same(_weights(model), record.seen["on_epoch_end"][-1][1])
    _assert_same(_weights(model), _averages(model, opt))
    saved = _load_weights(path)
    _assert_same(_weights(saved), _weights(model))
