"""The validation side of post-hoc EMA and SWA (issue 24): the best checkpoint
of one width, `update_bn` on several inputs, exporting custom layers, the
sweep's validation data, and no false "changed nothing" warning on JAX."""

import warnings

import keras
import numpy as np
import pytest
from conftest import BACKEND, bits, numpy, regression_data, sync

import keras_ema
from keras_ema.__main__ import main as cli

X, Y = regression_data(64)
X_VAL, Y_VAL = regression_data(32, seed=1)


def _model(activation="tanh"):
    return keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, activation=activation),
        keras.layers.Dense(1),
    ])


def _fitted_posthoc(directory=None, epochs=3):
    model = _model()
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model.compile(optimizer=opt, loss="mse")
    callbacks = []
    if directory is not None:
        callbacks.append(keras_ema.PostHocSnapshots(directory, every=8))
    model.fit(X, Y, batch_size=8, epochs=epochs, verbose=0,
              callbacks=callbacks)
    sync(model)
    return model, opt


def _state(model):
    return [bits(v) for v in model.variables + model.optimizer.variables]


def _assert_same(before, after):
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


# -- 1. the best checkpoint of one width is judged on that width --------------


def test_best_checkpoint_of_one_width_is_judged_on_that_width(tmp_path):
    model = _model()
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0)
    sync(model)
    path = str(tmp_path / "best.keras")
    fit = dict(validation_data=(X_VAL, Y_VAL), batch_size=8, epochs=2,
               verbose=0)
    mismatched = [
        # SwapAverageWeights validates the first width, 0.05.
        (keras_ema.SwapAverageWeights(), dict(sigma_rel=0.10)),
        (keras_ema.SwapAverageWeights(sigma_rel=0.10), {}),
        (keras_ema.SwapAverageWeights(sigma_rel=0.05), dict(sigma_rel=0.1)),
    ]
    for swap, which in mismatched:
        checkpoint = keras_ema.AverageModelCheckpoint(
            path, save_best_only=True, monitor="val_loss", **which)
        for callbacks in ([swap, checkpoint], [checkpoint, swap]):
            before = _state(model)
            with pytest.raises(ValueError, match="validation runs on those"):
                model.fit(X, Y, callbacks=callbacks, **fit)
            sync(model)
            _assert_same(before, _state(model))  # refused before a step
            assert not opt.averages_swapped_in
            assert not (tmp_path / "best.keras").exists()

    # The same width on both sides: the file holds the 0.10 averages of the
    # epoch with the best val_loss, as measured on those averages.
    seen = []

    def record(epoch, logs):
        sync(model)
        with opt.averaged_weights(sigma_rel=0.10):
            loss = model.evaluate(X_VAL, Y_VAL, verbose=0)
        seen.append((logs["val_loss"], loss,
                     [numpy(opt.average(v, sigma_rel=0.10))
                      for v in model.trainable_variables]))

    model.fit(X, Y, callbacks=[
        keras_ema.SwapAverageWeights(sigma_rel=0.10),
        keras.callbacks.LambdaCallback(on_epoch_end=record),
        keras_ema.AverageModelCheckpoint(
            path, save_best_only=True, monitor="val_loss", sigma_rel=0.1),
    ], **{**fit, "epochs": 4})
    for logged, measured, _ in seen:
        assert logged == pytest.approx(measured, rel=1e-5)
    best = min(seen, key=lambda s: s[0])[2]
    saved = keras.models.load_model(path, compile=False)
    for want, got in zip(best, saved.trainable_variables):
        np.testing.assert_array_equal(want, numpy(got))


