"""`update_bn` and `SwapAverageWeights(update_bn_data=...)` in real models."""

import keras
import numpy as np
import pytest
from conftest import bits, numpy, regression_data, sync, tensor

import keras_ema
from keras_ema import SwapAverageWeights
from keras_ema.batch_norm import update_bn

X, Y = regression_data(70)  # batches of 16: the last one holds 6
X_VAL, Y_VAL = regression_data(24, seed=1)
FIT = dict(batch_size=16, shuffle=False, verbose=0)


def _dense_model(dropout=False):
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
    if dropout:
        layers.append(keras.layers.Dropout(0.3, seed=1))
    layers += [keras.layers.BatchNormalization(), keras.layers.Dense(1)]
    return keras.Sequential(layers)


def _nested_model():
    inner = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(5, activation="relu"),
        keras.layers.BatchNormalization(epsilon=1e-2),
    ], name="inner")
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6),
        keras.layers.BatchNormalization(),
        inner,
        keras.layers.Dense(1),
    ])


def _batches(x, batch_size=16):
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


def _moments(inputs, axes=(0,)):
    """Means over the batches of the batch mean and biased variance."""
    inputs = [np.asarray(h, np.float64) for h in inputs]
    means = np.mean([h.mean(axis=axes) for h in inputs], axis=0)
    variances = np.mean([h.var(axis=axes) for h in inputs], axis=0)
    return means, variances


def _check_statistics(layer, inputs, axes=(0,)):
    mean, variance = _moments(inputs, axes)
    np.testing.assert_allclose(numpy(layer.moving_mean), mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(numpy(layer.moving_variance), variance,
                               rtol=1e-5, atol=1e-6)


def _dense(layer, h):
    """A Dense layer's output (linear or relu), in NumPy."""
    out = h @ numpy(layer.kernel).astype(np.float64) + numpy(layer.bias)
    if layer.activation is keras.activations.relu:
        return np.maximum(out, 0)
    return out


def _normalize(layer, h):
    """A BatchNormalization layer's output in training mode, in NumPy."""
    h = np.asarray(h, np.float64)
    mean, variance = h.mean(axis=0), h.var(axis=0)
    normalized = (h - mean) / np.sqrt(variance + layer.epsilon)
    return normalized * numpy(layer.gamma) + numpy(layer.beta)


def _states(variables):
    return [bits(v) for v in variables]


def _assert_same(before, variables):
    for old, variable in zip(before, variables):
        np.testing.assert_array_equal(old, bits(variable), err_msg=variable.path)


def _statistics(model):
    return [
        v for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
        for v in (layer.moving_mean, layer.moving_variance)
    ]


def _other_variables(model):
    ids = {id(v) for v in _statistics(model)}
    return [v for v in model.variables if id(v) not in ids]


# -- the statistics ------------------------------------------------------------


def test_statistics_are_the_means_over_batches_of_the_batch_moments():
    model = _dense_model()
    bn = model.layers[1]
    # The old statistics play no part, not even non-finite ones.
    bn.moving_mean.assign(np.full(8, np.nan, "float32"))
    bn.moving_variance.assign(np.full(8, np.inf, "float32"))
    assert update_bn(model, X, batch_size=16) == 5
    _check_statistics(bn, [_dense(model.layers[0], x) for x in _batches(X)])
    assert bn.momentum == 0.99


def test_nested_and_stacked_layers_each_get_the_statistics_of_their_input():
    model = _nested_model()
    dense, bn1, inner = model.layers[:3]
    dense2, bn2 = inner.layers
    assert update_bn(model, [(x, None) for x in _batches(X)]) == 5
    first = [_dense(dense, x) for x in _batches(X)]
    _check_statistics(bn1, first)
    # The inner layer sees the outer one's output in training mode, which
    # normalizes each batch with its own statistics.
    _check_statistics(bn2, [_dense(dense2, _normalize(bn1, h)) for h in first])


def test_conv2d_channels_last_statistics_reduce_over_batch_and_space():
    rng = np.random.default_rng(2)
    images = rng.normal(size=(20, 6, 6, 2)).astype("float32")
    model = keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(3, 3),
        keras.layers.BatchNormalization(axis=-1),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(1),
    ])
    conv = keras.Model(model.inputs[0], model.layers[0].output)
    assert update_bn(model, images, batch_size=8) == 3
    features = [numpy(conv(x)) for x in _batches(images, 8)]
    _check_statistics(model.layers[1], features, axes=(0, 1, 2))


def test_steps_uses_only_the_first_batches():
    model = _dense_model()
    assert update_bn(model, X, steps=2, batch_size=16) == 2
    first_two = [_dense(model.layers[0], x) for x in _batches(X)[:2]]
    _check_statistics(model.layers[1], first_two)


