"""`load_averaged` and `python -m keras_ema export`: the averages out of
training files, as plain models."""

import hashlib
import os
import runpy
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import bits
from conftest import predict_without_keras_ema
from conftest import regression_data
from conftest import small_model
from conftest import tensorflow_only

import keras_ema
from keras_ema import ExponentialMovingAverage
from keras_ema.__main__ import main
from keras_ema.loading import load_averaged

X, Y = regression_data(64)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiled(batchnorm=False, trainable_weights_only=True, posthoc=False):
    keras.utils.set_random_seed(0)
    model = small_model(batchnorm)
    inner = keras.optimizers.Adam(0.02)
    if posthoc:
        opt = keras_ema.PostHocEMA(inner, sigma_rels=(0.05, 0.10))
    else:
        opt = ExponentialMovingAverage(
            inner, average_decay=0.9,
            trainable_weights_only=trainable_weights_only,
        )
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    return model, opt


def _trained(**kwargs):
    model, opt = _compiled(**kwargs)
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0)
    return model, opt


def _averaged(model, opt, **which):
    """What the averages give on the original: weights' bits, predictions."""
    with opt.averaged_weights(**which):
        return ([bits(w) for w in model.get_weights()],
                model.predict(X, verbose=0))


def _assert_plain_holds(plain, expected):
    weights, predictions = expected
    assert not plain.compiled
    assert getattr(plain, "optimizer", None) is None
    got = [bits(w) for w in plain.get_weights()]
    assert len(got) == len(weights)
    for g, e in zip(got, weights):
        np.testing.assert_array_equal(g, e)
    np.testing.assert_array_equal(plain.predict(X, verbose=0), predictions)


def _digest(path):
    paths = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest(), [os.stat(p).st_mtime_ns for p in paths]


def _save(model, opt, path, swapped_in, **which):
    """`model.save` or `save_weights`, inside `averaged_weights()` if asked."""
    save = model.save if path.endswith(".keras") else model.save_weights
    if not swapped_in:
        save(path)
        return
    with opt.averaged_weights(**which):
        save(path)


# -- .keras files ----------------------------------------------------------


@pytest.mark.parametrize("batchnorm", [False, True],
                         ids=["dense", "batchnorm"])
def test_a_keras_file_gives_the_averages_whatever_the_swap_state(
    tmp_path, batchnorm
):
    model, opt = _trained(batchnorm=batchnorm,
                          trainable_weights_only=not batchnorm)
    expected = _averaged(model, opt)
    for swapped_in in (False, True):
        path = str(tmp_path / f"training_{swapped_in}.keras")
        _save(model, opt, path, swapped_in)
        before = _digest(path)
        plain = load_averaged(path)
        _assert_plain_holds(plain, expected)
        assert _digest(path) == before
    with pytest.raises(ValueError, match="leave `sigma_rel=None`"):
        load_averaged(path, sigma_rel=0.10)
    if batchnorm:
        # The BatchNorm statistics are averages too, not the raw ones.
        moving_mean = model.layers[1].moving_mean
        average = opt.average(moving_mean)
        assert not np.array_equal(bits(moving_mean), bits(average))
        np.testing.assert_array_equal(
            bits(plain.layers[1].moving_mean), bits(average))


def test_a_keras_file_of_a_mixed_precision_run_gives_the_averages(tmp_path):
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    model, opt = _trained()
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    expected = _averaged(model, opt)
    path = str(tmp_path / "training.keras")
    _save(model, opt, path, swapped_in=True)
    plain = load_averaged(path)
    assert plain.layers[0].dtype_policy.name == "mixed_float16"
    _assert_plain_holds(plain, expected)


def test_a_posthoc_file_gives_the_averages_of_the_chosen_width(tmp_path):
    model, opt = _trained(posthoc=True)
    expected = _averaged(model, opt, sigma_rel=0.10)
    first = _averaged(model, opt)
    # Saved with no profile swapped in, with the other one, with this one.
    for saved_with in (None, 0.05, 0.10):
        path = str(tmp_path / f"training_{saved_with}.keras")
        _save(model, opt, path, saved_with is not None, sigma_rel=saved_with)
        _assert_plain_holds(load_averaged(path, sigma_rel=0.10), expected)
    _assert_plain_holds(load_averaged(path), first)
    with pytest.raises(ValueError, match="sigma_rel=0.07"):
        load_averaged(path, sigma_rel=0.07)


# -- values only: .weights.h5 and tf.train.Checkpoint ------------------------


