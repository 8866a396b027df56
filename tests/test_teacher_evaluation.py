"""The teacher wherever it is called: in evaluation, after swaps, in a
user-written train step, of several models, from the weights training
starts with (issue 25)."""

import warnings

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import numpy
from conftest import regression_data
from conftest import small_model

import keras_ema


class MeanTeacher(keras.Sequential):
    """The teacher guide's pattern: the averages' predictions as a target."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        teacher = self.optimizer.call_with_averages(self, x, training=False)
        return loss + keras.ops.mean(keras.ops.square(y_pred - teacher))


def _mean_teacher(jit_compile="auto"):
    model = MeanTeacher(small_model().layers)
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=0.7
    )
    model.compile(optimizer=opt, loss="mse", jit_compile=jit_compile)
    return model, opt


def _forward(weights, x):
    """small_model() in numpy: Dense(8, relu), Dense(1)."""
    w1, b1, w2, b2 = (np.asarray(w, "float64") for w in weights)
    return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2


def _loss(y, student, teacher):
    return np.mean((y - student) ** 2) + np.mean((student - teacher) ** 2)


class _Moments(keras.callbacks.Callback):
    """The logs, raw weights and averages at each epoch's end."""

    def __init__(self, opt):
        super().__init__()
        self.opt, self.seen = opt, []

    def on_epoch_end(self, epoch, logs=None):
        variables = self.model.trainable_variables
        self.seen.append((
            dict(logs),
            [numpy(v) for v in variables],
            [numpy(self.opt.average(v)) for v in variables],
        ))


JIT = [True, False] if BACKEND == "tensorflow" else ["auto"]


@pytest.mark.parametrize("log_raw", [False, True], ids=["plain", "log_raw"])
@pytest.mark.parametrize("jit_compile", JIT)
def test_val_loss_of_a_teacher_is_that_of_the_averages_of_the_moment(
    jit_compile, log_raw
):
    model, opt = _mean_teacher(jit_compile)
    x, y = regression_data(32)
    xv, yv = regression_data(16, seed=1)
    moments = _Moments(opt)
    callbacks = [moments]
    if log_raw:
        callbacks.insert(0, keras_ema.SwapAverageWeights(log_raw_metrics=True))
    model.fit(x, y, epochs=2, batch_size=8, validation_data=(xv, yv),
              validation_batch_size=16, callbacks=callbacks, verbose=0)
    for logs, raw, averages in moments.seen:
        raw_pred, avg_pred = _forward(raw, xv), _forward(averages, xv)
        if log_raw:
            # Validated on the averages, whose teacher is themselves; and
            # on the raw weights, against the averages.
            expected = {"val_loss": _loss(yv, avg_pred, avg_pred),
                        "val_raw_loss": _loss(yv, raw_pred, avg_pred)}
        else:
            expected = {"val_loss": _loss(yv, raw_pred, avg_pred)}
        for name, value in expected.items():
            np.testing.assert_allclose(logs[name], value, rtol=2e-5,
                                       err_msg=name)
    # The averages moved between epochs: a first trace's would differ.
    assert not np.allclose(moments.seen[0][2][0], moments.seen[-1][2][0])


def test_evaluate_follows_each_swap_of_the_averages():
    model, opt = _mean_teacher()
    x, y = regression_data(32)
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    raw = [numpy(v) for v in model.trainable_variables]
    averages = [numpy(opt.average(v)) for v in model.trainable_variables]
    raw_pred, avg_pred = _forward(raw, x), _forward(averages, x)
    on_raw = _loss(y, raw_pred, avg_pred)
    on_averages = _loss(y, avg_pred, avg_pred)
    got = [model.evaluate(x, y, batch_size=32, verbose=0)]
    with opt.averaged_weights():
        got.append(model.evaluate(x, y, batch_size=32, verbose=0))
    got.append(model.evaluate(x, y, batch_size=32, verbose=0))
    np.testing.assert_allclose(got, [on_raw, on_averages, on_raw], rtol=2e-5)


