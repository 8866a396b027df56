"""`PostHocEMA`, `PostHocSnapshots`, `synthesize` and `sweep_sigma_rel`."""

import os

import keras
import numpy as np
import pytest

import keras_ema
from keras_ema import schedules
from keras_ema import synthesis
from conftest import BACKEND, bits, numpy, sync


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, np.sin(x.sum(1, keepdims=True)).astype("float32")


def _model(batchnorm=False):
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="tanh")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    return keras.Sequential(layers + [keras.layers.Dense(1)])


def _fit(opt, epochs, directory=None, every=25, batchnorm=False, model=None,
         dtype="float32"):
    """Fits on 64 samples in batches of 8, recording the averaged variables
    before training and after every update."""
    model = model or _model(batchnorm)
    if getattr(model, "optimizer", None) is None:
        model.compile(optimizer=opt, loss="mse")
    opt = model.optimizer
    if not opt.trainable_weights_only:
        opt.shadow_copy(model)  # the model whose statistics to average
    tracked = [v for v in model.variables if v.dtype == "float32"
               and (v.trainable or not opt.trainable_weights_only)]
    history = [[numpy(v).astype("float64") for v in tracked]]

    def record(batch, logs):
        sync(model)
        history.append([numpy(v).astype("float64") for v in tracked])

    callbacks = [keras.callbacks.LambdaCallback(on_train_batch_end=record)]
    if directory is not None:
        callbacks.append(
            keras_ema.PostHocSnapshots(directory, every=every, dtype=dtype)
        )
    model.fit(*_data(), batch_size=8, epochs=epochs, verbose=0,
              callbacks=callbacks)
    return model, tracked, history


def _power_ema(history, sigma_rel, every=1):
    """EDM2's power-function EMA of the recorded weights, in float64."""
    gamma = schedules.sigma_rel_to_gamma(sigma_rel)
    average = history[0]
    for t in range(every, len(history), every):
        decay = (1 - every / t) ** (gamma + 1)
        average = [decay * a + (1 - decay) * w
                   for a, w in zip(average, history[t])]
    return average


# -- PostHocEMA ----------------------------------------------------------------


def test_each_profile_is_a_power_ema_of_the_weights_batchnorm_included():
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05),
                               trainable_weights_only=False, update_every=2)
    model, tracked, history = _fit(opt, epochs=3, batchnorm=True)
    assert any("moving_mean" in v.path for v in tracked)
    for sigma_rel in (0.05, 0.10):
        expected = _power_ema(history, sigma_rel, every=2)
        for variable, want in zip(tracked, expected):
            got = numpy(opt.average(variable, sigma_rel=sigma_rel))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The two profiles differ: each has its own width.
    kernel = tracked[0]
    assert np.abs(numpy(opt.average(kernel, sigma_rel=0.05))
                  - numpy(opt.average(kernel, sigma_rel=0.10))).max() > 1e-4


def test_averaged_weights_swaps_in_the_chosen_profile_and_back():
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model, tracked, _ = _fit(opt, epochs=2)
    raw = [bits(v) for v in model.variables]
    for sigma_rel in (None, 0.05, 0.10):
        want = [bits(opt.average(v, sigma_rel=sigma_rel)) for v in tracked]
        with opt.averaged_weights(sigma_rel=sigma_rel):
            assert opt.averages_swapped_in
            held = [bits(v) for v in tracked]
        assert not opt.averages_swapped_in
        for got, expected in zip(held, want):
            np.testing.assert_array_equal(got, expected)
        for got, expected in zip([bits(v) for v in model.variables], raw):
            np.testing.assert_array_equal(got, expected)
    assert np.any(want[0] != raw[0])