class _Batches(keras.utils.PyDataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return X[16 * i:16 * (i + 1)], Y[16 * i:16 * (i + 1)]


def _data_forms():
    import tensorflow as tf

    return {
        "array": X,
        "tensor": tensor(X),
        "x_y": (X, Y),
        "x_y_weights": (X, Y, np.ones(len(X), "float32")),
        "list_of_batches": _batches(X),
        "list_of_x_y": [[x, y] for x, y in zip(_batches(X), _batches(Y))],
        "py_dataset": _Batches(),
        "tf_data": tf.data.Dataset.from_tensor_slices((X, Y)).batch(16),
    }


def test_every_form_of_data_gives_the_same_statistics():
    model = _dense_model()
    update_bn(model, (x for x in _batches(X)))  # a generator
    expected = _states(_statistics(model))
    for name, data in _data_forms().items():
        assert update_bn(model, data, batch_size=16) == 5, name
        for old, v in zip(expected, _statistics(model)):
            np.testing.assert_allclose(
                old.view("float32"), numpy(v), rtol=1e-6, err_msg=name
            )


def test_mixed_float16_statistics_are_those_of_the_float16_inputs():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    model = _dense_model()
    bn = model.layers[1]
    update_bn(model, X, batch_size=16)
    assert bn.moving_mean.dtype == "float32"
    features = keras.Model(model.inputs[0], model.layers[0].output)
    inputs = [numpy(features(x)).astype(np.float32) for x in _batches(X)]
    _check_statistics(bn, inputs)


class _Subclassed(keras.Model):
    """A model whose `call` takes no `training`: its layers get it from the
    call context."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(8, activation="relu")
        self.bn = keras.layers.BatchNormalization()
        self.frozen = keras.layers.BatchNormalization()
        self.frozen.trainable = False

    def call(self, x):
        return self.frozen(self.bn(self.dense(x)))


def test_a_subclassed_model_is_updated_and_frozen_layers_are_kept():
    model = _Subclassed()
    model(X[:2])
    frozen = _states([model.frozen.moving_mean, model.frozen.moving_variance])
    update_bn(model, X, batch_size=16)
    _check_statistics(model.bn, [_dense(model.dense, x) for x in _batches(X)])
    _assert_same(frozen, [model.frozen.moving_mean,
                          model.frozen.moving_variance])


# -- nothing else changes -----------------------------------------------------


def _trained(dropout=True, **ema_kwargs):
    model = _dense_model(dropout=dropout)
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05, momentum=0.9), average_decay=0.9,
        **ema_kwargs,
    )
    model.compile(optimizer=opt, loss="mse", metrics=["mae"])
    model.fit(X, Y, epochs=1, **FIT)
    return model, opt


def test_no_other_variable_changes_bit_for_bit():
    model, opt = _trained(dropout=True)
    others = _other_variables(model) + opt.variables + model.metrics_variables
    assert any("seed" in v.path for v in others)
    before = _states(others)
    stats = _states(_statistics(model))
    update_bn(model, X)
    _assert_same(before, others)
    assert all((old != bits(v)).any()
               for old, v in zip(stats, _statistics(model)))


def _failing(exception, after=3):
    for i, x in enumerate(_batches(X)):
        if i == after:
            raise exception
        yield x


@pytest.mark.parametrize("exception", [RuntimeError("data"),
                                       KeyboardInterrupt()])
def test_an_error_mid_pass_leaves_every_variable_as_it_was(exception):
    model = _dense_model(dropout=True)
    before = _states(model.variables)
    with pytest.raises(type(exception)):
        update_bn(model, _failing(exception))
    _assert_same(before, model.variables)
    assert model.layers[2].momentum == 0.99


def test_errors_name_the_problem_and_the_fix():
    with pytest.raises(ValueError, match="without BatchNormalization"):
        update_bn(keras.Sequential([keras.Input((4,)),
                                    keras.layers.Dense(1)]), X)
    model = _dense_model()
    for empty in (X[:0], [], iter([])):
        with pytest.raises(ValueError, match="empty `data`"):
            update_bn(model, empty)
    lazy = keras.Sequential([keras.layers.Dense(3),
                             keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="not built"):
        update_bn(lazy, X)
    with pytest.raises(ValueError, match="`steps` to be an integer >= 1"):
        update_bn(model, X, steps=0)
    with pytest.raises(ValueError, match="does not support `data` of type"):
        update_bn(model, 3.0)


# -- with the averages (SWA) --------------------------------------------------


def _swa_decay():
    if hasattr(keras_ema.schedules, "Uniform"):
        return keras_ema.schedules.Uniform()
    return keras_ema.schedules.Constant(0.9)


def test_swa_recomputes_the_statistics_of_the_averaged_weights():
    model = _dense_model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=_swa_decay(),
        trainable_weights_only=False,
    )
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    model.fit(X, Y, epochs=2, **FIT)
    dense, bn = model.layers[:2]
    raw = _states(model.variables)
    with opt.averaged_weights():
        averaged_kernel = numpy(dense.kernel)
        assert update_bn(model, X) == 3  # batches of 32: 32, 32 and 6
        _check_statistics(bn, [_dense(dense, x) for x in _batches(X, 32)])
        recomputed = _states([bn.moving_mean, bn.moving_variance])
    assert (bits(dense.kernel) != bits(averaged_kernel)).any()
    # The swap back puts the raw weights and raw statistics back; the
    # recomputed statistics replaced their averages.
    _assert_same(raw, model.variables)
    _assert_same(recomputed, [opt.average(bn.moving_mean),
                              opt.average(bn.moving_variance)])


# -- SwapAverageWeights(update_bn_data=...) -----------------------------------


class _RecordBeforeValidation(keras.callbacks.Callback):
    """Records, after each batch, what validation must leave unchanged, and
    compares it at the epoch end, after validation."""

    def __init__(self, opt):
        super().__init__()
        self.opt = opt

    def _watched(self):
        stats = _statistics(self.model)
        averages = [self.opt.average(v) for v in stats]
        return stats + [a for a in averages if a is not None] + list(
            self.model.trainable_variables
        )

    def on_train_batch_end(self, batch, logs=None):
        sync(self.model)
        self.before = _states(self._watched())

    def on_epoch_end(self, epoch, logs=None):
        _assert_same(self.before, self._watched())
        self.checked = True


def _expected_val_loss(model, opt):
    """Validation on the averages with recomputed statistics, by hand."""
    with opt.averaged_weights():
        saved = [np.array(numpy(v)) for v in _statistics(model)]
        update_bn(model, X)
        loss = model.evaluate(X_VAL, Y_VAL, verbose=0, return_dict=True)
        for v, value in zip(_statistics(model), saved):
            v.assign(value)
    return loss["loss"]


@pytest.mark.parametrize("trainable_weights_only", [True, False])
def test_validation_runs_with_recomputed_statistics_and_changes_none(
    trainable_weights_only,
):
    model = _dense_model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=0.8,
        trainable_weights_only=trainable_weights_only,
    )
    model.compile(optimizer=opt, loss="mse")
    record = _RecordBeforeValidation(opt)
    history = model.fit(
        X, Y, epochs=1, validation_data=(X_VAL, Y_VAL),
        callbacks=[
            SwapAverageWeights(update_bn_data=X, log_raw_metrics=True),
            record,
        ],
        **FIT,
    )
    assert record.checked
    if not trainable_weights_only:
        assert opt.average(model.layers[1].moving_mean) is not None
    logs = {k: v[-1] for k, v in history.history.items()}
    raw = model.evaluate(X_VAL, Y_VAL, verbose=0, return_dict=True)["loss"]
    np.testing.assert_allclose(logs["val_raw_loss"], raw, rtol=1e-6)
    with opt.averaged_weights():
        plain = model.evaluate(X_VAL, Y_VAL, verbose=0, return_dict=True)
    expected = _expected_val_loss(model, opt)
    np.testing.assert_allclose(logs["val_loss"], expected, rtol=1e-6)
    assert not np.isclose(plain["loss"], expected, rtol=1e-4)


def test_evaluate_with_the_callback_recomputes_and_puts_back():
    model, opt = _trained(dropout=False)
    before = _states(model.variables)
    swap = SwapAverageWeights(update_bn_data=X, update_bn_steps=5)
    loss = model.evaluate(X_VAL, Y_VAL, callbacks=[swap], verbose=0)
    _assert_same(before, model.variables)
    assert not opt.averages_swapped_in
    np.testing.assert_allclose(loss[0], _expected_val_loss(model, opt),
                               rtol=1e-6)


def test_bad_update_bn_options_are_rejected():
    with pytest.raises(ValueError, match="iterator"):
        SwapAverageWeights(update_bn_data=iter(_batches(X)))
    with pytest.raises(ValueError, match="without `update_bn_data`"):
        SwapAverageWeights(update_bn_steps=3)
    with pytest.raises(ValueError, match="update_bn_steps"):
        SwapAverageWeights(update_bn_data=X, update_bn_steps=-1)
    with pytest.raises(ValueError, match="does not support `data` of type"):
        SwapAverageWeights(update_bn_data=3.0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    opt = keras_ema.ExponentialMovingAverage("sgd")
    model.compile(optimizer=opt, loss="mse")
    with pytest.raises(ValueError, match="without BatchNormalization"):
        model.fit(X, Y, epochs=1, verbose=0,
                  callbacks=[SwapAverageWeights(update_bn_data=X)])
