"""`CheckpointAveraging`: the last k raw checkpoints of a run, their average
(LAWA), and its row in `sweep_sigma_rel`."""

import os
import shutil

import keras
import numpy as np
import pytest

import keras_ema
from conftest import BACKEND, bits, numpy, regression_data, small_model
from keras_ema import CheckpointAveraging


class Capture(keras.callbacks.Callback):
    """The model's weights at each batch end, by update count."""

    def __init__(self):
        super().__init__()
        self.weights = {}

    def on_train_batch_end(self, batch, logs=None):
        model = self.model  # attaches a JAX trainer's state first
        updates = int(numpy(model.optimizer.iterations))
        self.weights[updates] = [numpy(v).copy() for v in model.weights]


def synced(model):
    """The model, with a JAX trainer's state attached to its variables."""
    if keras.backend.backend() == "jax":
        model.jax_state_sync()
    return model


def names(directory):
    return sorted(os.listdir(directory))


def checkpoint(updates, suffix=".weights.h5"):
    return f"checkpoint-{updates:010d}{suffix}"


def held(path):
    """The weights a checkpoint file holds, loaded into a fresh model."""
    fresh = small_model()
    fresh.load_weights(path)
    return [numpy(v) for v in fresh.weights]


def assert_same_bits(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(bits(a), bits(e))


def mean_of(weight_lists):
    """The uniform average, as numpy computes it, of several models'
    weights."""
    return [np.mean(np.stack(ws).astype("float64"), axis=0)
            for ws in zip(*weight_lists)]


def assert_average(model, expected):
    for v, e in zip(model.weights, expected):
        np.testing.assert_allclose(numpy(v), e, rtol=1e-6, atol=1e-7)


def test_checkpoints_at_multiples_of_every_hold_raw_weights_and_average_them(
        tmp_path):
    x, y = regression_data(32)
    model = small_model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=0.9)
    model.compile(optimizer=opt, loss="mse")
    capture = Capture()
    lawa = CheckpointAveraging(tmp_path / "lawa", every=4, k=3)
    # The averages go in around each validation and stay in between epochs:
    # the checkpoints written at the last batch of an epoch still hold the
    # raw weights.
    model.fit(x, y, batch_size=4, epochs=3, verbose=0,
              validation_data=(x, y),
              callbacks=[capture,
                         keras_ema.SwapAverageWeights(swap_on_epoch=True),
                         lawa])

    kept = [16, 20, 24]
    assert names(tmp_path / "lawa") == [checkpoint(n) for n in kept]
    assert lawa.files == [str(tmp_path / "lawa" / checkpoint(n))
                          for n in kept]
    for n, path in zip(kept, lawa.files):
        assert_same_bits(held(path), capture.weights[n])
    # The averages differ from the raw weights: a file holding them fails.
    with opt.averaged_weights():
        averages = [numpy(v) for v in model.weights]
    assert not np.array_equal(averages[0], capture.weights[24][0])

    assert lawa.average() is model
    assert_average(model, mean_of([capture.weights[n] for n in kept]))


def test_raw_weights_are_saved_while_averages_are_swapped_in(tmp_path):
    x, y = regression_data(32)
    model = small_model()
    opt = keras_ema.PostHocEMA(keras.optimizers.SGD(0.05),
                               sigma_rels=(0.05, 0.25))
    model.compile(optimizer=opt, loss="mse")
    raw, averaged, after = {}, {}, {}

    def weights():
        return [numpy(v).copy() for v in model.weights]

    def swap_in(batch, logs):
        updates = int(numpy(synced(model).optimizer.iterations))
        raw[updates] = weights()
        opt.swap_weights(sigma_rel=0.25)
        averaged[updates] = weights()

    def check_and_swap_out(batch, logs):
        updates = int(numpy(synced(model).optimizer.iterations))
        assert opt.profile(0.25).averages_swapped_in
        after[updates] = weights()
        opt.swap_weights()

    lawa = CheckpointAveraging(tmp_path, every=2, k=2)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[
        keras.callbacks.LambdaCallback(on_train_batch_end=swap_in),
        lawa,
        keras.callbacks.LambdaCallback(on_train_batch_end=check_and_swap_out),
    ])

    assert names(tmp_path) == [checkpoint(6), checkpoint(8)]
    for n, path in zip([6, 8], lawa.files):
        assert_same_bits(held(path), raw[n])
        assert not np.array_equal(raw[n][0], averaged[n][0])
    # The same width's averages are back in after each save, bit for bit.
    for n in range(1, 9):
        assert_same_bits(after[n], averaged[n])
    assert not opt.averages_swapped_in
    # Writing the mean over swapped-in averages would lose it at the swap.
    with opt.averaged_weights(sigma_rel=0.25):
        with pytest.raises(ValueError, match="swapped in.*Instead"):
            lawa.average()
        assert_same_bits(weights(), averaged[8])