def test_one_profile_at_most_is_swapped_in_and_training_refuses_meanwhile():
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model, tracked, _ = _fit(opt, epochs=1)
    opt.swap_weights(sigma_rel=0.10)
    with pytest.raises(ValueError, match="sigma_rel=0.1 are swapped in"):
        opt.swap_weights(sigma_rel=0.05)
    with pytest.raises(ValueError, match="swap those back first"):
        opt.averaged_weights()
    before = [bits(v) for v in opt.variables] + [bits(v) for v in model.variables]
    x, y = _data()
    if BACKEND == "jax":
        # A JAX step cannot raise without losing the state: it changes nothing.
        with pytest.warns(UserWarning):
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    else:
        with pytest.raises(Exception, match="swapped"):
            model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    after = [bits(v) for v in opt.variables] + [bits(v) for v in model.variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    # Without `sigma_rel`, `swap_weights` swaps back whichever is in.
    opt.swap_weights()
    assert not opt.averages_swapped_in


def test_untracked_widths_and_wrong_arguments_are_refused():
    opt = keras_ema.PostHocEMA("sgd", sigma_rels=(0.05, 0.10))
    with pytest.raises(ValueError, match="keep an average of sigma_rel=0.07"):
        opt.profile(0.07)
    for bad in ((), (0.05, 0.05), (0.5,), "0.05", (0.05, None)):
        with pytest.raises(ValueError, match="sigma_rels"):
            keras_ema.PostHocEMA("sgd", sigma_rels=bad)
    with pytest.raises(ValueError, match="average_decay"):
        keras_ema.PostHocEMA("sgd", average_decay=0.99)


def test_shared_settings_reach_every_profile():
    opt = keras_ema.PostHocEMA("sgd", sigma_rels=(0.05, 0.10, 0.2))
    opt.start_step = 4
    opt.update_every = 2
    for profile in opt._profiles():
        assert (profile.start_step, profile.update_every) == (4, 2)
    assert [p.average_decay.sigma_rel for p in opt._profiles()] == [0.05, 0.10, 0.2]


def test_save_and_load_keep_every_profile_bit_for_bit(tmp_path):
    opt = keras_ema.PostHocEMA(keras.optimizers.Adam(1e-2),
                               trainable_weights_only=False)
    model, tracked, _ = _fit(opt, epochs=1, batchnorm=True)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    again = loaded.optimizer
    assert type(again) is keras_ema.PostHocEMA
    assert again.sigma_rels == (0.05, 0.10)
    again.shadow_copy(loaded)
    for sigma_rel in (0.05, 0.10):
        for v, w in zip(model.variables, loaded.variables):
            if opt.average(v) is None:
                continue
            np.testing.assert_array_equal(
                bits(opt.average(v, sigma_rel=sigma_rel)),
                bits(again.average(w, sigma_rel=sigma_rel)),
            )
    # Both go on identically.
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    loaded.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    for v, w in zip(model.variables, loaded.variables):
        if opt.average(v) is not None:
            np.testing.assert_allclose(
                numpy(opt.average(v, sigma_rel=0.10)),
                numpy(again.average(w, sigma_rel=0.10)), rtol=1e-6, atol=1e-7)


def test_callbacks_and_export_use_the_first_profile_unless_told(tmp_path):
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model = _model()
    model.compile(optimizer=opt, loss="mse")
    x, y = _data()
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                        validation_data=(x, y),
                        callbacks=[keras_ema.SwapAverageWeights()])
    with opt.averaged_weights(sigma_rel=0.05):
        first = model.evaluate(x, y, verbose=0)
    assert history.history["val_loss"][-1] == pytest.approx(first, rel=1e-6)
    keras_ema.export_averaged(model, str(tmp_path / "wide.keras"), sigma_rel=0.10)
    plain = keras.models.load_model(str(tmp_path / "wide.keras"))
    for v, w in zip(model.trainable_variables, plain.trainable_variables):
        np.testing.assert_array_equal(
            numpy(opt.average(v, sigma_rel=0.10)), numpy(w))


# -- snapshots and synthesis ---------------------------------------------------


def test_synthesis_reproduces_tracked_and_new_widths(tmp_path):
    directory = str(tmp_path / "snapshots")
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    # 400 updates, a snapshot every 25: 16 per tracked profile.
    model, tracked, history = _fit(opt, epochs=50, directory=directory)
    assert len(os.listdir(directory)) == 16
    raw = [numpy(v) for v in model.variables]
    for sigma_rel, tolerance in ((0.05, None), (0.10, None), (0.07, 0.01),
                                 (0.15, 0.01)):
        coefficients = keras_ema.synthesize(directory, model, sigma_rel)
        assert sum(c for *_, c in coefficients) == pytest.approx(1.0)
        got = [numpy(v).astype("float64") for v in tracked]
        want = _power_ema(history, sigma_rel)
        if tolerance is None:
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        else:
            error = np.sqrt(sum(((g - w) ** 2).sum() for g, w in zip(got, want)))
            distance = np.sqrt(sum(((h - w) ** 2).sum()
                                   for h, w in zip(history[-1], want)))
            assert error < tolerance * distance, (sigma_rel, error / distance)
        for v, value in zip(model.variables, raw):
            v.assign(value)


def test_synthesis_at_an_earlier_snapshot_uses_only_the_ones_before(tmp_path):
    directory = str(tmp_path / "s")
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model, tracked, history = _fit(opt, epochs=20, directory=directory, every=16)
    coefficients = keras_ema.synthesize(directory, model, 0.10, step=96)
    assert max(step for step, *_ in coefficients) == 96
    want = _power_ema(history[:97], 0.10)
    for v, w in zip(tracked, want):
        np.testing.assert_allclose(numpy(v), w, rtol=1e-5, atol=1e-6)


