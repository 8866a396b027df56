"""Decay control: schedules, update_every, precision, exclusion, real steps."""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import bits
from conftest import compiled_step
from conftest import fit_recording_kernel
from conftest import numpy
from conftest import regression_data
from conftest import small_model
from conftest import tensor
from conftest import tensorflow_only

from keras_ema import ExponentialMovingAverage
from keras_ema import schedules


def _scalar(dtype="float32", lr=0.1, **ema_kwargs):
    variable = keras.Variable(np.array([1.0], dtype), dtype=dtype)
    opt = ExponentialMovingAverage(keras.optimizers.SGD(lr), **ema_kwargs)
    opt.build([variable])
    return variable, opt


def _average(opt, variable):
    return np.asarray(keras.ops.convert_to_numpy(opt.average(variable)))


ONE = [tensor([1.0])]


# -- schedules ---------------------------------------------------------------


def test_a_schedule_alone_decides_the_decay_even_with_dynamic_decay():
    # Constant(0.5): 1.0 -> 0.95, where the dynamic rule would give 0.91.
    w, opt = _scalar(average_decay=schedules.Constant(0.5), dynamic_decay=True)
    opt.apply(ONE, [w])
    np.testing.assert_allclose(_average(opt, w), [0.95], rtol=1e-6)


def test_warmup_schedule_in_training_matches_hand_numbers():
    # Warmup(power=1): decay_n = 1 - 1 / (1 + n) = 0, 1/2, ...
    # average: 1.0 -> 0.9 (decay 0) -> 0.9 - 0.5 * (0.9 - 0.8) = 0.85
    w, opt = _scalar(average_decay=schedules.Warmup(0.99, power=1.0))
    opt.apply(ONE, [w])
    np.testing.assert_allclose(_average(opt, w), [0.9], rtol=1e-6)
    opt.apply(ONE, [w])
    np.testing.assert_allclose(_average(opt, w), [0.85], rtol=1e-6)


def test_a_plain_function_works_as_average_decay():
    w, opt = _scalar(average_decay=lambda n: keras.ops.convert_to_tensor(0.5))
    opt.apply(ONE, [w])
    opt.apply(ONE, [w])
    np.testing.assert_allclose(_average(opt, w), [0.875], rtol=1e-6)


@keras.saving.register_keras_serializable(package="keras_ema_tests")
class HalfUntil(schedules.DecaySchedule):
    """0.5 for the first `steps` updates, then 0.9: a user subclass."""

    def __init__(self, steps):
        self.steps = steps

    def __call__(self, step):
        late = keras.ops.cast(keras.ops.greater_equal(step, self.steps), "float32")
        return 0.5 + 0.4 * late

    def get_config(self):
        return {"steps": self.steps}


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.Constant(0.9),
        schedules.Dynamic(0.95),
        schedules.Warmup(0.999, inv_gamma=2.0, power=0.75, min_decay=0.1),
        schedules.HalfLife(20.0),
        HalfUntil(3),
    ],
    ids=lambda s: type(s).__name__,
)
def test_every_schedule_round_trips_through_a_keras_file(schedule, tmp_path):
    model = small_model()
    model.compile(
        optimizer=ExponentialMovingAverage("sgd", average_decay=schedule),
        loss="mse",
    )
    x, y = regression_data(32)
    model.fit(x, y, batch_size=8, verbose=0)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    restored = loaded.optimizer.average_decay
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    model.train_on_batch(x[:8], y[:8])
    loaded.train_on_batch(x[:8], y[:8])
    kernel, loaded_kernel = model.variables[0], loaded.variables[0]
    np.testing.assert_array_equal(
        bits(model.optimizer.average(kernel)),
        bits(loaded.optimizer.average(loaded_kernel)),
    )


# -- update_every ------------------------------------------------------------


def test_update_every_matches_a_numpy_reference_in_fit():
    opt, kernel, history = fit_recording_kernel(update_every=3)
    average = history[0].astype("float64")
    for s, weight in enumerate(history[1:], start=1):
        if s % 3 == 0:
            decay = min(0.9, s / (9 + s)) ** 3  # n = s - 1
            average -= (1 - decay) * (average - weight)
    np.testing.assert_allclose(_average(opt, kernel), average, atol=1e-6)


@pytest.mark.parametrize("every", [1, 3])
def test_update_every_keeps_the_horizon_of_the_average(every):
    # The weight jumps from 1 to 0 and stays: after 30 updates the average
    # is 0.9 ** 30, whether it moved 30 times by 0.9 or 10 times by 0.9 ** 3.
    w, opt = _scalar(lr=0.0, average_decay=0.9, dynamic_decay=False,
                     update_every=every)
    w.assign([0.0])
    zero = [tensor([0.0])]
    for _ in range(30):
        opt.apply(zero, [w])
    np.testing.assert_allclose(_average(opt, w), [0.9**30], rtol=1e-5)


