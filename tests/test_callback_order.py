"""`SwapAverageWeights` next to Keras' weight-handling callbacks, in every
order, and errors anywhere in a JAX `evaluate` or `predict`."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, bits, regression_data, small_model, sync
from test_callbacks import X_NAN
from test_callbacks import _assert_same
from test_callbacks import _averages
from test_callbacks import _finite_checking_model
from test_callbacks import _step_error
from test_callbacks import _weights

import keras_ema
from keras_ema import AverageModelCheckpoint, SwapAverageWeights

X, Y = regression_data(64)
X_VAL, Y_VAL = regression_data(32, seed=1)
# The first batch of 16 fails a model built with `check_finite`; X_NAN fails
# the second one.
X_NAN_FIRST = X_VAL.copy()
X_NAN_FIRST[0, 0] = np.nan
FIT = dict(batch_size=16, shuffle=False, verbose=0)
SWAP_FIRST, OTHER_FIRST = "SwapAverageWeights first", "the other first"


def _compiled(check_finite=False):
    keras.utils.set_random_seed(0)
    model = _finite_checking_model() if check_finite else small_model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.02), average_decay=0.9
    )
    model.compile(optimizer=opt, loss="mse")
    return model, opt


def _fit(model, callbacks=(), epochs=3, validation=True):
    return model.fit(
        X, Y, epochs=epochs, callbacks=list(callbacks),
        validation_data=(X_VAL, Y_VAL) if validation else None, **FIT,
    )


_REFERENCES = {}


def _reference(*epochs):
    """Raw weights and averages after fits of `epochs` epochs each, without
    any callback."""
    if epochs not in _REFERENCES:
        model, opt = _compiled()
        for n in epochs:
            _fit(model, epochs=n, validation=False)
        _REFERENCES[epochs] = _weights(model), _averages(model, opt)
    return _REFERENCES[epochs]


def _load_weights(path):
    model, opt = _compiled()
    # Build the optimizer first, so the file's optimizer state loads too.
    opt.shadow_copy(model)
    model.load_weights(path)
    return model, opt


class _Record(keras.callbacks.Callback):
    """Placed first: at each epoch end, the raw weights and the averages
    (nothing has swapped them in yet)."""

    def __init__(self):
        super().__init__()
        self.raw, self.averages = [], []

    def on_epoch_end(self, epoch, logs=None):
        model = self.model
        sync(model)
        assert not model.optimizer.averages_swapped_in
        self.raw.append(_weights(model))
        self.averages.append(_averages(model, model.optimizer))


class _Raise(keras.callbacks.Callback):
    def __init__(self, hook, error=RuntimeError, when=lambda *args: True):
        super().__init__()
        self.error, self.when = error, when
        setattr(self, hook, self._raise)

    def _raise(self, *args, **kwargs):
        if self.when(*args):
            raise self.error("interrupted")


class _StopMidEpoch(keras.callbacks.Callback):
    """Stops training in the middle of the second epoch."""

    def on_train_batch_end(self, batch, logs=None):
        sync(self.model)
        if self.model.optimizer.iterations.numpy() == 6:
            self.model.stop_training = True


# -- EarlyStopping(restore_best_weights=True) ---------------------------------

# What the model holds at the end, whether the averages are swapped in, and,
# once swapped out, the model and the optimizer's averages. EarlyStopping
# restores what it saw at the end of the best epoch: the raw weights unless
# it comes after a SwapAverageWeights(swap_on_epoch=True).
_EARLY_STOPPING_ENDS = {
    # (order, swap_on_epoch, end_with_averages)
    (SWAP_FIRST, False, False): ("raw best", False, "raw best", "avg last"),
    (OTHER_FIRST, False, False): ("raw best", False, "raw best", "avg last"),
    (OTHER_FIRST, False, True): ("avg last", True, "raw best", "avg last"),
    (SWAP_FIRST, True, False): ("avg best", False, "avg best", "avg last"),
    (SWAP_FIRST, True, True): ("avg best", True, "raw last", "avg best"),
}
_EARLY_STOPPING_ERRORS = {
    (SWAP_FIRST, False, True): r"end_with_averages=True\).*after it",
    (OTHER_FIRST, True, False): r"swap_on_epoch=True\).*before it",
    (OTHER_FIRST, True, True): r"swap_on_epoch=True\).*before it",
}


def _case_id(case):
    if isinstance(case, bool):
        return "stopped mid-epoch" if case else "to the end"
    order, swap_on_epoch, end_with_averages = case
    return (f"{order}, swap_on_epoch={swap_on_epoch}, "
            f"end_with_averages={end_with_averages}")


# A stop in the middle of an epoch still ends it (validation, then
# `on_epoch_end`): that matters where the averages are swapped in there.
_EARLY_STOPPING_RUNS = [(case, False) for case in sorted(_EARLY_STOPPING_ENDS)]
_EARLY_STOPPING_RUNS += [(case, True) for case, _ in _EARLY_STOPPING_RUNS
                         if case[1]]


def _early_stopping():
    # mode="max" on a falling loss makes the first epoch the best one.
    return keras.callbacks.EarlyStopping(
        monitor="val_loss", mode="max", patience=9, restore_best_weights=True
    )


def _in_order(order, swap, other):
    return [swap, *other] if order == SWAP_FIRST else [*other, swap]


@pytest.mark.parametrize("case, stop_mid_epoch", _EARLY_STOPPING_RUNS,
                         ids=_case_id)
def test_restore_best_weights_restores_what_it_saw_in_every_sound_order(
    case, stop_mid_epoch
):
    order, swap_on_epoch, end_with_averages = case
    ends = _EARLY_STOPPING_ENDS[case]
    in_model, swapped_in, raw_after, averages_after = ends
    model, opt = _compiled()
    record, early = _Record(), _early_stopping()
    swap = SwapAverageWeights(swap_on_epoch, end_with_averages)
    others = [early] + ([_StopMidEpoch()] if stop_mid_epoch else [])
    history = _fit(model, [record] + _in_order(order, swap, others))
    assert early.best_epoch == 0
    assert len(history.epoch) == (2 if stop_mid_epoch else 3)
    seen = {
        "raw best": record.raw[0], "raw last": record.raw[-1],
        "avg best": record.averages[0], "avg last": record.averages[-1],
    }
    sees_averages = swap_on_epoch and order == SWAP_FIRST
    best = "avg best" if sees_averages else "raw best"
    _assert_same([bits(w) for w in early.best_weights], seen[best])
    assert "evaluate" not in vars(model)
    assert opt.averages_swapped_in == swapped_in
    _assert_same(_weights(model), seen[in_model])
    if swapped_in:
        opt.swap_weights()
    _assert_same(_weights(model), seen[raw_after])
    _assert_same(_averages(model, opt), seen[averages_after])


@pytest.mark.parametrize("case", sorted(_EARLY_STOPPING_ERRORS), ids=_case_id)
def test_an_unsound_order_with_restore_best_weights_fails_at_the_first_validation(
    case
):
    # The order shows only in the callback list that `fit` hands its
    # validation (nothing reads stack frames): the first epoch trains, then
    # the error comes before EarlyStopping has seen a single epoch.
    order, swap_on_epoch, end_with_averages = case
    model, opt = _compiled()
    swap = SwapAverageWeights(swap_on_epoch, end_with_averages)
    expected = _EARLY_STOPPING_ERRORS[case]
    early = _early_stopping()
    with pytest.raises(ValueError, match=expected) as error:
        _fit(model, _in_order(order, swap, [early]))
    assert "Instead, place SwapAverageWeights" in str(error.value)
    assert early.best_weights is None
    assert opt.iterations.numpy() == len(X) // FIT["batch_size"]
    assert not opt.averages_swapped_in
    assert "evaluate" not in vars(model)
    _assert_same(_weights(model), _reference(1)[0])
    _assert_same(_averages(model, opt), _reference(1)[1])


# -- ModelCheckpoint and AverageModelCheckpoint -------------------------------


@pytest.mark.parametrize("swap_on_epoch", [False, True])
def test_checkpoints_before_and_after_it_save_what_they_document(
    tmp_path, swap_on_epoch
):
    paths = {}

    def checkpoints(where):
        for kind in ("keras", "average"):
            paths[kind, where] = str(tmp_path / f"{kind}_{where}.weights.h5")
        return [
            keras.callbacks.ModelCheckpoint(
                paths["keras", where], save_weights_only=True
            ),
            AverageModelCheckpoint(
                paths["average", where], save_weights_only=True
            ),
        ]

    model, opt = _compiled()
    record = _Record()
    _fit(model, [record, *checkpoints("before"),
                 SwapAverageWeights(swap_on_epoch), *checkpoints("after")])
    raw, averages = record.raw[-1], record.averages[-1]
    # Training itself is the same in every order, and as without callbacks.
    _assert_same(_weights(model), raw)
    _assert_same(_averages(model, opt), averages)
    _assert_same(raw, _reference(3)[0])
    _assert_same(averages, _reference(3)[1])
    # ModelCheckpoint saves the model as it finds it: the averages only
    # after a SwapAverageWeights(swap_on_epoch=True). AverageModelCheckpoint
    # saves the averages wherever it is.
    holds_averages = {
        ("keras", "before"): False,
        ("keras", "after"): swap_on_epoch,
        ("average", "before"): True,
        ("average", "after"): True,
    }
    for key, path in paths.items():
        saved, saved_opt = _load_weights(path)
        assert saved_opt.averages_swapped_in == holds_averages[key], key
        _assert_same(_weights(saved), averages if holds_averages[key] else raw)
        # The optimizer state in the file records the swap: each file
        # resumes training from the raw weights.
        if saved_opt.averages_swapped_in:
            saved_opt.swap_weights()
        _assert_same(_weights(saved), raw)
        _assert_same(_averages(saved, saved_opt), averages)


# -- BackupAndRestore ---------------------------------------------------------


@pytest.mark.parametrize("swap_on_epoch", [False, True])
@pytest.mark.parametrize("order", [SWAP_FIRST, OTHER_FIRST])
def test_backup_and_restore_resumes_exactly_in_every_order(
    tmp_path, order, swap_on_epoch
):
    backup_dir = str(tmp_path / "backup")

    def callbacks():
        backup = keras.callbacks.BackupAndRestore(backup_dir)
        return _in_order(order, SwapAverageWeights(swap_on_epoch), [backup])

    model, opt = _compiled()
    # Interrupted in the middle of the third epoch: the backup is that of
    # the end of the second.
    epoch = []
    track = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda e, logs: epoch.append(e)
    )
    interrupt = _Raise("on_train_batch_begin",
                       when=lambda batch, *_: epoch[-1] == 2 and batch == 1)
    with pytest.raises(RuntimeError):
        _fit(model, callbacks() + [track, interrupt], epochs=4)
    # Written with the averages in if SwapAverageWeights(swap_on_epoch=True)
    # came first.
    _, backup_opt = _load_weights(f"{backup_dir}/latest.weights.h5")
    assert backup_opt.averages_swapped_in == (
        swap_on_epoch and order == SWAP_FIRST
    )
    # A new process resumes from the backup, and ends as if never stopped.
    model, opt = _compiled()
    history = _fit(model, callbacks(), epochs=4)
    assert history.epoch == [2, 3]
    assert not opt.averages_swapped_in
    raw, averages = _reference(4)
    _assert_same(_weights(model), raw)
    _assert_same(_averages(model, opt), averages)


# -- Errors anywhere in evaluate and predict ----------------------------------


class _Batches(keras.utils.PyDataset):
    """X_VAL (and Y_VAL) in two batches; the one at `fail_at` raises once the
    call has begun (`_Arm`), so that a look at the data before cannot."""

    def __init__(self, targets, fail_at=None):
        super().__init__()
        self.targets, self.fail_at, self.armed = targets, fail_at, False

    def __len__(self):
        return 2

    def __getitem__(self, i):
        if self.armed and i == self.fail_at:
            raise _PipelineError("the data pipeline failed")
        part = slice(16 * i, 16 * (i + 1))
        return (X_VAL[part], Y_VAL[part]) if self.targets else X_VAL[part]


class _PipelineError(Exception):
    pass


def _pipeline_error():
    """What `evaluate` and `predict` raise when `_Batches` fails."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        # TensorFlow runs the PyDataset through `tf.data`.
        return tf.errors.UnknownError
    return _PipelineError