def test_a_resumed_run_continues_the_rotation(tmp_path):
    x, y = regression_data(32)
    backup = str(tmp_path / "backup")

    def run(stop_at=None):
        """A fit of 2 epochs of 8 updates, as a fresh process runs it; the
        `BackupAndRestore` after ours restores the count of the last epoch
        end in its `on_train_begin`."""
        model = small_model()
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        capture = Capture()

        def crash(batch, logs):
            if max(capture.weights) == stop_at:
                raise RuntimeError("killed")

        lawa = CheckpointAveraging(tmp_path / "lawa", every=3, k=3,
                                   save_weights_only=False)
        model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[
            capture, lawa, keras.callbacks.BackupAndRestore(backup),
            keras.callbacks.LambdaCallback(on_train_batch_end=crash)])
        return capture, lawa

    # Killed at 14 updates, after the checkpoint of 12; the backup is of 8.
    with pytest.raises(RuntimeError, match="killed"):
        run(stop_at=14)
    kept = [6, 9, 12]
    assert names(tmp_path / "lawa") == [checkpoint(n, ".keras") for n in kept]
    lost = {n: held_by_keras(tmp_path / "lawa" / checkpoint(n, ".keras"))
            for n in (9, 12)}

    # A new callback on the same folder: from 8 updates on, the abandoned
    # run's 9 and 12 are set aside, and the kept 6 rotates out in turn.
    with pytest.warns(UserWarning, match="from beyond this run's update"):
        capture, lawa = run()
    kept = [9, 12, 15]
    assert names(tmp_path / "lawa") == sorted(
        [checkpoint(n, ".keras") for n in kept]
        + [checkpoint(n, ".keras.abandoned") for n in (9, 12)])
    for n, path in zip(kept, lawa.files):
        assert_same_bits(held_by_keras(path), capture.weights[n])
    for n in (9, 12):
        assert_same_bits(held_by_keras(
            tmp_path / "lawa" / checkpoint(n, ".keras.abandoned")), lost[n])
    fresh = small_model()
    assert lawa.average(fresh) is fresh
    assert_average(fresh, mean_of([capture.weights[n] for n in kept]))


def held_by_keras(path):
    """The weights of a `.keras` checkpoint (also one set aside)."""
    path = str(path)
    if path.endswith(".abandoned"):
        # Keras reads a file by its suffix.
        path = shutil.copy(path, path[:-len(".abandoned")] + "-copy.keras")
    return [numpy(v) for v in keras.saving.load_model(path).weights]


class Fragile(keras.layers.Layer):
    """A layer whose saving fails on demand, as a full disk would."""

    fail = False

    def call(self, x):
        return x

    def save_own_variables(self, store):
        if self.fail:
            raise OSError("No space left on device")
        super().save_own_variables(store)


def test_a_failed_save_leaves_the_kept_checkpoints_whole(tmp_path):
    x, y = regression_data(32)
    fragile = Fragile()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1),
                              fragile])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")

    def break_at_six(batch, logs):
        fragile.fail = int(numpy(synced(model).optimizer.iterations)
                           ) == 6

    with pytest.raises(OSError, match="No space left"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[
            keras.callbacks.LambdaCallback(on_train_batch_end=break_at_six),
            CheckpointAveraging(tmp_path, every=2, k=2),
        ])
    # The two complete files, and no temporary.
    assert names(tmp_path) == [checkpoint(2), checkpoint(4)]
    fragile.fail = False
    for name in names(tmp_path):
        model.load_weights(tmp_path / name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(every=0), "does not support every=0"),
    (dict(every=2.0), "does not support every=2.0"),
    (dict(every=True), "does not support every=True"),
    (dict(every=2, k=0), "does not support k=0"),
    (dict(every=2, k="5"), "does not support k='5'"),
    (dict(every=2, save_weights_only=None),
     "does not support save_weights_only=None"),
])
def test_bad_arguments_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match + r".*Instead"):
        CheckpointAveraging(tmp_path, **kwargs)