def test_a_checkpoint_width_the_optimizer_cannot_save_is_refused_first(
        tmp_path):
    model = _model()
    model.compile(optimizer=keras_ema.ExponentialMovingAverage("sgd"),
                  loss="mse")
    path = str(tmp_path / "ckpt.keras")
    with pytest.raises(ValueError, match="one average"):
        model.fit(X, Y, epochs=1, verbose=0, callbacks=[
            keras_ema.AverageModelCheckpoint(path, sigma_rel=0.1)])
    posthoc = _model()
    posthoc.compile(optimizer=keras_ema.PostHocEMA("sgd"), loss="mse")
    with pytest.raises(ValueError, match="sigma_rel=0.07"):
        posthoc.fit(X, Y, epochs=1, verbose=0, callbacks=[
            keras_ema.AverageModelCheckpoint(path, sigma_rel=0.07)])
    for m in (model, posthoc):
        sync(m)
        assert int(numpy(m.optimizer.iterations)) == 0
    assert not (tmp_path / "ckpt.keras").exists()


# -- 2. update_bn takes every input form `fit` takes --------------------------


def _two_input_model():
    a, b = keras.Input((4,), name="a"), keras.Input((3,), name="b")
    dense_a, dense_b = keras.layers.Dense(5), keras.layers.Dense(2)
    joined = keras.layers.Concatenate()([dense_a(a), dense_b(b)])
    out = keras.layers.Dense(1)(keras.layers.BatchNormalization()(joined))
    return keras.Model([a, b], out), dense_a, dense_b


class _TwoInputBatches(keras.utils.PyDataset):
    def __init__(self, x1, x2, y):
        super().__init__()
        self.data = x1, x2, y

    def __len__(self):
        return 4

    def __getitem__(self, i):
        x1, x2, y = (d[16 * i:16 * (i + 1)] for d in self.data)
        return (x1, x2), y


