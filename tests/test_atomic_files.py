"""Checkpoints and exports are replaced whole: never truncated, never lost.

A process killed, or a save that raises, while `AverageModelCheckpoint` or
`export_averaged` writes must leave the previous file loadable.
"""

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import time
import traceback

import keras
import numpy as np
import pytest
from conftest import BACKEND, bits, regression_data, sync

import keras_ema
from keras_ema import AverageModelCheckpoint

X, Y = regression_data(64)
FORMATS = {"keras": "ema.keras", "weights": "ema.weights.h5"}
KILLS = 12


@keras.saving.register_keras_serializable("test_atomic_files")
class _FailsToSave(keras.layers.Dense):
    """A Dense layer whose saving raises `failure`, when one is set.

    It raises from inside Keras' writer, once the file is open and partly
    written, as a full disk or an interrupt would.
    """

    failure = None

    def save_own_variables(self, store):
        if _FailsToSave.failure is not None:
            raise _FailsToSave.failure
        super().save_own_variables(store)


def _compiled():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)),
        _FailsToSave(8, activation="relu"),
        keras.layers.Dense(1),
    ])
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.02), average_decay=0.9
    )
    model.compile(optimizer=opt, loss="mse")
    return model, opt


def _fit(model, callbacks, epochs=1):
    model.fit(X, Y, batch_size=16, epochs=epochs, callbacks=callbacks,
              verbose=0)
    sync(model)


def _averages(model, opt):
    return [bits(opt.average(v)) for v in model.trainable_variables]


def _saved_weights(path):
    if path.endswith(".keras"):
        saved = keras.models.load_model(path)
    else:
        saved, _ = _compiled()
        saved.load_weights(path)
    return [bits(v) for v in saved.trainable_variables]


def _assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


def _checkpoint(path):
    return AverageModelCheckpoint(
        path, save_weights_only=path.endswith(".weights.h5")
    )


def _temporaries(folder):
    return sorted(n for n in os.listdir(folder) if n.startswith(".tmp-"))


def _read_by_an_earlier_reader(path, save):
    """What a reader that opened `path` before `save()` reads after it.

    An evaluation job reading a checkpoint while training saves the next one
    must get the previous file whole, not a file rewritten under it.
    """
    with open(path, "rb") as reader:
        save()
        return reader.read()


def _load_bytes(folder, filename, data):
    copy = folder / "previous" / filename
    copy.parent.mkdir()
    copy.write_bytes(data)
    return _saved_weights(str(copy))


# -- killed mid-save -----------------------------------------------------------


def _big_model():
    """About 5.2M float32 weights (21 MB), and as many averages."""
    # Zeros: the raw weights play no part, and random initializers cost
    # each saver a compilation on JAX.
    model = keras.Sequential([keras.Input((1024,))] + [
        keras.layers.Dense(1024, kernel_initializer="zeros") for _ in range(5)
    ])
    opt = keras_ema.ExponentialMovingAverage(keras.optimizers.SGD(0.01))
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)
    return model, opt


def _save_forever(folder, fmt, round_):
    """Saves distinguishable averages again and again, until killed.

    The n-th save of round r holds averages all equal to 1000 r + n; each is
    logged in `record.txt` before ("saving") and after ("saved") its save.
    """
    # Anything printed would garble the pids the server writes to stdout.
    os.dup2(2, 1)
    with open(os.path.join(folder, "record.txt"), "a") as record:
        try:
            model, opt = _big_model()
            checkpoint = _checkpoint(os.path.join(folder, FORMATS[fmt]))
            checkpoint.set_model(model)
            for epoch in itertools.count():
                value = 1000 * round_ + epoch + 1
                for variable in model.trainable_variables:
                    opt.average(variable).assign(
                        np.full(variable.shape, value, "float32")
                    )
                record.write(f"saving {value}\n")
                record.flush()
                start = time.perf_counter()
                checkpoint.on_epoch_begin(epoch)
                checkpoint.on_epoch_end(epoch, {})
                record.write(f"saved {value} {time.perf_counter() - start}\n")
                record.flush()
        except BaseException:
            record.write(f"error {traceback.format_exc()!r}\n")
        finally:
            record.flush()
            os._exit(1)


def _serve(folder, fmt):
    """Forks one saver per round number read from stdin.

    Keras and the backend are imported once, here, and no backend op runs
    before forking: each saver starts clean, and twenty kills do not cost
    twenty imports of the backend.
    """
    # The first serialization imports Keras' optional modules (TensorFlow,
    # when installed, on every backend): seconds each saver would spend
    # before its first file is even open.
    keras.saving.serialize_keras_object(keras.layers.Dense(1))
    for line in sys.stdin:
        pid = os.fork()
        if pid == 0:
            _save_forever(folder, fmt, int(line))
        print(pid, flush=True)
        print(os.waitpid(pid, 0)[1], flush=True)