def _template(**kwargs):
    """The training script's model, rebuilt: same code, not trained."""
    model, opt = _compiled(**kwargs)
    return model, opt, [bits(v) for v in model.variables + opt.variables]


def _assert_untouched(model, opt, held):
    now = [bits(v) for v in model.variables + opt.variables]
    assert len(now) == len(held)
    for n, h in zip(now, held):
        np.testing.assert_array_equal(n, h)
    assert not opt.averages_swapped_in


@pytest.mark.parametrize("swapped_in, batchnorm",
                         [(False, False), (True, True)],
                         ids=["out-dense", "in-batchnorm"])
def test_a_weights_file_gives_the_averages_with_the_model(
    tmp_path, swapped_in, batchnorm
):
    settings = dict(batchnorm=batchnorm, trainable_weights_only=not batchnorm)
    model, opt = _trained(**settings)
    expected = _averaged(model, opt)
    path = str(tmp_path / "last.weights.h5")
    _save(model, opt, path, swapped_in)
    before = _digest(path)
    template, template_opt, held = _template(**settings)
    plain = load_averaged(path, model=template)
    _assert_plain_holds(plain, expected)
    _assert_untouched(template, template_opt, held)
    assert _digest(path) == before
    with pytest.raises(ValueError, match="without `model`.*pass `model=`"):
        load_averaged(path)
    with pytest.raises(ValueError, match="optimizer keeps no averages"):
        load_averaged(path, model=small_model(batchnorm))
    unbuilt = keras.Sequential([keras.layers.Dense(1)])
    unbuilt.compile(optimizer=ExponentialMovingAverage("sgd"), loss="mse")
    with pytest.raises(ValueError, match="not built"):
        load_averaged(path, model=unbuilt)


def test_a_keras_file_loads_into_a_given_model_too(tmp_path):
    model, opt = _trained(posthoc=True)
    expected = _averaged(model, opt, sigma_rel=0.10)
    path = str(tmp_path / "training.keras")
    _save(model, opt, path, swapped_in=True, sigma_rel=0.05)
    template, template_opt, held = _template(posthoc=True)
    _assert_plain_holds(
        load_averaged(path, model=template, sigma_rel=0.10), expected)
    _assert_untouched(template, template_opt, held)


@tensorflow_only
@pytest.mark.parametrize("root", ["plain", "mixed", "mixed-lso"])
def test_a_tf_checkpoint_gives_the_averages_with_the_model(tmp_path, root):
    import tensorflow as tf

    if root.startswith("mixed"):
        keras.mixed_precision.set_dtype_policy("mixed_float16")
    model, opt = _trained()
    expected = _averaged(model, opt)
    # Under mixed precision the user may checkpoint `compile`'s
    # LossScaleOptimizer or the ExponentialMovingAverage it wraps.
    saved = model.optimizer if root == "mixed-lso" else opt
    assert (saved is opt) == (root != "mixed-lso")
    folder = str(tmp_path / "ckpt")
    with opt.averaged_weights():
        prefix = tf.train.Checkpoint(model=model, optimizer=saved).save(
            os.path.join(folder, "ckpt"))
    before = _digest(folder)
    template, template_opt, held = _template()
    for path in (prefix, folder):  # a prefix, or the folder's latest
        _assert_plain_holds(load_averaged(path, model=template), expected)
    _assert_untouched(template, template_opt, held)
    assert _digest(folder) == before


# -- refusals ---------------------------------------------------------------


def test_a_file_saved_before_training_is_refused(tmp_path):
    model, _ = _compiled()
    path = str(tmp_path / "untrained.keras")
    model.save(path)
    with pytest.raises(ValueError, match="saved before training"):
        load_averaged(path)
    unbuilt = small_model()
    unbuilt.compile(optimizer=ExponentialMovingAverage("sgd"), loss="mse")
    unbuilt.save(path)
    with pytest.raises(ValueError, match="saved before training"):
        load_averaged(path)


def test_a_file_of_a_plain_optimizer_is_refused(tmp_path):
    model = small_model()
    model.compile(optimizer="adam", loss="mse")
    path = str(tmp_path / "plain.keras")
    model.save(path)
    with pytest.raises(ValueError, match=r"keeps none \(optimizer=Adam\)"):
        load_averaged(path)


