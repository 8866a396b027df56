"""Post-hoc EMA's snapshots keep their promises under ordinary use (issue 24):
whatever is swapped in, whatever the optimizer did before, whatever
`steps_per_execution` or `BackupAndRestore` do, and with clear errors for a
folder that is not one run's series."""

import json
import os
import shutil
import warnings

import keras
import numpy as np
import pytest

import keras_ema
from keras_ema import schedules
from keras_ema import snapshots
from conftest import BACKEND, bits, numpy, sync


def _data(n=64, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32") * scale
    return x, np.sin(x.sum(1, keepdims=True) / scale).astype("float32")


def _model(units=8):
    return keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(units, activation="tanh"),
        keras.layers.Dense(1)])


def _compiled(sigma_rels=(0.05, 0.10), units=8, **compile_kwargs):
    model = _model(units)
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05), sigma_rels=sigma_rels)
    model.compile(optimizer=opt, loss="mse", **compile_kwargs)
    return model, opt


def _recorder(model, history):
    """Records the trainable weights (float64) after every batch."""
    def record(batch, logs):
        sync(model)
        history.append([numpy(v).astype("float64")
                        for v in model.trainable_variables])
    return keras.callbacks.LambdaCallback(on_train_batch_end=record)


def _power_ema(history, sigma_rel):
    """EDM2's power-function EMA of the recorded weights, in float64."""
    gamma = schedules.sigma_rel_to_gamma(sigma_rel)
    average = history[0]
    for t in range(1, len(history)):
        decay = (1 - 1 / t) ** (gamma + 1)
        average = [decay * a + (1 - decay) * w
                   for a, w in zip(average, history[t])]
    return average


def _relative_error(got, want, raw):
    """The distance of `got` to `want`, relative to that of the raw weights."""
    error = np.sqrt(sum(((g - w) ** 2).sum() for g, w in zip(got, want)))
    distance = np.sqrt(sum(((r - w) ** 2).sum() for r, w in zip(raw, want)))
    return error / distance


def _names(directory):
    return sorted(os.listdir(directory))


def _steps(directory):
    return [s for s, _ in snapshots.list_snapshots(directory)]


def _snapshot_arrays(path):
    meta = snapshots.read_meta(path)
    with np.load(path) as data:
        return meta, [[snapshots.read_average(data, meta, j, k)
                       for k in range(len(meta["variables"]))]
                      for j in range(len(meta["sigma_rels"]))]


# -- point 1: snapshots hold the averages whatever is swapped in ---------------


@pytest.mark.parametrize("order", ["swap_first", "snapshots_first"])
def test_snapshots_hold_each_profiles_averages_whatever_is_swapped_in(
        tmp_path, order):
    directory = str(tmp_path / "s")
    model, opt = _compiled()
    snap = keras_ema.PostHocSnapshots(directory, every=7)
    if order == "swap_first":
        callbacks = [keras_ema.SwapAverageWeights(end_with_averages=True), snap]
    else:
        callbacks = [snap, keras_ema.SwapAverageWeights(swap_on_epoch=True)]
    model.fit(*_data(), batch_size=8, epochs=3, verbose=0, callbacks=callbacks)
    if opt.averages_swapped_in:  # `end_with_averages`
        opt.swap_weights()
    sync(model)
    # 24 updates: snapshots at 7, 14, 21 and the final one at 24.
    assert _steps(directory) == [7, 14, 21, 24]
    meta, arrays = _snapshot_arrays(snapshots.list_snapshots(directory)[-1][1])
    variables = [model.variables[e["index"]] for e in meta["variables"]]
    for j, sigma_rel in enumerate(meta["sigma_rels"]):
        for variable, stored in zip(variables, arrays[j]):
            want = numpy(opt.average(variable, sigma_rel=sigma_rel))
            np.testing.assert_array_equal(stored.astype("float32"), want)
            assert np.abs(want - numpy(variable)).max() > 1e-5  # not raw
    # So the synthesis of a tracked width is that profile's average.
    keras_ema.synthesize(directory, model, 0.05)
    for variable in variables:
        np.testing.assert_allclose(
            numpy(variable), numpy(opt.average(variable, sigma_rel=0.05)),
            rtol=1e-6, atol=1e-7)