def _read_record(folder):
    """The values whose save began, and those whose save ended, in order."""
    path = os.path.join(folder, "record.txt")
    if not os.path.exists(path):
        return [], []
    with open(path) as f:
        lines = [line.split() for line in f if line.endswith("\n")]
    for line in lines:
        if line[0] == "error":
            raise AssertionError(f"the saver failed: {' '.join(line[1:])}")
    saving = [float(line[1]) for line in lines if line[0] == "saving"]
    saved = [(float(line[1]), float(line[2])) for line in lines
             if line[0] == "saved"]
    return saving, saved


def _wait_until(ready, what, folder, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready():
        _read_record(folder)
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.002)


def _files(folder):
    """The saved files, each with what writing changes: the name (a new
    file), or the inode, size or time (a file replaced or written in place).
    """
    files = {}
    for name in set(os.listdir(folder)) - {"record.txt"}:
        with contextlib.suppress(FileNotFoundError):
            stat = os.stat(os.path.join(folder, name))
            files[name] = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return files


def _wait_for_a_write(folder, before):
    _wait_until(lambda: _files(folder) != before, "write", folder)


def _write_seconds(folder):
    """How long the next save writes: from its first change to the folder
    until no temporary is left (none ever is, for a save in place)."""
    ended = len(_read_record(folder)[1])
    _wait_until(
        lambda: len(_read_record(folder)[1]) > ended, "end of save", folder
    )
    _wait_for_a_write(folder, _files(folder))
    start = time.monotonic()
    _wait_until(lambda: not _temporaries(folder), "rename", folder)
    return time.monotonic() - start


def _saved_value(path, reference):
    """The one value all weights in the file hold; fails on a bad file."""
    if path.endswith(".keras"):
        weights = keras.models.load_model(path).get_weights()
    else:
        reference.load_weights(path)
        weights = reference.get_weights()
    value = weights[0].flat[0]
    assert all((w == value).all() for w in weights)
    return float(value)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_checkpoint_killed_at_random_moments_is_the_old_or_the_new_one(
    tmp_path, fmt
):
    folder = str(tmp_path)
    target = os.path.join(folder, FORMATS[fmt])
    root = os.path.dirname(os.path.dirname(keras_ema.__file__))
    env = {
        **os.environ,
        "KERAS_BACKEND": BACKEND,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": os.pathsep.join(
            [root, os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]
        ),
    }
    server = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, test_atomic_files as t; t._serve(*sys.argv[1:])",
         folder, fmt],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True,
    )
    reference = _big_model()[0] if fmt == "weights" else None
    rng = random.Random(0)
    killed_mid_save = 0
    in_file = pid = None
    try:
        for round_ in range(1, KILLS + 1):
            before = _files(folder)
            server.stdin.write(f"{round_}\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            first = 1000 * round_ + 1
            if round_ == 1:
                # For there to be a previous file; then time a few saves.
                _wait_until(
                    lambda: first in [v for v, _ in _read_record(folder)[1]],
                    f"save of {first}", folder,
                )
                writing = min(_write_seconds(folder) for _ in range(3))
                before = _files(folder)
            # A random moment from when a save begins to write: in the
            # writing, the flushing, the renaming, or just after.
            _wait_for_a_write(folder, before)
            time.sleep(rng.uniform(0, 1.5 * writing))
            os.kill(pid, signal.SIGKILL)
            status = int(server.stdout.readline())
            pid = None
            saving, _ = _read_record(folder)
            assert os.WIFSIGNALED(status), "the saver ended before the kill"
            stray = _temporaries(folder)
            killed_mid_save += bool(stray)
            for name in stray:
                os.remove(os.path.join(folder, name))
            # The save under way, or the one before it: the previous in
            # this round, or what the last round left.
            new = saving[-1]
            old = new - 1 if new > first else in_file
            in_file = _saved_value(target, reference)
            assert in_file in (old, new)
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        server.kill()
        server.wait()
    # Enough kills landed while a file was being written, leaving its
    # temporary: the checks above are not vacuous.
    assert killed_mid_save >= KILLS // 5, killed_mid_save
    assert sorted(os.listdir(folder)) == sorted([FORMATS[fmt], "record.txt"])


# -- successful saves ----------------------------------------------------------


@pytest.mark.parametrize("filename", FORMATS.values())
def test_a_save_replaces_the_file_whole_and_leaves_no_temporary(
    tmp_path, filename
):
    model, opt = _compiled()
    path = str(tmp_path / filename)
    _fit(model, [_checkpoint(path)])
    first = _averages(model, opt)
    previous = _read_by_an_earlier_reader(
        path, lambda: _fit(model, [_checkpoint(path)])
    )
    _assert_same(_load_bytes(tmp_path, filename, previous), first)
    _assert_same(_saved_weights(path), _averages(model, opt))
    assert _temporaries(tmp_path) == []
    assert sorted(os.listdir(tmp_path)) == sorted([filename, "previous"])


def test_formatted_paths_and_save_freq_work_as_in_model_checkpoint(tmp_path):
    model, opt = _compiled()
    averages = {}

    def record(epoch, logs):
        averages[epoch + 1] = _averages(model, opt)

    # 4 batches per epoch, a save every 2: each file is written twice.
    checkpoint = AverageModelCheckpoint(
        str(tmp_path / "ema-{epoch:02d}.weights.h5"), save_weights_only=True,
        save_freq=2,
    )
    _fit(model, [checkpoint, keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: (sync(model), record(epoch, logs))
    )], epochs=2)
    assert sorted(os.listdir(tmp_path)) == [
        "ema-01.weights.h5", "ema-02.weights.h5"
    ]
    for epoch, expected in averages.items():
        path = str(tmp_path / f"ema-{epoch:02d}.weights.h5")
        _assert_same(_saved_weights(path), expected)


