"""`schedules.BEMA`: the bias-corrected EMA, against the paper's formulas."""

import keras
import numpy as np
import pytest

import keras_ema
from keras_ema import schedules
from conftest import bits, regression_data, small_model, sync


def _reference(history, start_step=0, every=1, params=None, switch=None):
    """BEMA in numpy, float32 as the optimizer computes it.

    `history[s]`: the weights after real update `s` (`s = 0`: before
    training). `switch`: `(s, params)`, parameters set before update `s`.
    """
    p = {"ema_power": 0.5, "bias_power": 0.2, "lag": 10.0, "multiplier": 1.0,
         "min_ema_multiplier": 0.0, **(params or {})}
    average = ema = start = np.float32(history[0])
    for s in range(1, len(history)):
        if switch is not None and s == switch[0]:
            p.update(switch[1])
        w = np.float32(history[s])
        since = s - start_step
        if since <= 0:
            average = ema = start = w
        elif since % every == 0:
            age = p["lag"] + p["multiplier"] * float(since)
            beta = np.float32(max(age ** -p["ema_power"],
                                  p["min_ema_multiplier"]))
            alpha = np.float32(age ** -p["bias_power"])
            ema = ema - beta * (ema - w)
            average = ema + alpha * (w - start)
    return average


def _fit(schedule=None, epochs=2, model=None, callbacks=(), **kwargs):
    """Fits a small model with BEMA, recording every variable's value
    before training and after every update."""
    model = model or small_model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=schedule or schedules.BEMA(),
        **kwargs)
    model.compile(optimizer=opt, loss="mse")
    if not opt.trainable_weights_only:
        opt.shadow_copy(model)
    history = [[v.numpy() for v in model.variables]]

    def record(batch, logs):
        sync(model)
        history.append([v.numpy() for v in model.variables])

    model.fit(*regression_data(), batch_size=8, epochs=epochs, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(
                  on_train_batch_end=record), *callbacks])
    return model, opt, history


def _same(a, b):
    return len(a) == len(b) and all(map(np.array_equal, a, b))


def _check_against_reference(model, opt, history, **reference):
    checked = 0
    for i, variable in enumerate(model.variables):
        average = opt.average(variable)
        if average is None:
            continue
        expected = _reference([h[i] for h in history], **reference)
        np.testing.assert_allclose(np.asarray(average), expected,
                                   rtol=2e-6, atol=1e-7)
        checked += 1
    return checked


@pytest.mark.parametrize("start_step, every", [(0, 1), (3, 1), (0, 3), (2, 4)])
def test_bema_matches_the_papers_formulas_in_fit(start_step, every):
    model, opt, history = _fit(start_step=start_step, update_every=every)
    assert len(history) == 17
    assert _check_against_reference(model, opt, history,
                                     start_step=start_step, every=every) == 4
    # The correction is there: BEMA is not the plain EMA of the same betas.
    kernel = model.variables[0]
    plain = _reference([h[0] for h in history], start_step, every,
                       params={"bias_power": 60.0})
    assert np.max(np.abs(np.asarray(opt.average(kernel)) - plain)) > 1e-4


def test_bema_averages_batch_norm_statistics_too():
    model, opt, history = _fit(model=small_model(batchnorm=True),
                               trainable_weights_only=False, update_every=2)
    # Two kernels, two biases, gamma, beta, moving mean and variance.
    assert _check_against_reference(model, opt, history, every=2) == 8


def test_bema_parameters_set_during_training_take_effect_at_the_next_update():
    new = {"bias_power": 0.4, "lag": 4.0}

    class Switch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 4:
                self.model.optimizer.average_decay = schedules.BEMA(**new)

    model, opt, history = _fit(epochs=1, callbacks=[Switch()])
    # Set before update 5 (the batch of index 4), read by the compiled step
    # from variables: the reference switches there too.
    assert _check_against_reference(model, opt, history,
                                    switch=(5, new)) == 4
    assert opt.average_decay.get_config()["bias_power"] == 0.4