# -- point 2: an optimizer that trained before it was wrapped ------------------


def test_a_wrapped_trained_optimizer_counts_snapshots_from_the_wrapping(
        tmp_path):
    directory = str(tmp_path / "s")
    model = _model()
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = _data()
    model.fit(x, y, batch_size=8, epochs=5, verbose=0)  # 40 Adam updates
    opt = keras_ema.PostHocEMA(model.optimizer)
    model.compile(optimizer=opt, loss="mse")
    sync(model)
    history = [[numpy(v).astype("float64") for v in model.trainable_variables]]
    model.fit(x, y, batch_size=8, epochs=5, verbose=0, callbacks=[
        _recorder(model, history),
        keras_ema.PostHocSnapshots(directory, every=4)])
    assert int(numpy(opt.iterations)) == 80
    # The series counts the 40 updates the averages saw.
    assert _steps(directory) == list(range(4, 41, 4))
    assert [snapshots.read_meta(p)["t"] for _, p in
            snapshots.list_snapshots(directory)] == list(range(4, 41, 4))
    raw = history[-1]
    tracked = [numpy(opt.average(v, sigma_rel=0.10))
               for v in model.trainable_variables]
    keras_ema.synthesize(directory, model, 0.10)
    for variable, want in zip(model.trainable_variables, tracked):
        np.testing.assert_allclose(numpy(variable), want, rtol=1e-6, atol=1e-7)
    keras_ema.synthesize(directory, model, 0.07)
    got = [numpy(v).astype("float64") for v in model.trainable_variables]
    # Counted from the inner optimizer's iterations, this was 14.6% off.
    error = _relative_error(got, _power_ema(history, 0.07), raw)
    assert error < 0.01, error


# -- point 3: steps_per_execution ------------------------------------------------


@pytest.mark.skipif(BACKEND == "torch", reason="Keras' torch trainer "
                    "refuses steps_per_execution > 1")
def test_steps_per_execution_writes_at_the_first_batch_end_past_each_multiple(
        tmp_path):
    directory = str(tmp_path / "s")
    model, opt = _compiled(steps_per_execution=4)
    seen = {}

    def record(batch, logs):
        sync(model)
        step = int(numpy(opt.iterations))
        seen[step] = [[numpy(opt.average(v, sigma_rel=s))
                       for v in model.trainable_variables]
                      for s in opt.sigma_rels]

    model.fit(*_data(), batch_size=8, epochs=5, verbose=0, callbacks=[
        keras.callbacks.LambdaCallback(on_train_batch_end=record),
        keras_ema.PostHocSnapshots(directory, every=5)])
    assert sorted(seen) == list(range(4, 41, 4))
    # Multiples of 5: 5 -> 8, 10 -> 12, 15 -> 16, 20, 25 -> 28, 30 -> 32,
    # 35 -> 36, 40: none skipped, each at the real count it was written.
    assert _steps(directory) == [8, 12, 16, 20, 28, 32, 36, 40]
    for step, path in snapshots.list_snapshots(directory):
        meta, arrays = _snapshot_arrays(path)
        assert meta["step"] == meta["t"] == step
        for stored, want in zip(arrays, seen[step]):
            for s, w in zip(stored, want):
                np.testing.assert_array_equal(s.astype("float32"), w)


# -- points 4 and 5: resuming ----------------------------------------------------