# -- precision ---------------------------------------------------------------


def _held_bfloat16(decay, steps, **ema_kwargs):
    w, opt = _scalar("bfloat16", lr=0.0, average_decay=decay,
                     dynamic_decay=False, **ema_kwargs)
    w.assign(keras.ops.cast([2.0], "bfloat16"))
    zero = [keras.ops.zeros((1,), "bfloat16")]
    for _ in range(steps):
        opt.apply(zero, [w])
    return w, opt


def test_bfloat16_weights_get_float32_averages_that_track_the_exact_value():
    # Exact: 2 - 0.999 ** 100 = 1.09521. Each step moves the average by
    # about 0.001, under bfloat16's spacing 2 ** -7 near 1: an average kept
    # in bfloat16 (Keras' use_ema) never leaves 1.0.
    w, opt = _held_bfloat16(0.999, 100)
    assert keras.backend.standardize_dtype(opt.average(w).dtype) == "float32"
    np.testing.assert_allclose(_average(opt, w), [2 - 0.999**100], rtol=1e-5)

    frozen = keras.Variable(np.array([1.0], "float32"), dtype="bfloat16")
    builtin = keras.optimizers.SGD(0.0, use_ema=True, ema_momentum=0.999)
    builtin.apply([keras.ops.zeros((1,), "bfloat16")], [frozen])
    frozen.assign(keras.ops.cast([2.0], "bfloat16"))
    for _ in range(100):
        builtin.apply([keras.ops.zeros((1,), "bfloat16")], [frozen])
    builtin_average = builtin._model_variables_moving_average[0]
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(keras.ops.cast(builtin_average, "float32")),
        [1.0],
    )


@pytest.mark.parametrize(
    "compiled",
    [False, pytest.param(True, marks=tensorflow_only)],
    ids=["eager", "tf.function"],
)
def test_swapping_bfloat16_weights_keeps_every_bit_of_the_float32_average(
    compiled,
):
    w, opt = _held_bfloat16(0.999, 7)
    raw, average = bits(w), bits(opt.average(w))
    swap = opt.swap_weights
    if compiled:
        import tensorflow as tf

        swap = tf.function(swap)
    swap()
    expected = keras.ops.cast(keras.ops.cast(opt.average(w), "bfloat16"), "float32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(keras.ops.cast(w, "float32")),
        keras.ops.convert_to_numpy(expected),
    )
    swap()
    np.testing.assert_array_equal(bits(w), raw)
    np.testing.assert_array_equal(bits(opt.average(w)), average)


def test_assign_average_vars_casts_the_float32_average_to_bfloat16():
    w, opt = _held_bfloat16(0.999, 100)
    opt.assign_average_vars([w])
    assert keras.backend.standardize_dtype(w.dtype) == "bfloat16"
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(w, "float32")),
        [2 - 0.999**100], rtol=2**-8,
    )


@pytest.mark.skipif(
    BACKEND == "jax", reason="JAX runs without float64 unless jax_enable_x64"
)
def test_average_dtype_float64_keeps_float32_weights_exact_through_swaps():
    w, opt = _scalar(average_decay=0.5, dynamic_decay=False,
                     average_dtype="float64")
    opt.apply(ONE, [w])
    opt.apply(ONE, [w])
    assert keras.backend.standardize_dtype(opt.average(w).dtype) == "float64"
    np.testing.assert_allclose(_average(opt, w), [0.875], rtol=1e-7)
    raw, average = bits(w), bits(opt.average(w))
    with opt.averaged_weights():
        pass
    np.testing.assert_array_equal(bits(w), raw)
    np.testing.assert_array_equal(bits(opt.average(w)), average)


def test_a_bfloat16_model_trains_and_saves_its_float32_averages(tmp_path):
    model = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu", dtype="bfloat16"),
        keras.layers.Dense(1, dtype="bfloat16"),
    ])
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.05), average_decay=0.9)
    model.compile(optimizer=opt, loss="mse")
    model.fit(*regression_data(), batch_size=16, epochs=2, verbose=0)
    kernel = model.trainable_variables[0]
    assert keras.backend.standardize_dtype(kernel.dtype) == "bfloat16"
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_array_equal(
        bits(opt.average(kernel)),
        bits(loaded.optimizer.average(loaded.trainable_variables[0])),
    )


# -- what gets averaged ------------------------------------------------------


