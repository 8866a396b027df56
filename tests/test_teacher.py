"""`call_with_averages`: the average as a teacher inside the train step."""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import bits
from conftest import numpy
from conftest import regression_data
from conftest import small_model
from conftest import sync

import keras_ema
from keras_ema import schedules
from keras_ema.examples import mean_teacher


def _trained(batchnorm=True):
    model = small_model(batchnorm)
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=0.8,
        trainable_weights_only=False,
    )
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    model.fit(*regression_data(), batch_size=8, epochs=2, verbose=0)
    return model, opt


def test_eager_teacher_equals_the_swapped_in_averages_and_writes_nothing():
    model, opt = _trained()
    x, _ = regression_data(16, seed=3)
    before = [bits(v) for v in model.variables + opt.variables]
    teacher = numpy(opt.call_with_averages(model, x, training=False))
    after = [bits(v) for v in model.variables + opt.variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    with opt.averaged_weights():
        expected = numpy(model(x, training=False))
    np.testing.assert_allclose(teacher, expected, rtol=1e-6, atol=1e-6)
    assert np.abs(teacher - numpy(model(x, training=False))).max() > 1e-4
    # Called with the averages swapped in, it is still the averages.
    with opt.averaged_weights():
        again = numpy(opt.call_with_averages(model, x, training=False))
    np.testing.assert_allclose(again, expected, rtol=1e-6, atol=1e-6)


def test_a_training_call_changes_no_batchnorm_statistic():
    model, opt = _trained()
    x, _ = regression_data(16, seed=3)
    before = [bits(v) for v in model.variables]
    opt.call_with_averages(model, x, training=True)
    for a, b in zip(before, [bits(v) for v in model.variables]):
        np.testing.assert_array_equal(a, b)


def _mean_teacher(jit_compile="auto"):
    keras.utils.set_random_seed(0)
    model = mean_teacher.build(steps=40, jit_compile=jit_compile)
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1), dtype="float32")
    y = rng.integers(0, 10, 64)
    return model, model.optimizer, x, y


@pytest.mark.parametrize("jit_compile", [False, True] if BACKEND == "tensorflow"
                         else ["auto"])
def test_in_step_teacher_is_the_average_of_that_step_and_compiles_once(
        jit_compile):
    model, opt, x, y = _mean_teacher(jit_compile)
    model.train_on_batch(x, y)  # the averages exist from here on
    # The first eager swap guards the train step, which rebuilds it once.
    with opt.averaged_weights():
        pass
    model.train_on_batch(x, y)
    traced = model.traces
    for _ in range(4):
        sync(model)
        with opt.averaged_weights():
            teacher = numpy(model(x, training=False))
        # The digits CNN has no Dropout or BatchNorm: the training output
        # is the student's output.
        student = numpy(model(x, training=True))
        expected = np.mean((student - teacher) ** 2)
        # The metrics of this one batch. (`train_on_batch` resets them, but
        # before Keras 3.15 not those an overridden `metrics` lists.)
        model.reset_metrics()
        logs = model.train_on_batch(x, y, return_dict=True)
        assert logs["consistency"] == pytest.approx(expected, rel=1e-4, abs=1e-7)
    if BACKEND != "torch":
        # Compiled once: the later steps run the same compiled function.
        assert model.traces == traced
        assert traced <= (1 if BACKEND == "jax" else 4)
    assert not opt.averages_swapped_in


def test_no_gradient_reaches_the_weights_through_the_teacher():
    class TeacherOnly(mean_teacher.MeanTeacher):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                         training=True):
            # The student's output with weight 0 keeps every gradient defined.
            return keras.ops.sum(self.teacher(x)) + 0.0 * keras.ops.sum(y_pred)

    from keras_ema import demo

    model = TeacherOnly(demo.build_model())
    opt = keras_ema.ExponentialMovingAverage(keras.optimizers.SGD(0.5),
                                             average_decay=0.5)
    model.compile(optimizer=opt, loss="mse")
    model.build((None, 8, 8, 1))
    opt.shadow_copy(model)
    x = np.random.default_rng(0).random((16, 8, 8, 1), dtype="float32")
    before = [bits(v) for v in model.trainable_variables]
    for _ in range(3):
        model.train_on_batch(x, np.zeros(16))
    sync(model)
    for a, b in zip(before, [bits(v) for v in model.trainable_variables]):
        np.testing.assert_array_equal(a, b)
    # The averages moved by the EMA rule only: towards unchanged weights.
    for v in model.trainable_variables:
        np.testing.assert_array_equal(bits(opt.average(v)), bits(v))
    assert int(keras.ops.convert_to_numpy(opt.iterations)) == 3


def test_mean_teacher_example_trains_on_the_digits_on_every_backend():
    keras.utils.set_random_seed(0)
    from keras_ema import demo

    (x, y), (x_val, y_val) = demo.load_digits()
    x, y = x[:640], y[:640]
    model = mean_teacher.build(steps=60)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    # Keras' TensorFlow `fit` traces its step twice the first time (it does
    # so for a plain model too); no step is traced after that.
    traced = model.traces
    model.fit(x, y, batch_size=32, epochs=2, verbose=0)
    sync(model)
    teacher = numpy(model.teacher(x_val))
    with model.optimizer.averaged_weights():
        expected = numpy(model(x_val, training=False))
    np.testing.assert_allclose(teacher, expected, rtol=1e-6, atol=1e-6)
    assert (teacher.argmax(-1) == y_val).mean() > 0.6
    if BACKEND != "torch":
        assert model.traces == traced <= (1 if BACKEND == "jax" else 2)


def test_packed_averages_serve_the_teacher():
    model, opt = _trained(batchnorm=False)
    packed = [v for v in model.trainable_variables
              if type(opt.average(v)).__name__ == "PackedAverage"]
    if BACKEND in ("tensorflow", "jax"):
        assert packed  # small weights are packed there
    x, _ = regression_data(8, seed=5)
    with opt.averaged_weights():
        expected = numpy(model(x))
    np.testing.assert_allclose(numpy(opt.call_with_averages(model, x)),
                               expected, rtol=1e-6, atol=1e-6)


def test_cosine_schedule_is_byols_and_round_trips():
    schedule = schedules.Cosine(0.996, 1.0, steps=100)
    n = np.arange(0, 150)
    expected = 1.0 - (1.0 - 0.996) * (np.cos(np.pi * np.minimum(n, 100) / 100)
                                      + 1) / 2
    np.testing.assert_allclose(numpy(schedule(n)), expected, rtol=1e-6)
    np.testing.assert_allclose(numpy(schedule.complement(n)), 1 - expected,
                               rtol=1e-4, atol=1e-9)
    again = schedules.deserialize(schedules.serialize(schedule))
    assert again.get_config() == schedule.get_config()
    with pytest.raises(ValueError, match="steps"):
        schedules.Cosine(0.9)
    with pytest.raises(ValueError, match="initial_decay"):
        schedules.Cosine(1.5, steps=10)