@pytest.mark.parametrize("kind", ["keras", "weights.h5"])
def test_bema_continues_exactly_after_a_save_and_reload(tmp_path, kind):
    x, y = regression_data()
    model, opt, history = _fit(epochs=1, start_step=1, update_every=2)
    path = str(tmp_path / f"mid.{kind}")
    if kind == "keras":
        model.save(path)
        loaded = keras.saving.load_model(path)
    else:
        model.save_weights(path)
        loaded = small_model()
        loaded.compile(optimizer=keras_ema.ExponentialMovingAverage.from_config(
            opt.get_config()), loss="mse")
        loaded.optimizer.build(loaded.trainable_variables)
        loaded.load_weights(path)
    assert isinstance(loaded.optimizer.average_decay, schedules.BEMA)
    if kind == "keras":
        plain = keras_ema.load_averaged(path)
        assert _same([bits(v) for v in plain.variables],
                     [bits(opt.average(v)) for v in model.variables])
    for m in (model, loaded):
        m.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.variables, loaded.variables):
        assert np.array_equal(bits(a), bits(b))
        assert np.array_equal(bits(opt.average(a)),
                              bits(loaded.optimizer.average(b)))


def test_bema_swap_round_trip_is_exact_and_swaps_in_the_corrected_value(
        tmp_path):
    model, opt, history = _fit(epochs=1)
    exported = keras_ema.export_averaged(model, str(tmp_path / "e.keras"))
    x = regression_data()[0][:4]
    weights = [bits(v) for v in model.variables]
    averages = [bits(opt.average(v)) for v in model.variables]
    teacher = keras.ops.convert_to_numpy(opt.call_with_averages(model, x))
    assert _same([bits(v) for v in exported.variables], averages)
    opt.swap_weights()
    assert _same([bits(v) for v in model.variables], averages)
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(model(x)), teacher)
    opt.swap_weights()
    assert _same([bits(v) for v in model.variables], weights)
    assert _same([bits(opt.average(v)) for v in model.variables], averages)


def test_bema_config_round_trip_and_defaults_are_trls():
    schedule = schedules.BEMA()
    assert schedule.get_config() == {
        "ema_power": 0.5, "bias_power": 0.2, "lag": 10.0, "multiplier": 1.0,
        "min_ema_multiplier": 0.0}
    opt = keras_ema.ExponentialMovingAverage(
        "sgd", average_decay=schedules.BEMA(bias_power=0.3))
    again = keras_ema.ExponentialMovingAverage.from_config(opt.get_config())
    assert again.average_decay.get_config() == opt.average_decay.get_config()
    # The EMA's decay at the first update (t = 1): 1 - 11 ** -0.5.
    np.testing.assert_allclose(float(schedule(0)), 1 - 11 ** -0.5, rtol=1e-6)


def test_bema_refuses_what_cannot_take_effect(tmp_path):
    with pytest.raises(ValueError, match="compensated=True"):
        keras_ema.ExponentialMovingAverage(
            "sgd", compensated=True, average_decay=schedules.BEMA())
    with pytest.raises(ValueError, match="lag \\+ multiplier >= 1"):
        schedules.BEMA(lag=0.0, multiplier=0.5)
    with pytest.raises(ValueError, match="bias_power"):
        schedules.BEMA(bias_power=-1.0)
    model, opt, _ = _fit(epochs=1)
    with pytest.raises(ValueError, match="switching to or from"):
        opt.average_decay = 0.999
    # A file of a plain EMA holds no EMA and theta_0 for BEMA's averages.
    plain = small_model()
    plain.compile(optimizer=keras_ema.ExponentialMovingAverage("sgd"),
                  loss="mse")
    plain.fit(*regression_data(), batch_size=32, epochs=1, verbose=0)
    path = str(tmp_path / "plain.weights.h5")
    plain.save_weights(path)
    before = [bits(opt.average(v)) for v in model.variables]
    with pytest.raises(ValueError, match="bias_corrected=False"):
        model.load_weights(path)
    assert _same([bits(opt.average(v)) for v in model.variables], before)
