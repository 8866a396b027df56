"""Everyday Keras code works first time: lazily built models, plain
`tf.Variable`s, saves at any moment, a second model, the peers' flows."""

import copy
import pickle

import keras
import numpy as np
import pytest
from conftest import bits
from conftest import numpy
from conftest import regression_data
from conftest import sync
from conftest import tensorflow_only

import keras_ema
from keras_ema import ExponentialMovingAverage


def _lazy_model(batchnorm=False, dropout=False):
    """A `Sequential` without `Input`: its weights exist after a call."""
    layers = [keras.layers.Dense(8, activation="relu")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    if dropout:
        layers.append(keras.layers.Dropout(0.2))
    layers.append(keras.layers.Dense(1))
    return keras.Sequential(layers)


class SubclassedModel(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(1)

    def call(self, x):
        return self.out(self.hidden(x))


def _opt(**kwargs):
    kwargs.setdefault("average_decay", 0.5)
    kwargs.setdefault("dynamic_decay", False)
    return ExponentialMovingAverage(keras.optimizers.SGD(0.05), **kwargs)


def _fit_recording(model, opt, callbacks=(), epochs=1, batch_size=16):
    """Fits, recording every variable before the first step and after each
    batch; returns the history of `model.variables` values."""
    history = []

    def record(batch, logs):
        sync(model)
        history.append([numpy(v).copy() for v in model.variables])

    def first(batch, logs):
        if not history:
            sync(model)
            history.append([numpy(v).copy() for v in model.variables])

    recorder = keras.callbacks.LambdaCallback(
        on_train_batch_begin=first, on_train_batch_end=record
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(*regression_data(), batch_size=batch_size, epochs=epochs,
              verbose=0, callbacks=[recorder, *callbacks])
    return history


def _expected_averages(history, decay):
    averages = [h.astype("float64") for h in history[0]]
    for values in history[1:]:
        averages = [a - (1 - decay) * (a - w) for a, w in zip(averages, values)]
    return averages


# -- lazily built models -----------------------------------------------------


@pytest.mark.parametrize("make", [_lazy_model, SubclassedModel],
                         ids=["sequential_without_input", "subclassed"])
@pytest.mark.parametrize("with_callback", [False, True],
                         ids=["plain", "swap_callback"])
def test_fit_of_a_lazily_built_model_averages_its_real_initial_weights(
    make, with_callback
):
    model, opt = make(), _opt()
    callbacks = [keras_ema.SwapAverageWeights()] if with_callback else []
    history = _fit_recording(model, opt, callbacks)
    assert len(history) == 5
    expected = _expected_averages(history, 0.5)
    for variable, average in zip(model.trainable_variables, expected):
        assert tuple(opt.average(variable).shape) == tuple(variable.shape)
        np.testing.assert_allclose(numpy(opt.average(variable)), average,
                                   rtol=1e-5, atol=1e-6)
    # Not the weights after the first step: the averages started before it.
    first = numpy(model.trainable_variables[0])
    assert np.abs(numpy(opt.average(model.trainable_variables[0])) - first).max() > 0


def test_lazily_built_model_with_batchnorm_averages_its_statistics_in_fit():
    model = _lazy_model(batchnorm=True)
    opt = _opt(trainable_weights_only=False)
    history = _fit_recording(model, opt, [keras_ema.SwapAverageWeights()])
    expected = _expected_averages(history, 0.5)
    moving = [v for v in model.non_trainable_variables if "moving" in v.path]
    assert len(moving) == 2
    for variable, average in zip(model.variables, expected):
        assert opt.average(variable) is not None, variable.path
        np.testing.assert_allclose(numpy(opt.average(variable)), average,
                                   rtol=1e-5, atol=1e-6)


def test_shadow_copy_of_an_unbuilt_model_creates_the_averages_at_build():
    model, opt = _lazy_model(batchnorm=True), _opt(trainable_weights_only=False)
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    assert not opt.built and not opt.has_shadow_copy
    x, y = regression_data()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    sync(model)
    assert all(opt.average(v) is not None for v in model.variables)


def test_eager_custom_loop_of_a_lazily_built_model_averages_from_the_start():
    model, opt = _lazy_model(), _opt()
    model(regression_data(16)[0])
    kernel = model.trainable_variables[0]
    w0 = numpy(kernel)
    grads = [keras.ops.ones(v.shape) for v in model.trainable_variables]
    opt.apply(grads, model.trainable_variables)
    np.testing.assert_allclose(numpy(opt.average(kernel)),
                               (w0 + numpy(kernel)) / 2, rtol=1e-6)


@tensorflow_only
def test_tf_function_loop_starts_the_averages_at_the_initial_weights():
    import tensorflow as tf

    model, opt = _lazy_model(), _opt()
    x, y = regression_data(16)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean((model(x) - y) ** 2)
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        opt.apply(grads, variables)

    # The initial kernel is read through a traced no-op step of SGD(0).
    opt.inner_optimizer.learning_rate = 0.0
    step()
    kernel = model.trainable_variables[0]
    w0 = numpy(kernel)
    np.testing.assert_array_equal(bits(opt.average(kernel)), bits(w0))
    opt.inner_optimizer.learning_rate = 0.05
    step()
    np.testing.assert_allclose(numpy(opt.average(kernel)),
                               (w0 + numpy(kernel)) / 2, rtol=1e-6)


def test_readme_quick_start_runs_with_a_sequential_without_input(tmp_path):
    # The README's quick start, with `keras.Input` left out.
    rng = np.random.default_rng(0)
    x_train = rng.normal(size=(256, 8)).astype("float32")
    y_train = (x_train.sum(axis=1) > 0).astype("int32")
    x_val, y_val = x_train[:64], y_train[:64]
    model = keras.Sequential([
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(2, activation="softmax"),
    ])
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.Adam(1e-3), average_decay=0.999
    )
    model.compile(optimizer=opt, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, validation_data=(x_val, y_val), epochs=2,
              verbose=0, callbacks=[keras_ema.SwapAverageWeights()])
    with opt.averaged_weights():
        model.save(tmp_path / "model_ema.keras")
        expected = model.predict(x_val, verbose=0)
    loaded = keras.models.load_model(tmp_path / "model_ema.keras")
    np.testing.assert_allclose(loaded.predict(x_val, verbose=0), expected,
                               rtol=1e-6, atol=1e-6)
    assert loaded.optimizer.averages_swapped_in


# -- plain tf.Variables --------------------------------------------------------


@tensorflow_only
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_plain_tf_variables_are_averaged_like_keras_variables(compiled):
    import tensorflow as tf

    w = tf.Variable([1.0, 2.0])
    opt = _opt()
    grad = tf.constant([1.0, 1.0])

    def step():
        opt.apply_gradients([(grad, w)])

    if compiled:
        step = tf.function(step)
    step()
    np.testing.assert_allclose(w.numpy(), [0.95, 1.95], rtol=1e-6)
    np.testing.assert_allclose(numpy(opt.average(w)), [0.975, 1.975],
                               rtol=1e-6)
    opt.swap_weights()
    np.testing.assert_allclose(w.numpy(), [0.975, 1.975], rtol=1e-6)
    opt.swap_weights()
    np.testing.assert_allclose(w.numpy(), [0.95, 1.95], rtol=1e-6)


# -- save and load at any moment -----------------------------------------------


def _fresh(trainable_weights_only=True, told=True):
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
        keras.layers.BatchNormalization(), keras.layers.Dense(1),
    ])
    opt = ExponentialMovingAverage(
        keras.optimizers.Adam(1e-2), average_decay=0.8, start_step=1,
        trainable_weights_only=trainable_weights_only,
    )
    model.compile(optimizer=opt, loss="mse")
    # Told its model, the optimizer averages its BatchNorm statistics (if
    # asked) and guards its train step: on JAX the guard's select may round
    # the statistics by an ulp otherwise than an unguarded step, so the runs
    # compared here are told alike.
    if told or not trainable_weights_only:
        opt.shadow_copy(model)
    return model, opt