def test_solver_matches_edm2_algorithm_3():
    # EDM2's `solve_posthoc_coefficients`, as published (np.linalg.solve).
    def correlation(a_t, a_g, b_t, b_g):
        ratio = a_t / b_t
        exp = np.where(a_t < b_t, b_g, -a_g)
        return ((a_g + 1) * (b_g + 1) * ratio ** exp
                / ((a_g + b_g + 1) * np.maximum(a_t, b_t)))

    in_t = np.repeat(np.arange(1, 9) * 1000.0, 2)
    in_s = np.tile([0.05, 0.10], 8)
    gammas = np.array([schedules.sigma_rel_to_gamma(s) for s in in_s])
    a = correlation(in_t[:, None], gammas[:, None], in_t[None], gammas[None])
    g = schedules.sigma_rel_to_gamma(0.13)
    b = correlation(in_t[:, None], gammas[:, None], np.array([[8000.0]]),
                    np.array([[g]]))
    expected = np.linalg.solve(a, b)[:, 0]
    expected /= expected.sum()
    got = synthesis.solve_coefficients(in_t, in_s, 8000.0, 0.13)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def test_bfloat16_snapshots_are_half_the_size_and_round_like_bfloat16(tmp_path):
    wide, narrow = str(tmp_path / "f32"), str(tmp_path / "bf16")
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model, tracked, history = _fit(opt, epochs=4, directory=wide, every=8)
    last = sorted(os.listdir(wide))[-1]
    from keras_ema import snapshots

    snapshots.write_snapshot(narrow, model, opt, 32, dtype="bfloat16")
    assert os.path.getsize(os.path.join(narrow, last)) < os.path.getsize(
        os.path.join(wide, last))
    keras_ema.synthesize(narrow, model, 0.05)
    want = _power_ema(history, 0.05)
    for v, w in zip(tracked, want):
        np.testing.assert_allclose(numpy(v), w, rtol=2 ** -8, atol=1e-6)


def test_a_resumed_fit_continues_the_series(tmp_path):
    directory = str(tmp_path / "s")
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model, _, _ = _fit(opt, epochs=3, directory=directory, every=8)
    checkpoint = str(tmp_path / "at24.keras")
    model.save(checkpoint)
    _fit(None, epochs=3, directory=directory, every=8, model=model)
    names = sorted(os.listdir(directory))
    assert names == [f"snapshot-{s:010d}.npz" for s in range(8, 49, 8)]
    # The run died; it resumes from step 24: the series goes on from there,
    # and the abandoned run's later snapshots are set aside, not deleted.
    resumed = keras.models.load_model(checkpoint)
    with pytest.warns(UserWarning, match="abandoned"):
        _fit(None, epochs=1, directory=directory, every=8, model=resumed)
    names = sorted(os.listdir(directory))
    assert [n for n in names if n.endswith(".npz")] == [
        f"snapshot-{s:010d}.npz" for s in range(8, 33, 8)]
    assert sum(n.endswith(".abandoned") for n in names) == 3
    assert not any(n.startswith(".tmp") for n in names)
    steps = [s for s, *_ in keras_ema.synthesize(directory, resumed, 0.10)]
    assert max(steps) == 32


def test_synthesize_refuses_what_it_cannot_do(tmp_path):
    directory = str(tmp_path / "s")
    os.makedirs(directory)
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model = _model()
    model.compile(optimizer=opt, loss="mse")
    with pytest.raises(ValueError, match="no snapshot"):
        keras_ema.synthesize(directory, model, 0.1)
    _fit(None, epochs=1, directory=directory, every=4, model=model)
    with pytest.raises(ValueError, match="no snapshot at that step"):
        keras_ema.synthesize(directory, model, 0.1, step=5)
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="architecture"):
        keras_ema.synthesize(directory, other, 0.1)
    before = [bits(v) for v in model.variables]
    with opt.averaged_weights():
        with pytest.raises(ValueError, match="swapped in"):
            keras_ema.synthesize(directory, model, 0.1)
    for a, b in zip(before, [bits(v) for v in model.variables]):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="PostHocEMA"):
        plain = _model()
        plain.compile(optimizer=keras_ema.ExponentialMovingAverage("sgd"),
                      loss="mse")
        plain.fit(*_data(), epochs=1, verbose=0,
                  callbacks=[keras_ema.PostHocSnapshots(directory, every=4)])


def test_a_rebuilt_model_takes_the_synthesis_by_position(tmp_path):
    directory = str(tmp_path / "s")
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model, tracked, _ = _fit(opt, epochs=2, directory=directory, every=8)
    keras_ema.synthesize(directory, model, 0.08)
    fresh = _model()  # new layer names: its paths differ
    assert fresh.variables[0].path != model.variables[0].path
    keras_ema.synthesize(directory, fresh, 0.08)
    for v, w in zip(model.variables, fresh.variables):
        np.testing.assert_array_equal(numpy(v), numpy(w))