def test_excluded_variables_get_no_average_and_swaps_leave_them_alone():
    model = small_model()
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.05), exclude=["bias$"])
    model.compile(optimizer=opt, loss="mse")
    model.fit(*regression_data(), batch_size=16, verbose=0)
    biases = [v for v in model.variables if v.path.endswith("bias")]
    kernels = [v for v in model.variables if v.path.endswith("kernel")]
    assert all(opt.average(v) is None for v in biases)
    assert all(opt.average(v) is not None for v in kernels)
    before = [bits(v) for v in biases]
    opt.swap_weights()
    for v, b in zip(biases, before):
        np.testing.assert_array_equal(bits(v), b)


def test_integer_variables_are_never_averaged():
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dropout(0.5),
        keras.layers.Dense(1),
    ])
    opt = ExponentialMovingAverage("sgd", trainable_weights_only=False)
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    seed = [v for v in model.variables if "seed" in v.path]
    assert seed and opt.average(seed[0]) is None
    model.fit(*regression_data(), batch_size=16, verbose=0)
    opt.swap_weights()


# -- real updates only -------------------------------------------------------


def test_averages_stay_when_an_outer_loss_scale_optimizer_skips_the_step():
    w = keras.Variable(np.array([1.0], "float32"))
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.1))
    outer = keras.optimizers.LossScaleOptimizer(opt)
    outer.build([w])
    compiled_step(outer, [tensor([np.nan])], [w])
    np.testing.assert_array_equal(w.numpy(), [1.0])
    np.testing.assert_array_equal(_average(opt, w), [1.0])
    compiled_step(outer, [tensor([numpy(outer.dynamic_scale)])], [w])
    np.testing.assert_allclose(w.numpy(), [0.9], rtol=1e-6)
    assert int(keras.ops.convert_to_numpy(opt._ema_state.step)) == 1


def test_gradient_accumulation_in_fit_moves_averages_once_per_k_batches():
    model = small_model()
    inner = keras.optimizers.SGD(0.05, gradient_accumulation_steps=4)
    opt = ExponentialMovingAverage(inner, average_decay=0.9)
    model.compile(optimizer=opt, loss="mse")
    model.fit(*regression_data(), batch_size=8, epochs=1, verbose=0)
    assert int(keras.ops.convert_to_numpy(opt._ema_state.step)) == 2  # 8 batches / 4


def test_averages_are_taken_after_the_inner_optimizer_applies_constraints():
    layer = keras.layers.Dense(3, kernel_constraint=keras.constraints.NonNeg())
    model = keras.Sequential([keras.Input((2,)), layer])
    opt = ExponentialMovingAverage(keras.optimizers.SGD(10.0), start_step=1)
    model.compile(optimizer=opt, loss="mse")
    x = np.ones((4, 2), "float32")
    model.train_on_batch(x, np.full((4, 3), -100.0, "float32"))
    kernel = layer.kernel.numpy()
    assert (kernel == 0).any() and (kernel >= 0).all()
    # The copy of step 1 sees the constrained kernel, not the raw update.
    np.testing.assert_array_equal(bits(opt.average(layer.kernel)), bits(kernel))


# -- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"update_every": 0}, "update_every"),
        ({"update_every": -2}, "update_every"),
        ({"update_every": 1.5}, "update_every"),
        ({"exclude": ["("]}, "does not compile"),
        ({"exclude": [3]}, "regular expressions"),
        ({"average_dtype": "int32"}, "float dtype"),
        ({"average_dtype": "no-such-dtype"}, "float dtype"),
        ({"average_decay": "0.9"}, "average_decay"),
    ],
)
def test_bad_decay_control_arguments_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ExponentialMovingAverage("sgd", **kwargs)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's 64-bit mode only")
def test_float64_averages_on_jax_without_x64_get_a_clear_error():
    with pytest.raises(ValueError, match="jax_enable_x64"):
        ExponentialMovingAverage("sgd", average_dtype="float64")


def test_update_every_with_start_step_copies_then_moves_every_k_updates():
    # Copies at s = 1, 2; then EMA updates only where (s - 2) % 3 == 0:
    # s = 5 with decay 0.5 ** 3: 3 - (1 - 0.125) * (3 - 10) = 9.125.
    w, opt = _scalar(lr=0.0, average_decay=0.5, dynamic_decay=False,
                     start_step=2, update_every=3)
    zero = [tensor([0.0])]
    expected = [2.0, 3.0, 3.0, 3.0, 9.125]
    for value, average in zip([2.0, 3.0, 10.0, 10.0, 10.0], expected):
        w.assign([value])
        opt.apply(zero, [w])
        np.testing.assert_allclose(_average(opt, w), [average], rtol=1e-6)