def test_a_bad_directory_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    for directory, match in [(None, "directory=None"),
                             (tmp_path / "file", "a file"),
                             ("gs://bucket/lawa", "a remote directory")]:
        with pytest.raises(ValueError, match=match + r".*Instead"):
            CheckpointAveraging(directory, every=2)


def test_average_needs_a_model_and_checkpoints(tmp_path):
    lawa = CheckpointAveraging(tmp_path, every=2)
    with pytest.raises(ValueError, match="model=None.*Instead"):
        lawa.average()
    with pytest.raises(ValueError, match="holds no checkpoint.*Instead"):
        lawa.average(small_model())


def test_sweep_shows_the_lawa_average_beside_the_widths(tmp_path):
    x, y = regression_data(32)
    x_val, y_val = regression_data(16, seed=1)
    model = small_model()
    model.compile(optimizer=keras_ema.PostHocEMA(keras.optimizers.SGD(0.05)),
                  loss="mse")
    lawa = CheckpointAveraging(tmp_path / "lawa", every=4, k=3)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[
        keras_ema.PostHocSnapshots(tmp_path / "snapshots", every=4), lawa])
    before = [numpy(v).copy() for v in model.variables]

    result = keras_ema.sweep_sigma_rel(
        tmp_path / "snapshots", model, [0.05, 0.10], (x_val, y_val),
        verbose=0, lawa=lawa)
    assert_same_bits([numpy(v) for v in model.variables], before)

    expected = small_model()
    expected.compile(loss="mse")
    expected.set_weights(
        [w.astype("float32") for w in mean_of(held(f) for f in lawa.files)])
    loss = expected.evaluate(x_val, y_val, verbose=0, return_dict=True)["loss"]
    assert result.lawa["checkpoints"] == 3
    np.testing.assert_allclose(result.lawa["loss"], loss, rtol=1e-5)
    assert result.lawa["loss"] != result.raw["loss"]
    assert result.table().splitlines()[-1] == (
        f"lawa k=3   {result.lawa['loss']:10.4f}")
    # Without `lawa`, no row; nothing to average is refused before any work.
    plain = keras_ema.sweep_sigma_rel(
        tmp_path / "snapshots", model, [0.05], (x_val, y_val), verbose=0)
    assert plain.lawa is None and "lawa" not in plain.table()
    for bad, match in [(lawa.files, "does not support lawa=\\["),
                       (CheckpointAveraging(tmp_path / "none", every=4),
                        "without checkpoints")]:
        with pytest.raises(ValueError, match=match + ".*Instead"):
            keras_ema.sweep_sigma_rel(tmp_path / "snapshots", model, [0.05],
                                      (x_val, y_val), lawa=bad)


def test_counts_real_updates_and_skips_no_multiple(tmp_path):
    # 16 batches, 8 real updates (gradient accumulation over 2 batches). With
    # 4 batches per execution, the batch ends come at 2, 4, 6 and 8 updates:
    # the first at or past each multiple of 3 writes, at the count it
    # reached. Keras' torch trainer runs one batch per execution.
    per_execution = 1 if BACKEND == "torch" else 4
    x, y = regression_data(32)
    model = small_model()
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, gradient_accumulation_steps=2),
        loss="mse", steps_per_execution=per_execution)
    capture = Capture()
    lawa = CheckpointAveraging(tmp_path, every=3, k=5)
    model.fit(x, y, batch_size=2, epochs=1, verbose=0,
              callbacks=[capture, lawa])
    if per_execution == 4:
        assert sorted(capture.weights) == [2, 4, 6, 8]
        written = [4, 6]
    else:
        assert sorted(capture.weights) == list(range(9))
        written = [3, 6]
    assert names(tmp_path) == [checkpoint(n) for n in written]
    for n, path in zip(written, lawa.files):
        assert_same_bits(held(path), capture.weights[n])