def test_update_bn_takes_every_input_form_of_a_model_with_several_inputs():
    import tensorflow as tf

    model, dense_a, dense_b = _two_input_model()
    rng = np.random.default_rng(3)
    x1 = rng.normal(size=(64, 4)).astype("float32")
    x2 = rng.normal(size=(64, 3)).astype("float32")
    y = rng.normal(size=(64, 1)).astype("float32")
    w = np.ones(64, "float32")
    bn = model.layers[-2]

    def dense(layer, x):
        return x @ numpy(layer.kernel).astype("float64") + numpy(layer.bias)

    joined = np.concatenate([dense(dense_a, x1), dense(dense_b, x2)], axis=1)
    batches = [joined[i:i + 16] for i in range(0, 64, 16)]
    want_mean = np.mean([h.mean(0) for h in batches], axis=0)
    want_var = np.mean([h.var(0) for h in batches], axis=0)

    def generator():
        for i in range(0, 64, 16):
            yield [x1[i:i + 16], x2[i:i + 16]], y[i:i + 16]

    forms = {
        "([x1, x2], y)": ([x1, x2], y),
        "[x1, x2]": [x1, x2],
        "([x1, x2],)": ([x1, x2],),
        "((x1, x2), y, w)": ((x1, x2), y, w),
        "dict": {"a": x1, "b": x2},
        "(dict, y)": ({"a": x1, "b": x2}, y),
        "generator": generator(),
        "py_dataset": _TwoInputBatches(x1, x2, y),
        "tf_data": tf.data.Dataset.from_tensor_slices(
            ((x1, x2), y)).batch(16),
    }
    for name, data in forms.items():
        bn.moving_mean.assign(np.full(7, 9.0, "float32"))
        bn.moving_variance.assign(np.full(7, 9.0, "float32"))
        assert keras_ema.update_bn(model, data, batch_size=16) == 4, name
        np.testing.assert_allclose(numpy(bn.moving_mean), want_mean,
                                   rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(numpy(bn.moving_variance), want_var,
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    # As many batches as inputs: still a list of batches.
    two = [((x1[i:i + 32], x2[i:i + 32]), y[i:i + 32]) for i in (0, 32)]
    assert keras_ema.update_bn(model, two) == 2
    halves = [joined[:32], joined[32:]]
    np.testing.assert_allclose(
        numpy(bn.moving_mean), np.mean([h.mean(0) for h in halves], axis=0),
        rtol=1e-5, atol=1e-6)


# -- 3. export and load a model with an unregistered custom layer -------------


class Scale(keras.layers.Layer):
    """Not registered: `model.save` works, loading needs `custom_objects`."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],),
                                     initializer="ones")

    def call(self, x):
        return x * self.scale


def _custom_activation(x):
    return keras.ops.tanh(x)


def _custom_model(activation="relu"):
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(6, activation=activation),
        Scale(), keras.layers.Dense(1),
    ])
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=0.9)
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, Y, batch_size=16, epochs=2, verbose=0)
    sync(model)
    return model, opt


def test_export_and_load_a_model_with_an_unregistered_custom_layer(
        tmp_path, capsys):
    model, opt = _custom_model()
    averages = [bits(opt.average(v)) for v in model.trainable_variables]
    raw = [bits(v) for v in model.variables]
    with opt.averaged_weights():
        model.save(str(tmp_path / "inside.keras"))  # what must keep working

    exported = str(tmp_path / "plain.keras")
    keras_ema.export_averaged(model, exported)
    _assert_same(raw, [bits(v) for v in model.variables])
    plain = keras.models.load_model(exported, custom_objects={"Scale": Scale})
    assert isinstance(plain.layers[1], Scale)
    _assert_same(averages, [bits(v) for v in plain.trainable_variables])

    training = str(tmp_path / "training.keras")
    model.save(training)
    weights = str(tmp_path / "training.weights.h5")
    model.save_weights(weights)
    for loaded in (
        keras_ema.load_averaged(training, custom_objects={"Scale": Scale}),
        keras_ema.load_averaged(weights, model=model),
    ):
        _assert_same(averages, [bits(v) for v in loaded.trainable_variables])
    with pytest.raises(ValueError, match="class 'Scale'.*custom_objects"):
        keras_ema.load_averaged(training)
    # The command line cannot import `Scale`: one line says what to do.
    assert cli(["export", training, str(tmp_path / "cli.keras")]) == 2
    assert "register it" in capsys.readouterr().err
    assert not (tmp_path / "cli.keras").exists()


def test_export_takes_custom_objects_for_functions_the_config_names(
        tmp_path):
    model, opt = _custom_model(activation=_custom_activation)
    path = str(tmp_path / "plain.keras")
    with pytest.raises(ValueError,
                       match="function '_custom_activation'.*custom_objects"):
        keras_ema.export_averaged(model, path)
    assert not (tmp_path / "plain.keras").exists()
    objects = {"_custom_activation": _custom_activation}
    keras_ema.export_averaged(model, path, custom_objects=objects)
    plain = keras.models.load_model(
        path, custom_objects={**objects, "Scale": Scale})
    for v, w in zip(model.trainable_variables, plain.trainable_variables):
        np.testing.assert_array_equal(bits(opt.average(v)), bits(w))
    np.testing.assert_allclose(
        numpy(plain.predict(X, verbose=0)),
        numpy(_predict_with_averages(model, opt)), rtol=1e-6)

    # The command line still exports an ordinary training file.
    ordinary = _model()
    ordinary.compile(optimizer=keras_ema.ExponentialMovingAverage("sgd"),
                     loss="mse")
    ordinary.fit(X, Y, epochs=1, verbose=0)
    sync(ordinary)
    ordinary.save(str(tmp_path / "t.keras"))
    assert cli(["export", str(tmp_path / "t.keras"),
                str(tmp_path / "p.keras")]) == 0
    exported = keras.models.load_model(str(tmp_path / "p.keras"))
    for v, w in zip(ordinary.trainable_variables,
                    exported.trainable_variables):
        np.testing.assert_array_equal(
            bits(ordinary.optimizer.average(v)), bits(w))


def _predict_with_averages(model, opt):
    with opt.averaged_weights():
        return model.predict(X, verbose=0)


# -- 4. the sweep takes every validation_data form `fit` takes ----------------


class _ValBatches(keras.utils.PyDataset):
    def __init__(self, x, y, w):
        super().__init__()
        self.data = x, y, w

    def __len__(self):
        return 2

    def __getitem__(self, i):
        return tuple(d[16 * i:16 * (i + 1)] for d in self.data)


def test_sweep_takes_every_validation_data_form_of_fit(tmp_path):
    import tensorflow as tf

    directory = str(tmp_path / "snapshots")
    model, _ = _fitted_posthoc(directory)
    weights = np.linspace(0.0, 2.0, 32).astype("float32")
    widths = [0.05, 0.10]
    sweep = dict(batch_size=16, verbose=0)

    calls = []

    def batches():
        calls.append(1)
        for i in (0, 16):
            yield X_VAL[i:i + 16], Y_VAL[i:i + 16], weights[i:i + 16]

    before = [bits(v) for v in model.variables]
    reference = keras_ema.sweep_sigma_rel(
        directory, model, widths, (X_VAL, Y_VAL, weights), **sweep)
    # The sample weights count: the raw row is the weighted loss.
    assert reference.raw["loss"] == pytest.approx(model.evaluate(
        X_VAL, Y_VAL, sample_weight=weights, verbose=0), rel=1e-6)
    assert reference.raw["loss"] != pytest.approx(
        model.evaluate(X_VAL, Y_VAL, verbose=0), rel=1e-3)
    forms = {
        "list": [X_VAL, Y_VAL, weights],
        "tf_data": tf.data.Dataset.from_tensor_slices(
            (X_VAL, Y_VAL, weights)).batch(16),
        "py_dataset": _ValBatches(X_VAL, Y_VAL, weights),
        "generator function": batches,
    }
    for name, data in forms.items():
        result = keras_ema.sweep_sigma_rel(directory, model, widths, data,
                                           **sweep)
        assert result.raw["loss"] == pytest.approx(
            reference.raw["loss"], rel=1e-5), name
        for got, want in zip(result.results, reference.results):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), name
    assert len(calls) == 1 + len(widths)  # a fresh generator per evaluation
    _assert_same(before, [bits(v) for v in model.variables])

    for one_shot in (batches(), iter([(X_VAL, Y_VAL)])):
        with pytest.raises(ValueError, match="generator or iterator"):
            keras_ema.sweep_sigma_rel(directory, model, widths, one_shot,
                                      **sweep)
        with pytest.raises(ValueError, match="iterator"):
            keras_ema.sweep_sigma_rel(directory, model, widths,
                                      (X_VAL, Y_VAL), update_bn_data=one_shot,
                                      **sweep)
    _assert_same(before, [bits(v) for v in model.variables])


# -- 5. no false "changed nothing" warning on JAX -----------------------------


def test_a_fit_that_trained_never_says_it_changed_nothing():
    model = _model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=0.9)
    model.compile(optimizer=opt, loss="mse")
    fit = dict(validation_data=(X_VAL, Y_VAL), batch_size=16, verbose=0)
    for epochs in (2, 1):  # a first fit, then one after it
        sync(model)
        kernel = numpy(model.trainable_variables[0]).copy()
        iterations = int(numpy(opt.iterations))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(X, Y, epochs=epochs, callbacks=[
                keras_ema.SwapAverageWeights(swap_on_epoch=True)], **fit)
        messages = [str(w.message) for w in caught]
        assert not [m for m in messages if "changed nothing" in m], messages
        assert int(numpy(opt.iterations)) == iterations + 4 * epochs
        sync(model)
        assert not np.array_equal(numpy(model.trainable_variables[0]), kernel)

    # A fit refused because the averages are swapped in still says so.
    opt.swap_weights()
    before = _state(model)
    if BACKEND == "jax":
        with pytest.warns(UserWarning, match="this `fit` changed nothing"):
            model.fit(X, Y, epochs=1, **fit)
    else:
        with pytest.raises(Exception, match="cannot train while the averages"):
            model.fit(X, Y, epochs=1, **fit)
    sync(model)
    _assert_same(before, _state(model))
    if BACKEND != "jax":
        return
    # On JAX, a first fit refused says so when its step compiles.
    model = _model()
    opt = keras_ema.ExponentialMovingAverage("sgd", average_decay=0.9)
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    opt.swap_weights()
    before = _state(model)
    with pytest.warns(UserWarning, match="train steps change nothing"):
        model.fit(X, Y, batch_size=16, epochs=1, verbose=0)
    sync(model)
    _assert_same(before, _state(model))