class _Arm(keras.callbacks.Callback):
    def __init__(self, data):
        super().__init__()
        self.data = data

    def on_test_begin(self, logs=None):
        self.data.armed = True

    on_predict_begin = on_test_begin


# name: (data, or the batch the pipeline fails at; whether a callback
# raises; the error to expect).
_FAILURES = {
    "a callback at the first batch end": (None, True, lambda: RuntimeError),
    "the pipeline at the first batch": (0, False, _pipeline_error),
    "the pipeline at the second batch": (1, False, _pipeline_error),
    "the pipeline after *_on_batch": (0, False, _pipeline_error),
    "the compiled first step": (X_NAN_FIRST, False, _step_error),
    "the compiled second step": (X_NAN, False, _step_error),
}


def _call(model, method, data, callbacks=()):
    if isinstance(data, keras.utils.PyDataset):
        args = (data,)
    else:
        args = (data,) if method == "predict" else (data, Y_VAL)
    kwargs = dict(verbose=0, callbacks=list(callbacks))
    if not isinstance(data, keras.utils.PyDataset):
        kwargs["batch_size"] = 16
    if method == "evaluate":
        return model.evaluate(*args, return_dict=True, **kwargs)
    return bits(model.predict(*args, **kwargs))


@pytest.mark.parametrize("method", ["evaluate", "predict"])
@pytest.mark.parametrize("failure", list(_FAILURES))
def test_an_error_anywhere_in_evaluate_or_predict_gives_the_weights_back(
    method, failure
):
    source, in_callback, error = _FAILURES[failure]
    compiled_step = isinstance(source, np.ndarray)
    model, opt = _compiled(check_finite=compiled_step)
    _fit(model, epochs=1, validation=False)
    raw, averages = _weights(model), _averages(model, opt)
    with opt.averaged_weights():
        expected = _call(model, method, X_VAL)
    swap = SwapAverageWeights()
    callbacks = [swap]
    data = X_VAL if source is None else source
    if in_callback:
        hook = "on_test_batch_end" if method == "evaluate" else (
            "on_predict_batch_end")
        callbacks.append(_Raise(hook))
    if isinstance(source, int):
        data = _Batches(method == "evaluate", fail_at=source)
        callbacks.append(_Arm(data))
    if failure.endswith("*_on_batch"):
        # Leaves the trainer holding a state that is stale once the call
        # below swaps the averages in.
        model.predict_on_batch(X_VAL[:16])
    with pytest.raises(error(), match="interrupted|pipeline failed|NaN"):
        _call(model, method, data, callbacks)
    # On JAX a failing compiled step consumes the state donated to it: the
    # averages in the model then are lost, and restart from the raw weights.
    lost = compiled_step and BACKEND == "jax"
    # The next use of the callback gives everything back, at the latest.
    again = _call(model, method, X_VAL, [swap])
    assert not opt.averages_swapped_in
    _assert_same(_weights(model), raw)
    if not lost:
        assert again == expected if method == "evaluate" else (
            np.array_equal(again, expected))
        _assert_same(_averages(model, opt), averages)
    # And the model trains again, from the raw weights.
    _fit(model, epochs=1, validation=False)
    if not compiled_step:
        _assert_same(_weights(model), _reference(1, 1)[0])


@pytest.mark.parametrize("method", ["evaluate", "predict"])
def test_an_error_in_a_call_inside_averaged_weights_gives_everything_back(
    method
):
    model, opt = _compiled()
    # The optimizer then knows the model, and can sync its JAX state itself.
    opt.shadow_copy(model)
    _fit(model, epochs=1, validation=False)
    raw, averages = _weights(model), _averages(model, opt)
    hook = "on_test_batch_end" if method == "evaluate" else (
        "on_predict_batch_end")
    with pytest.raises(RuntimeError, match="interrupted"):
        with opt.averaged_weights():
            _call(model, method, X_VAL, [_Raise(hook)])
    assert not opt.averages_swapped_in
    _assert_same(_weights(model), raw)
    _assert_same(_averages(model, opt), averages)
    _fit(model, epochs=1, validation=False)
    _assert_same(_weights(model), _reference(1, 1)[0])