class _Interrupt(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        sync(self.model)
        if int(numpy(self.model.optimizer.iterations)) == self.at:
            raise RuntimeError("interrupted")


@pytest.mark.parametrize("order", ["snapshots_first", "backup_first"])
def test_backup_and_restore_in_either_order_keeps_the_earlier_snapshots(
        tmp_path, order):
    directory, backup = str(tmp_path / "s"), str(tmp_path / "backup")
    x, y = _data()

    def callbacks(*more):
        pair = [keras_ema.PostHocSnapshots(directory, every=4),
                keras.callbacks.BackupAndRestore(backup)]
        if order == "backup_first":
            pair.reverse()
        return pair + list(more)

    model, _ = _compiled()
    # Backed up after epoch 3 (update 24), killed at update 28.
    with pytest.raises(RuntimeError, match="interrupted"):
        model.fit(x, y, batch_size=8, epochs=5, verbose=0,
                  callbacks=callbacks(_Interrupt(28)))
    assert _steps(directory) == list(range(4, 29, 4))
    kept = {p: open(p, "rb").read()
            for s, p in snapshots.list_snapshots(directory) if s <= 24}
    keras.backend.clear_session()
    model, _ = _compiled()
    with pytest.warns(UserWarning, match="abandoned"):
        model.fit(x, y, batch_size=8, epochs=5, verbose=0,
                  callbacks=callbacks())
    assert _steps(directory) == list(range(4, 41, 4))
    for path, content in kept.items():
        assert open(path, "rb").read() == content  # not rewritten
    assert [n for n in _names(directory) if "abandoned" in n] == [
        "snapshot-0000000028.npz.abandoned"]


def test_a_second_resume_never_overwrites_set_aside_snapshots(tmp_path):
    directory = str(tmp_path / "s")
    model, _ = _compiled()
    x, y = _data()
    fit = dict(batch_size=8, verbose=0)
    model.fit(x, y, epochs=1, **fit,
              callbacks=[keras_ema.PostHocSnapshots(directory, every=4)])
    checkpoint = str(tmp_path / "at8.keras")
    model.save(checkpoint)
    model.fit(x, y, epochs=2, **fit,
              callbacks=[keras_ema.PostHocSnapshots(directory, every=4)])
    first = {s: open(p, "rb").read()
             for s, p in snapshots.list_snapshots(directory) if s > 8}
    contents = []
    for seed in (1, 2):  # two runs resumed from the same checkpoint
        resumed = keras.models.load_model(checkpoint)
        with pytest.warns(UserWarning, match="abandoned"):
            resumed.fit(*_data(seed=seed), epochs=1, **fit, callbacks=[
                keras_ema.PostHocSnapshots(directory, every=4)])
        contents.append({s: open(p, "rb").read()
                         for s, p in snapshots.list_snapshots(directory)
                         if s > 8})
    assert _steps(directory) == [4, 8, 12, 16]
    path = os.path.join(directory, "snapshot-{:010d}.npz.abandoned")
    for step in (12, 16, 20, 24):
        assert open(path.format(step), "rb").read() == first[step]
    for step in (12, 16):
        assert open(path.format(step) + "-1", "rb").read() == contents[0][step]
        assert contents[0][step] != contents[1][step]
    assert len([n for n in _names(directory) if "abandoned" in n]) == 6


# -- point 6: float16 snapshots of large values --------------------------------


def test_float16_snapshots_store_what_float16_cannot_hold_in_float32(tmp_path):
    directory = str(tmp_path / "s")
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.BatchNormalization(momentum=0.5),
        keras.layers.Dense(1)])
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.01),
                               trainable_weights_only=False)
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    x, y = _data(scale=450.0)  # a variance of about 2e5
    with pytest.warns(UserWarning, match="moving_variance.*float32"):
        model.fit(x, y, batch_size=8, epochs=4, verbose=0, callbacks=[
            keras_ema.PostHocSnapshots(directory, every=8, dtype="float16")])
    sync(model)
    variance = [v for v in model.variables if "moving_variance" in v.path][0]
    tracked = numpy(opt.average(variance, sigma_rel=0.10))
    assert tracked.max() > 65504
    meta, arrays = _snapshot_arrays(snapshots.list_snapshots(directory)[-1][1])
    with np.load(snapshots.list_snapshots(directory)[-1][1]) as data:
        stored = {data[f"0/{k}"].dtype.name for k in range(len(arrays[0]))}
    assert stored == {"float16", "float32"}  # only the variance is wider
    keras_ema.synthesize(directory, model, 0.10)
    np.testing.assert_array_equal(numpy(variance), tracked)
    keras_ema.synthesize(directory, model, 0.07)
    for v in model.variables:
        assert np.all(np.isfinite(numpy(v))), v.path