def _train(model, seed):
    x, y = regression_data(32, seed=seed)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)


def _state(model, opt):
    sync(model)
    values = [numpy(v) for v in model.variables]
    averages = [numpy(opt.average(v)) for v in model.variables
                if opt.average(v) is not None]
    return values, averages, int(numpy(opt.iterations))


def _assert_same(a, b):
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        np.testing.assert_array_equal(bits(x), bits(y))
    assert len(a[1]) == len(b[1]) and a[2] == b[2]


def _assert_resumes_exactly(model, opt, loaded, loaded_opt, moment):
    """The loaded model trains on bit for bit like the one it was saved from."""
    if moment == "swapped_in":
        assert loaded_opt.averages_swapped_in
        opt.swap_weights()
        loaded_opt.swap_weights()
    for seed in (1, 2):
        _train(model, seed)
        _train(loaded, seed)
    _assert_same(_state(model, opt), _state(loaded, loaded_opt))


@pytest.mark.parametrize("moment", ["compiled", "trained", "swapped_in"])
@pytest.mark.parametrize("form", ["keras", "weights"])
@pytest.mark.parametrize("trainable_weights_only", [True, False],
                         ids=["trainable", "all"])
def test_a_file_saved_at_any_moment_resumes_exactly(
    tmp_path, moment, form, trainable_weights_only
):
    keras.utils.set_random_seed(1)
    model, opt = _fresh(trainable_weights_only)
    if moment != "compiled":
        _train(model, seed=0)
    if moment == "swapped_in":
        opt.swap_weights()
    path = tmp_path / ("m.keras" if form == "keras" else "m.weights.h5")
    if form == "keras":
        model.save(path)
        loaded = keras.models.load_model(path)
    else:
        model.save_weights(path)
        loaded, _ = _fresh(trainable_weights_only)
        loaded.load_weights(path)
    loaded_opt = loaded.optimizer
    loaded_opt.shadow_copy(loaded)  # builds an optimizer not built yet
    _assert_resumes_exactly(model, opt, loaded, loaded_opt, moment)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_an_unbuilt_optimizer_trains_like_the_original(how):
    keras.utils.set_random_seed(2)
    a, opt = _fresh(told=False)
    b = keras.models.clone_model(a)
    b.set_weights(a.get_weights())
    copied = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(
        pickle.dumps(opt))
    b.compile(optimizer=copied, loss="mse")
    for seed in (0, 1):
        _train(a, seed)
        _train(b, seed)
    _assert_same(_state(a, opt), _state(b, copied))