# -- the sweep -------------------------------------------------------------------


def test_sweep_picks_the_best_width_and_leaves_the_model_as_it_was(
        tmp_path, capsys):
    directory = str(tmp_path / "s")
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model, _, _ = _fit(opt, epochs=10, directory=directory, every=10)
    before = [bits(v) for v in model.variables]
    widths = [0.03, 0.05, 0.10, 0.15]
    x, y = _data(seed=1)
    plot = str(tmp_path / "sweep.png")
    result = keras_ema.sweep_sigma_rel(directory, model, widths, (x, y),
                                       plot=plot)
    for a, b in zip(before, [bits(v) for v in model.variables]):
        np.testing.assert_array_equal(a, b)
    assert [r["sigma_rel"] for r in result.results] == widths
    # Each row is what evaluating that synthesis gives.
    for row in result.results:
        keras_ema.synthesize(directory, model, row["sigma_rel"])
        assert row["loss"] == pytest.approx(
            model.evaluate(x, y, verbose=0), rel=1e-6)
    assert result.best["loss"] == min(r["loss"] for r in result.results)
    assert result.raw["loss"] > 0
    printed = capsys.readouterr().out
    assert "<- best" in printed and "raw" in printed
    assert os.path.getsize(plot) > 1000
    result = keras_ema.sweep_sigma_rel(directory, model, widths, (x, y),
                                       keep_best=True, verbose=0)
    assert model.evaluate(x, y, verbose=0) == pytest.approx(
        result.best["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="metric='accuracy'"):
        keras_ema.sweep_sigma_rel(directory, model, widths, (x, y),
                                  metric="accuracy", verbose=0)


def test_callbacks_take_a_tracked_width(tmp_path):
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05))
    model = _model()
    model.compile(optimizer=opt, loss="mse")
    x, y = _data()
    path = str(tmp_path / "wide.keras")
    history = model.fit(
        x, y, batch_size=8, epochs=2, verbose=0, validation_data=(x, y),
        callbacks=[keras_ema.SwapAverageWeights(sigma_rel=0.10),
                   keras_ema.AverageModelCheckpoint(path, sigma_rel=0.10)])
    with opt.averaged_weights(sigma_rel=0.10):
        wide = model.evaluate(x, y, verbose=0)
    with opt.averaged_weights():
        narrow = model.evaluate(x, y, verbose=0)
    assert history.history["val_loss"][-1] == pytest.approx(wide, rel=1e-6)
    assert wide != pytest.approx(narrow, rel=1e-6)
    saved = keras.models.load_model(path)
    for v, w in zip(model.trainable_variables, saved.trainable_variables):
        np.testing.assert_array_equal(
            numpy(opt.average(v, sigma_rel=0.10)), numpy(w))
    with pytest.raises(ValueError, match="sigma_rel=0.07"):
        model.fit(x, y, epochs=1, verbose=0,
                  callbacks=[keras_ema.SwapAverageWeights(sigma_rel=0.07)])


def test_synthesis_streams_the_snapshots(tmp_path):
    import tracemalloc

    from keras_ema import snapshots

    directory = str(tmp_path / "s")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(512),
                              keras.layers.Dense(256), keras.layers.Dense(1)])
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.01))
    model.compile(optimizer=opt, loss="mse")
    model.fit(*_data(), batch_size=8, epochs=1, verbose=0)
    sync(model)
    for step in range(1, 31):  # 30 snapshots of 2 profiles: 60 model copies
        snapshots.write_snapshot(directory, model, opt, step)
    size = sum(int(np.prod(v.shape)) * 4 for v in model.trainable_variables)
    tracemalloc.start()
    try:
        keras_ema.synthesize(directory, model, 0.08)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A float64 sum (2 copies) and the array being read with its float64
    # product (measured 6.3 copies); holding the series would be 60.
    assert peak < 8 * size, peak / size


def test_synthesis_writes_averaged_batchnorm_statistics_too(tmp_path):
    directory = str(tmp_path / "s")
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05),
                               trainable_weights_only=False)
    model, tracked, history = _fit(opt, epochs=4, directory=directory,
                                   every=8, batchnorm=True)
    statistics = [v for v in model.non_trainable_variables
                  if "moving" in v.path]
    assert len(statistics) == 2
    raw = [numpy(v) for v in statistics]
    keras_ema.synthesize(directory, model, 0.10)
    for v, want in zip(tracked, _power_ema(history, 0.10)):
        np.testing.assert_allclose(numpy(v), want, rtol=1e-5, atol=1e-6)
    for v, r in zip(statistics, raw):
        assert np.abs(numpy(v) - r).max() > 1e-6  # not the raw statistics