# -- point 7: a folder that is not one run's series ------------------------------


def _trained_series(directory, every=8, epochs=4, **kwargs):
    model, opt = _compiled(**kwargs)
    model.fit(*_data(), batch_size=8, epochs=epochs, verbose=0,
              callbacks=[keras_ema.PostHocSnapshots(directory, every=every)])
    return model, opt


def test_files_that_are_not_snapshots_get_an_error_naming_them(tmp_path):
    directory = str(tmp_path / "s")
    model, _ = _trained_series(directory)
    before = [bits(v) for v in model.variables]
    good = snapshots.list_snapshots(directory)[-1][1]
    bad = os.path.join(directory, "snapshot-0000000040.npz")

    def truncated():
        with open(good, "rb") as f:
            content = f.read()
        with open(bad, "wb") as f:
            f.write(content[: len(content) // 2])

    def foreign():
        with open(bad, "wb") as f:
            np.savez(f, weights=np.ones(3))

    def pickled():
        with open(bad, "wb") as f:
            np.save(f, np.array([{"a": 1}], dtype=object), allow_pickle=True)

    def text():
        with open(bad, "w") as f:
            f.write("not a snapshot")

    def flipped():
        content = bytearray(open(good, "rb").read())
        content[len(content) // 3] ^= 0xFF
        with open(bad, "wb") as f:
            f.write(bytes(content))

    for make in (truncated, foreign, pickled, text, flipped):
        make()
        with pytest.raises(ValueError, match=(
                r"cannot read the snapshot .*snapshot-0000000040\.npz.*"
                r"Instead, move it out")):
            keras_ema.synthesize(directory, model, 0.07)
        for a, b in zip(before, [bits(v) for v in model.variables]):
            np.testing.assert_array_equal(a, b)
        os.remove(bad)
    keras_ema.synthesize(directory, model, 0.07)


@pytest.mark.parametrize("other", ["run", "widths", "model"])
def test_snapshots_of_another_series_are_refused_naming_the_file(
        tmp_path, other):
    mine, theirs = str(tmp_path / "mine"), str(tmp_path / "theirs")
    model, _ = _trained_series(mine, every=8)  # 8, 16, 24, 32
    kwargs = {"widths": dict(sigma_rels=(0.05, 0.2)),
              "model": dict(units=16), "run": {}}[other]
    _trained_series(theirs, every=5, **kwargs)
    shutil.copy(os.path.join(theirs, "snapshot-0000000010.npz"), mine)
    what = {"run": "another training run", "widths": "other widths",
            "model": "another model"}[other]
    with pytest.raises(ValueError, match=(
            f"snapshot-0000000010.npz is of {what}.*Instead, keep one "
            "training run's snapshots per folder")):
        keras_ema.synthesize(mine, model, 0.07)
    # At an earlier step, the foreign file is not used.
    keras_ema.synthesize(mine, model, 0.07, step=8)


def test_a_model_that_is_not_the_snapshots_gets_an_error_naming_the_file(
        tmp_path):
    directory = str(tmp_path / "s")
    _trained_series(directory)
    with pytest.raises(ValueError, match=(
            r"snapshot-0000000032\.npz: 4 averaged variables.*architecture")):
        keras_ema.synthesize(directory, _model(units=16), 0.07)


def test_a_resumed_series_keeps_its_identity(tmp_path):
    directory = str(tmp_path / "s")
    model, _ = _trained_series(directory, epochs=1, every=4)
    checkpoint = str(tmp_path / "at8.keras")
    model.save(checkpoint)
    keras.backend.clear_session()
    resumed = keras.models.load_model(checkpoint)
    resumed.fit(*_data(), batch_size=8, epochs=2, verbose=0, callbacks=[
        keras_ema.PostHocSnapshots(directory, every=4)])
    runs = {snapshots.read_meta(p)["run"]
            for _, p in snapshots.list_snapshots(directory)}
    assert _steps(directory) == [4, 8, 12, 16, 20, 24] and len(runs) == 1
    keras_ema.synthesize(directory, resumed, 0.07)


def test_the_documented_widest_width_is_accepted_as_the_plain_mean(tmp_path):
    assert schedules.gamma_to_sigma_rel(0.0) < 0.2887
    power = schedules.Power(sigma_rel=0.2887)
    assert power.gamma == 0.0 and power.sigma_rel == 0.2887
    with pytest.raises(ValueError, match="sigma_rel"):
        schedules.Power(sigma_rel=0.28871)
    directory = str(tmp_path / "s")
    model, opt = _compiled(sigma_rels=(0.05, 0.2887))
    history = [[numpy(v).astype("float64") for v in model.trainable_variables]]
    model.fit(*_data(), batch_size=8, epochs=2, verbose=0, callbacks=[
        _recorder(model, history), keras_ema.PostHocSnapshots(directory, 8)])
    # gamma = 0: the mean of the weights after each update.
    for k, variable in enumerate(model.trainable_variables):
        mean = np.mean([h[k] for h in history[1:]], axis=0)
        np.testing.assert_allclose(
            numpy(opt.average(variable, sigma_rel=0.2887)), mean,
            rtol=1e-5, atol=1e-6)
    keras_ema.synthesize(directory, model, 0.2887)
    for k, variable in enumerate(model.trainable_variables):
        np.testing.assert_allclose(
            numpy(variable), np.mean([h[k] for h in history[1:]], axis=0),
            rtol=1e-5, atol=1e-6)


def test_a_width_far_from_the_tracked_ones_warns_with_the_fit_residual(
        tmp_path):
    directory = str(tmp_path / "s")
    model, _ = _trained_series(directory, every=4, epochs=4)  # 8 snapshots
    for far in (0.001, 0.005, 0.01):
        with pytest.warns(UserWarning, match=(
                rf"sigma_rel={far} poorly \(relative residual 0\.\d\d")):
            keras_ema.synthesize(directory, model, far)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for near in (0.05, 0.07, 0.10, 0.15):
            keras_ema.synthesize(directory, model, near)
    assert not [w for w in caught if "residual" in str(w.message)]


def test_format_1_snapshots_still_synthesize(tmp_path):
    directory = str(tmp_path / "s")
    model, _ = _trained_series(directory, every=4)
    raw = [numpy(v) for v in model.variables]
    keras_ema.synthesize(directory, model, 0.07)
    want = [numpy(v) for v in model.variables]
    for v, value in zip(model.variables, raw):
        v.assign(value)
    # Format 1, as keras-ema 0.3.0 wrote it: no series identity. Half the
    # files are rewritten, so the folder mixes both formats.
    for _, path in snapshots.list_snapshots(directory)[::2]:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files}
        meta = snapshots.read_meta(path)
        del meta["run"]
        meta["format"] = 1
        arrays["meta"] = np.frombuffer(
            json.dumps(meta).encode(), "uint8")
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    keras_ema.synthesize(directory, model, 0.07)
    for v, w in zip(model.variables, want):
        np.testing.assert_array_equal(numpy(v), w)


def test_compensated_applies_to_every_profile_and_round_trips():
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.1),
                               sigma_rels=(0.05, 0.10, 0.15),
                               compensated=True)
    assert [p.compensated for p in opt._profiles()] == [True] * 3
    # Each profile keeps a compensation buffer per average once built.
    weights = [keras.Variable(np.zeros((3,), "float32"))]
    opt.build(weights)
    assert [len(p._ema_state.compensation) for p in opt._profiles()] == [1] * 3
    again = keras_ema.PostHocEMA.from_config(opt.get_config())
    assert [p.compensated for p in again._profiles()] == [True] * 3