def test_a_checkpoint_behind_a_link_replaces_the_link_target(tmp_path):
    model, opt = _compiled()
    (tmp_path / "run").mkdir()
    target = tmp_path / "run" / "ema.keras"
    link = tmp_path / "latest.keras"
    link.symlink_to(target)
    _fit(model, [_checkpoint(str(link))], epochs=2)
    assert link.is_symlink()
    _assert_same(_saved_weights(str(target)), _averages(model, opt))
    assert os.listdir(tmp_path / "run") == ["ema.keras"]


def test_a_remote_path_is_written_directly():
    from keras_ema._files import atomic_path

    with atomic_path("gs://bucket/ema.keras") as path:
        assert path == "gs://bucket/ema.keras"


# -- saves that raise ----------------------------------------------------------

FAILURES = [OSError(28, "No space left on device"), KeyboardInterrupt()]
FAILURE_IDS = ["OSError", "KeyboardInterrupt"]


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
@pytest.mark.parametrize("filename", FORMATS.values())
def test_a_checkpoint_save_that_raises_leaves_the_previous_file(
    tmp_path, filename, failure
):
    model, opt = _compiled()
    path = str(tmp_path / filename)
    _fit(model, [_checkpoint(path)])
    first = _averages(model, opt)
    _FailsToSave.failure = failure
    try:
        with pytest.raises(type(failure)):
            _fit(model, [_checkpoint(path)])
    finally:
        _FailsToSave.failure = None
    sync(model)
    assert not opt.averages_swapped_in
    assert os.listdir(tmp_path) == [filename]
    _assert_same(_saved_weights(path), first)


def test_a_checkpoint_path_that_is_a_folder_keeps_keras_error(tmp_path):
    model, opt = _compiled()
    (tmp_path / "ema.keras").mkdir()
    with pytest.raises(IOError, match="non-directory filepath"):
        _fit(model, [_checkpoint(str(tmp_path / "ema.keras"))])
    assert os.listdir(tmp_path) == ["ema.keras"]
    assert os.listdir(tmp_path / "ema.keras") == []


@pytest.mark.parametrize("failure", FAILURES, ids=FAILURE_IDS)
def test_an_export_that_raises_leaves_the_previous_file(tmp_path, failure):
    model, opt = _compiled()
    path = str(tmp_path / "plain.keras")
    _fit(model, [])
    keras_ema.export_averaged(model, path)
    first = _averages(model, opt)
    _fit(model, [])
    _FailsToSave.failure = failure
    try:
        with pytest.raises(type(failure)):
            keras_ema.export_averaged(model, path)
    finally:
        _FailsToSave.failure = None
    assert os.listdir(tmp_path) == ["plain.keras"]
    _assert_same(_saved_weights(path), first)


def test_an_export_replaces_the_file_whole(tmp_path):
    model, opt = _compiled()
    path = str(tmp_path / "plain.keras")
    _fit(model, [])
    keras_ema.export_averaged(model, path)
    first = _averages(model, opt)

    def export_again():
        _fit(model, [])
        keras_ema.export_averaged(model, path)

    previous = _read_by_an_earlier_reader(path, export_again)
    _assert_same(_load_bytes(tmp_path, "plain.keras", previous), first)
    _assert_same(_saved_weights(path), _averages(model, opt))
    assert sorted(os.listdir(tmp_path)) == ["plain.keras", "previous"]