class TeacherInPredict(keras.Sequential):
    def predict_step(self, *args):  # JAX's takes the state first
        data = args[-1]
        x = data[0] if isinstance(data, (list, tuple)) else data
        out = self.optimizer.call_with_averages(self, x, training=False)
        return (out, args[0][1]) if BACKEND == "jax" else out


def test_a_teacher_in_predict_step_gives_the_averages_of_each_call():
    model = TeacherInPredict(small_model().layers)
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=0.7
    )
    model.compile(optimizer=opt, loss="mse")
    # On JAX a compiled predict step gets only the model's state: the
    # teacher there needs the model told first (docs/guides/teacher.md).
    opt.shadow_copy(model)
    x, y = regression_data(32)
    for _ in range(2):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        averages = [numpy(opt.average(v)) for v in model.trainable_variables]
        np.testing.assert_allclose(
            model.predict(x, batch_size=16, verbose=0), _forward(averages, x),
            rtol=1e-5, atol=1e-6,
        )
        with opt.averaged_weights():
            np.testing.assert_allclose(
                model.predict(x, batch_size=16, verbose=0),
                _forward(averages, x), rtol=1e-5, atol=1e-6,
            )


@pytest.mark.skipif(BACKEND != "jax", reason="a JAX train step's signature")
@pytest.mark.parametrize("layer", ["batchnorm", "dropout"])
def test_a_teacher_in_a_user_written_jax_train_step(layer):
    import jax

    class Student(keras.Sequential):
        def train_step(self, state, data):
            trainable, non_trainable, optimizer_values, metrics = state
            x, y = data[0], data[1]
            dropout = layer == "dropout"
            teacher = self.optimizer.call_with_averages(
                self, x, training=dropout
            )

            def loss_fn(trainable):
                pred, new_non_trainable = self.stateless_call(
                    trainable, non_trainable, x, training=True
                )
                return keras.ops.mean((pred - y) ** 2), new_non_trainable

            (loss, new_non_trainable), grads = jax.value_and_grad(
                loss_fn, has_aux=True
            )(trainable)
            trainable, optimizer_values = self.optimizer.stateless_apply(
                optimizer_values, grads, trainable
            )
            logs = {"loss": loss, "teacher": keras.ops.mean(teacher)}
            return logs, (trainable, new_non_trainable, optimizer_values,
                          metrics)

    middle = (keras.layers.BatchNormalization() if layer == "batchnorm"
              else keras.layers.Dropout(0.5))
    model = Student([keras.Input((4,)), keras.layers.Dense(8), middle,
                     keras.layers.Dense(1)])
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=0.7
    )
    model.compile(optimizer=opt)
    opt.shadow_copy(model)
    x, y = regression_data(16)
    for _ in range(3):
        # The averages before the step, as its teacher sees them.
        expected = np.mean(numpy(opt.call_with_averages(model, x)))
        logs = model.train_on_batch(x, y, return_dict=True)
        if layer == "batchnorm":
            np.testing.assert_allclose(logs["teacher"], expected, rtol=1e-5)
        else:
            assert np.isfinite(logs["teacher"])
    assert int(numpy(opt.iterations)) == 3


def test_a_teacher_of_two_models_is_refused_with_what_to_do_then_works():
    encoder = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8)])
    head = keras.Sequential([keras.Input((8,)), keras.layers.Dense(2)])
    variables = encoder.trainable_variables + head.trainable_variables
    grads = [keras.ops.ones(v.shape) for v in variables]
    x, _ = regression_data(8)

    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.1), average_decay=0.5
    )
    opt.call_with_averages(encoder, x)  # averages of the encoder alone
    before = [numpy(v) for v in variables]
    with pytest.raises(ValueError, match=r"optimizer\.build\(encoder"):
        opt.apply(grads, variables)
    for value, variable in zip(before, variables):
        np.testing.assert_array_equal(numpy(variable), value)

    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.1), average_decay=0.5, dynamic_decay=False
    )
    opt.build(variables)
    for _ in range(2):
        opt.apply(grads, variables)
    # Each weight moved by -0.1 twice: averages 0.5 * (0.5 * w0 + 0.5 *
    # (w0 - 0.1)) + 0.5 * (w0 - 0.2) = w0 - 0.125.
    averages = [b - 0.125 for b in before]
    hidden = opt.call_with_averages(encoder, x)
    expected = x @ averages[0] + averages[1]
    np.testing.assert_allclose(numpy(hidden), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        numpy(opt.call_with_averages(head, hidden)),
        expected @ averages[2] + averages[3], rtol=1e-5, atol=1e-5,
    )


