"""`schedules.Uniform` (SWA's mean) and `schedules.Power` (EDM2's power EMA)."""

import keras
import numpy as np
import pytest

import keras_ema
from keras_ema import schedules
from conftest import BACKEND, regression_data, small_model, sync


def _fit_recording(average_decay, epochs=3, **ema_kwargs):
    """Fits with the schedule, recording the first kernel before training
    and after every update."""
    model = small_model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=average_decay, **ema_kwargs
    )
    model.compile(optimizer=opt, loss="mse")
    kernel = model.trainable_variables[0]
    history = [kernel.numpy().astype("float64")]

    def record(batch, logs):
        sync(model)
        history.append(kernel.numpy().astype("float64"))

    model.fit(*regression_data(), batch_size=8, epochs=epochs, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=record)])
    return np.asarray(opt.average(kernel), "float64"), history


@pytest.mark.parametrize("start_step, every", [(0, 1), (3, 1), (0, 3), (5, 4)])
def test_uniform_is_the_mean_of_the_sampled_weights_in_fit(start_step, every):
    average, history = _fit_recording(
        schedules.Uniform(), start_step=start_step, update_every=every
    )
    # The weight at `start_step`, then after `start_step + m`, `+ 2m`, ...
    sampled = history[start_step::every]
    np.testing.assert_allclose(average, np.mean(sampled, axis=0), rtol=1e-6,
                               atol=1e-7)
    assert len(sampled) > 4


@pytest.mark.parametrize("every", [1, 2])
def test_power_matches_a_numpy_power_function_ema_in_fit(every):
    average, history = _fit_recording(
        schedules.Power(sigma_rel=0.10), update_every=every
    )
    gamma = schedules.sigma_rel_to_gamma(0.10)
    expected = history[0]
    for t in range(every, len(history), every):
        # `(1 - m / t) ** (gamma + 1)`, t the real updates so far.
        decay = (1 - every / t) ** (gamma + 1)
        expected = decay * expected + (1 - decay) * history[t]
    np.testing.assert_allclose(average, expected, rtol=1e-5, atol=1e-7)


def test_power_first_update_takes_the_weights():
    average, history = _fit_recording(schedules.Power(gamma=3.0), epochs=1)
    # Decays 0, then (1/2)**4, ...: the initial weight has no part in it.
    expected = history[1]
    for t in range(2, len(history)):
        decay = (1 - 1 / t) ** 4
        expected = decay * expected + (1 - decay) * history[t]
    np.testing.assert_allclose(average, expected, rtol=1e-5, atol=1e-7)


def test_sigma_rel_and_gamma_match_edm2():
    assert schedules.Power(sigma_rel=0.05).gamma == pytest.approx(16.97, abs=5e-3)
    assert schedules.Power(sigma_rel=0.10).gamma == pytest.approx(6.94, abs=5e-3)
    for gamma in (0.0, 1.5, 6.94, 16.97, 100.0):
        power = schedules.Power(gamma=gamma)
        s = power.sigma_rel
        assert s == pytest.approx(
            np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))), rel=1e-12
        )
        assert schedules.Power(sigma_rel=s).gamma == pytest.approx(gamma, rel=1e-9)


@pytest.mark.parametrize(
    "schedule", [schedules.Uniform(), schedules.Power(sigma_rel=0.05),
                 schedules.Power(gamma=7.0)]
)
def test_new_schedules_round_trip_through_their_config(schedule):
    config = schedules.serialize(schedule)
    again = schedules.deserialize(config)
    assert type(again) is type(schedule)
    assert again.get_config() == schedule.get_config()
    assert repr(again) == repr(schedule)
    n = np.arange(0, 50)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(again(n)),
        keras.ops.convert_to_numpy(schedule(n)),
    )


@pytest.mark.parametrize(
    "kwargs, name",
    [({}, "exactly one"), ({"sigma_rel": 0.1, "gamma": 3.0}, "exactly one"),
     ({"sigma_rel": 0.0}, "sigma_rel"), ({"sigma_rel": 0.3}, "sigma_rel"),
     ({"sigma_rel": True}, "sigma_rel"), ({"gamma": -0.5}, "gamma"),
     ({"gamma": float("nan")}, "gamma")],
)
def test_power_refuses_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        schedules.Power(**kwargs)


def test_uniform_complement_is_exact_in_float32_up_to_a_million_updates():
    # `1 - decay` computed from float32 `(k + 1) / (k + 2)` near k = 10**6
    # keeps 1 or 2 significant digits; the integer count keeps them all.
    n = np.arange(0, 10**6, dtype="int64")
    got = keras.ops.convert_to_numpy(schedules.complement(schedules.Uniform(), n))
    exact = np.float32(1.0) / (n + 2).astype("float32")
    np.testing.assert_array_equal(got, exact)
    naive = 1.0 - ((n + 1) / (n + 2)).astype("float32")
    assert np.max(np.abs(naive / exact - 1)) > 1e-2


def test_power_complement_keeps_its_digits_for_long_runs():
    n = np.arange(0, 10**6, 997, dtype="int64")
    schedule = schedules.Power(sigma_rel=0.05)
    got = keras.ops.convert_to_numpy(schedules.complement(schedule, n))
    exact = 1.0 - (1.0 - 1.0 / (n + 1.0)) ** (schedule.gamma + 1)
    np.testing.assert_allclose(got, exact, rtol=2e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="a million compiled updates "
                    "run in seconds in one `lax.fori_loop` on JAX only")
def test_uniform_mean_over_a_million_real_updates_is_exact_to_float32():
    import jax

    w = keras.Variable(np.zeros((4,), "float32"))
    # SGD(1) with gradient `w - target` sets the weight to `target`.
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(1.0), average_decay=schedules.Uniform()
    )
    opt.build([w])
    base = np.float32([0.5, -1.25, 3.0, 7.5])

    def target(i):
        return base * (1.0 + 0.25 * keras.ops.sin(keras.ops.cast(i, "float32")))

    def body(i, state):
        opt_values, w_value = state
        (w_new,), opt_new = opt.stateless_apply(
            opt_values, [w_value - target(i)], [w_value]
        )
        return opt_new, w_new

    steps = 10**6
    state = ([v.value for v in opt.variables], w.value)
    opt_values, _ = jax.jit(
        lambda s: jax.lax.fori_loop(0, steps, body, s)
    )(state)
    for variable, value in zip(opt.variables, opt_values):
        variable.assign(value)
    i = np.arange(steps, dtype="float64")
    targets = base[None, :] * (1.0 + 0.25 * np.sin(i.astype("float32")))[:, None]
    expected = (targets.sum(0)) / (steps + 1)  # the start weight is 0
    got = np.asarray(opt.average(w), "float64")
    # Measured 9e-7: the rounding of a float32 running mean, far below the
    # 1e-2 that a float32 `1 - decay` would give at this length.
    np.testing.assert_allclose(got, expected, rtol=1e-5)
