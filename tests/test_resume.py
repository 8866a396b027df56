"""Resumed runs continue exactly, and never train from the averages."""

import shutil

import keras
import numpy as np
import pytest
from conftest import BACKEND, bits, regression_data, small_model

import keras_ema
from keras_ema import SwapAverageWeights

X, Y = regression_data(64)
VALIDATION = regression_data(32, seed=1)
FIT = dict(batch_size=16, shuffle=False, verbose=0, validation_data=VALIDATION)


def _compiled():
    keras.utils.set_random_seed(0)
    model = small_model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.Adam(0.01), average_decay=0.9
    )
    model.compile(optimizer=opt, loss="mse")
    return model, opt


def _state(model):
    opt = model.optimizer
    weights = model.trainable_weights
    averages = [opt.average(v) for v in weights]
    return [np.array(v.numpy()) for v in weights + averages]


def _assert_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-6)


@pytest.fixture
def uninterrupted():
    model, _ = _compiled()
    model.fit(X, Y, epochs=4, **FIT)
    return _state(model)


class _CrashAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("crash")


@pytest.mark.parametrize("written_while_swapped_in", [False, True])
def test_keras_file_resume_matches_an_uninterrupted_run(
    tmp_path, uninterrupted, written_while_swapped_in
):
    path = str(tmp_path / "run.keras")
    model, _ = _compiled()
    if written_while_swapped_in:
        callbacks = [SwapAverageWeights(swap_on_epoch=True),
                     keras.callbacks.ModelCheckpoint(path)]
        model.fit(X, Y, epochs=2, callbacks=callbacks, **FIT)
    else:
        model.fit(X, Y, epochs=2, callbacks=[SwapAverageWeights()], **FIT)
        model.save(path)
    resumed = keras.models.load_model(path)
    assert resumed.optimizer.averages_swapped_in == written_while_swapped_in
    resumed.fit(X, Y, initial_epoch=2, epochs=4,
                callbacks=[SwapAverageWeights()], **FIT)
    _assert_close(_state(resumed), uninterrupted)


def _optimizer_state(model):
    return [bits(v) for v in model.weights + model.optimizer.variables]


def test_backup_written_while_swapped_in_resumes_from_the_raw_weights(
    tmp_path, uninterrupted
):
    backup = str(tmp_path / "backup")
    model, opt = _compiled()
    # SwapAverageWeights before BackupAndRestore: each backup is written
    # while the averages are in; the crash comes before they are swapped out.
    with pytest.raises(RuntimeError, match="crash"):
        model.fit(X, Y, epochs=4, callbacks=[
            _CrashAtEpoch(2),
            SwapAverageWeights(swap_on_epoch=True),
            keras.callbacks.BackupAndRestore(backup),
        ], **FIT)
    assert opt.averages_swapped_in
    crashed = _optimizer_state(model)
    # Without the callback, the restored run refuses to train.
    fresh, fresh_opt = _compiled()
    refused = dict(epochs=4, callbacks=[keras.callbacks.BackupAndRestore(
        shutil.copytree(backup, str(tmp_path / "refused")),
        delete_checkpoint=False,
    )], **FIT)
    if BACKEND != "jax":
        with pytest.raises(ValueError, match="swapped"):
            fresh.fit(X, Y, **refused)
    else:
        # On JAX the refusal cannot raise: an error inside the compiled step
        # would lose the model's state, whose buffers the trainer donates to
        # it. Each step changes nothing; compiling it warns.
        with pytest.warns(UserWarning, match="change nothing"):
            fresh.fit(X, Y, **refused)
        assert fresh.history.epoch == [2, 3]
    assert fresh_opt.averages_swapped_in
    assert len(_optimizer_state(fresh)) == len(crashed)
    for actual, expected in zip(_optimizer_state(fresh), crashed):
        np.testing.assert_array_equal(actual, expected)
    # With it, in either order, the run goes on from the raw weights.
    for order in (1, -1):
        copy = shutil.copytree(backup, str(tmp_path / f"copy{order}"))
        fresh, _ = _compiled()
        fresh.fit(X, Y, epochs=4, callbacks=[
            SwapAverageWeights(swap_on_epoch=True),
            keras.callbacks.BackupAndRestore(copy),
        ][::order], **FIT)
        assert fresh.history.epoch == [2, 3]
        assert not fresh.optimizer.averages_swapped_in
        _assert_close(_state(fresh), uninterrupted)