def _normalized_model(x):
    norm = keras.layers.Normalization()
    model = keras.Sequential([keras.Input((4,)), norm, keras.layers.Dense(1)])
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.01), average_decay=0.9,
        trainable_weights_only=False,
    )
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)  # where the docs put it: right after compile
    norm.adapt(x)  # keras-io's DDIM adapts here too
    return model, opt, norm


def test_averages_start_from_statistics_adapted_after_shadow_copy():
    x, y = regression_data(32)
    x = x * 3.0 + 5.0
    model, opt, norm = _normalized_model(x)
    # The statistics live in `adapt_mean` / `adapt_variance`; `mean` and
    # `variance` are reshaped copies that `adapt` (and loading) refresh.
    adapted = [numpy(norm.adapt_mean), numpy(norm.adapt_variance)]
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for variable, value in zip([norm.adapt_mean, norm.adapt_variance],
                               adapted):
        np.testing.assert_array_equal(numpy(opt.average(variable)), value)
    with opt.averaged_weights():
        np.testing.assert_array_equal(numpy(norm.adapt_mean), adapted[0])


def test_averages_start_from_weights_loaded_after_shadow_copy(tmp_path):
    x, y = regression_data(32)
    source = small_model()
    source.set_weights([w + 1.0 for w in source.get_weights()])
    source.save_weights(tmp_path / "start.weights.h5")
    model = small_model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.0), average_decay=0.999, dynamic_decay=False
    )
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    model.load_weights(tmp_path / "start.weights.h5")
    model.fit(x, y, epochs=1, batch_size=32, verbose=0)
    # A learning rate of 0: the weights stay, and so do their averages.
    for variable, loaded in zip(model.trainable_variables,
                                source.get_weights()):
        np.testing.assert_array_equal(numpy(variable), loaded)
        np.testing.assert_array_equal(numpy(opt.average(variable)), loaded)


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX trainer's compiled step")
def test_a_teacher_in_a_jax_step_the_optimizer_was_not_told_of_is_refused():
    class Teacher(keras.Sequential):
        def compute_loss(self, x=None, y=None, y_pred=None,
                         sample_weight=None, training=True):
            teacher = self.optimizer.call_with_averages(self, x)
            return keras.ops.mean((y_pred - y) ** 2 + (y_pred - teacher) ** 2)

    model = Teacher(small_model().layers)
    opt = keras_ema.ExponentialMovingAverage(keras.optimizers.SGD(0.05))
    model.compile(optimizer=opt)  # no loss: no symbolic pass to learn from
    x, y = regression_data(16)
    before = [numpy(v) for v in model.variables]
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"shadow_copy\(model\)"):
            model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    for value, variable in zip(before, model.variables):
        np.testing.assert_array_equal(numpy(variable), value)
    opt.shadow_copy(model)  # what the error says
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert not np.array_equal(numpy(model.variables[0]), before[0])


@pytest.mark.skipif(BACKEND != "jax", reason="the JAX trainer's state")
def test_an_error_inside_a_jax_fit_step_surfaces_as_itself():
    class Failing(keras.Sequential):
        def compute_loss(self, *args, **kwargs):
            raise RuntimeError("the user's own error")

    model = Failing(small_model().layers)
    model.compile(optimizer=keras_ema.ExponentialMovingAverage("sgd"))
    x, y = regression_data(16)
    with pytest.raises(RuntimeError, match="the user's own error"):
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