def test_clone_model_with_a_fresh_optimizer_trains():
    a, opt = _fresh()
    _train(a, 0)
    b = keras.models.clone_model(a)
    b_opt = ExponentialMovingAverage.from_config(opt.get_config())
    b.compile(optimizer=b_opt, loss="mse")
    _train(b, 0)
    assert all(b_opt.average(v) is not None for v in b.trainable_variables)


# -- a second model ----------------------------------------------------------


def test_an_optimizer_refuses_a_second_model_before_anything_moves():
    a, opt = _fresh()
    _train(a, 0)
    before = _state(a, opt)
    b = keras.models.clone_model(a)
    b.compile(optimizer=opt, loss="mse")
    b_weights = [numpy(v) for v in b.trainable_variables]
    with pytest.raises(ValueError, match="second model|not built with"):
        _train(b, 1)
    _assert_same(before, _state(a, opt))
    for v, w in zip(b.trainable_variables, b_weights):
        np.testing.assert_array_equal(numpy(v), w)


def test_shadow_copy_of_another_model_raises():
    a, opt = _fresh()
    _train(a, 0)
    b = keras.models.clone_model(a)
    with pytest.raises(ValueError, match="second model"):
        opt.shadow_copy(b)


# -- assign_average_vars with the peers' calls ----------------------------------


@pytest.mark.parametrize("trainable_weights_only", [True, False])
def test_assign_average_vars_of_all_model_variables_skips_unaveraged_ones(
    trainable_weights_only,
):
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8),
        keras.layers.BatchNormalization(), keras.layers.Dropout(0.3),
        keras.layers.Dense(1),
    ])
    opt = _opt(trainable_weights_only=trainable_weights_only,
               exclude=["dense_.*bias", "^dense/bias"])
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    _train(model, 0)
    sync(model)
    before = {v.path: numpy(v) for v in model.variables}
    expected = {v.path: numpy(opt.average(v)) for v in model.variables
                if opt.average(v) is not None}
    assert any("seed" in v.path or "int" in str(v.dtype)
               for v in model.variables)
    opt.assign_average_vars(model.variables)
    for v in model.variables:
        want = expected.get(v.path, before[v.path])
        np.testing.assert_array_equal(numpy(v), want)


@tensorflow_only
@pytest.mark.parametrize("moment", ["compiled", "trained", "swapped_in"])
def test_a_tf_train_checkpoint_at_any_moment_resumes_exactly(tmp_path, moment):
    import tensorflow as tf

    keras.utils.set_random_seed(1)
    model, opt = _fresh()
    if moment != "compiled":
        _train(model, seed=0)
    if moment == "swapped_in":
        opt.swap_weights()
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(tmp_path / "c")
    loaded, loaded_opt = _fresh()
    loaded_opt.shadow_copy(loaded)
    tf.train.Checkpoint(model=loaded, optimizer=loaded_opt).restore(path)
    _assert_resumes_exactly(model, opt, loaded, loaded_opt, moment)


def test_a_file_with_non_trainable_averages_names_trainable_weights_only(
    tmp_path,
):
    model, opt = _fresh(trainable_weights_only=False)
    _train(model, 0)
    model.save_weights(tmp_path / "m.weights.h5")
    other, other_opt = _fresh(trainable_weights_only=True)
    other_opt.shadow_copy(other)
    with pytest.raises(ValueError, match="trainable_weights_only=False"):
        other.load_weights(tmp_path / "m.weights.h5")