def test_wrong_and_missing_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="file type"):
        load_averaged(str(tmp_path / "model.h5"))
    with pytest.raises(FileNotFoundError, match="no file"):
        load_averaged(str(tmp_path / "missing.keras"))
    if BACKEND == "tensorflow":
        with pytest.raises(FileNotFoundError,
                           match="no TensorFlow checkpoint"):
            load_averaged(str(tmp_path), model=small_model())
    else:
        with pytest.raises(ValueError, match="TensorFlow checkpoints on the"):
            load_averaged(str(tmp_path))


# -- the command line -------------------------------------------------------

def _python(*args, cwd):
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3",
           "PYTHONPATH": os.pathsep.join(
               [REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


def test_the_command_line_writes_a_plain_file_that_loads_without_keras_ema(
    tmp_path,
):
    model, opt = _trained(batchnorm=True, trainable_weights_only=False)
    _, predictions = _averaged(model, opt)
    training = str(tmp_path / "training.keras")
    _save(model, opt, training, swapped_in=True)
    before = _digest(training)
    plain = str(tmp_path / "plain.keras")
    result = _python("-m", "keras_ema", "export", training, plain,
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"wrote {plain}: the averaged weights of {training} as a plain model"]
    assert _digest(training) == before
    # No temporary left behind: it was renamed into place.
    assert sorted(os.listdir(tmp_path)) == ["plain.keras", "training.keras"]
    np.testing.assert_array_equal(
        predict_without_keras_ema(plain, X, tmp_path), predictions)


def _custom_loss(y_true, y_pred):
    return keras.ops.mean(keras.ops.abs(y_true - y_pred))


def test_the_command_line_exports_the_chosen_width_despite_a_custom_loss(
    tmp_path, capsys
):
    keras.utils.set_random_seed(0)
    model = small_model()
    opt = keras_ema.PostHocEMA(keras.optimizers.Adam(0.02))
    # Not registered: `keras.models.load_model` would need custom_objects.
    model.compile(optimizer=opt, loss=_custom_loss)
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0)
    expected = _averaged(model, opt, sigma_rel=0.10)
    training = str(tmp_path / "training.keras")
    model.save(training)
    plain = str(tmp_path / "plain.keras")
    assert main(["export", training, plain, "--sigma-rel", "0.1"]) == 0
    assert "(sigma_rel=0.1)" in capsys.readouterr().out
    _assert_plain_holds(keras.models.load_model(plain), expected)


def _untrained_file(path):
    model, _ = _compiled()
    model.save(path)


def _plain_optimizer_file(path):
    model = small_model()
    model.compile(optimizer="sgd", loss="mse")
    model.save(path)


@pytest.mark.parametrize("case, message", [
    ("missing", "found no file"),
    ("training suffix", "file type of TRAINING_FILE"),
    ("plain suffix", "file type of PLAIN_FILE"),
    ("plain folder", "found no folder"),
    ("same file", "writing over TRAINING_FILE"),
    ("untrained", "saved before training"),
    ("plain optimizer", "keeps none"),
])
def test_the_command_line_refuses_with_one_line_and_exit_code_2(
    tmp_path, capsys, case, message
):
    training = str(tmp_path / "training.keras")
    plain = str(tmp_path / "plain.keras")
    if case in ("same file", "plain suffix", "plain folder", "untrained"):
        _untrained_file(training)
    if case == "plain optimizer":
        _plain_optimizer_file(training)
    argv = {
        "training suffix": [str(tmp_path / "last.weights.h5"), plain],
        "plain suffix": [training, str(tmp_path / "plain.h5")],
        "plain folder": [training, str(tmp_path / "no" / "plain.keras")],
        "same file": [training, training],
    }.get(case, [training, plain])
    before = sorted(os.listdir(tmp_path))
    assert main(["export", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("python -m keras_ema export: error: ")
    assert message in err
    assert sorted(os.listdir(tmp_path)) == before


def test_the_command_line_has_help_and_exits_with_main_s_status(
    tmp_path, capsys, monkeypatch
):
    with pytest.raises(SystemExit) as raised:
        main(["export", "--help"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    assert "TRAINING_FILE" in text and "PLAIN_FILE" in text
    assert "--sigma-rel" in text
    # What `python -m keras_ema` runs, without starting a process.
    monkeypatch.delitem(sys.modules, "keras_ema.__main__")
    monkeypatch.setattr(sys, "argv", [
        "keras_ema", "export", str(tmp_path / "missing.keras"),
        str(tmp_path / "plain.keras")])
    with pytest.raises(SystemExit) as raised:
        runpy.run_module("keras_ema", run_name="__main__")
    assert raised.value.code == 2
    assert "found no file" in capsys.readouterr().err
