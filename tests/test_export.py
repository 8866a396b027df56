"""`export_averaged`: a plain `.keras` file that needs no keras_ema."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import bits, regression_data, small_model

import keras_ema

X, Y = regression_data(64)


def _trained(batchnorm=False):
    keras.utils.set_random_seed(0)
    model = small_model(batchnorm)
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.02), average_decay=0.9,
        trainable_weights_only=not batchnorm,
    )
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0)
    return model, opt


def _snapshot(model, opt):
    averages = [opt.average(v) for v in model.weights]
    return [bits(v) for v in model.weights] + [
        bits(a) for a in averages if a is not None
    ]


def _assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


# The fresh process cannot import keras_ema, as where it is not installed.
_LOAD_WITHOUT_KERAS_EMA = textwrap.dedent("""
    import sys

    class NotInstalled:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "keras_ema":
                raise ImportError("keras_ema is not installed here")

    sys.meta_path.insert(0, NotInstalled())

    import keras
    import numpy as np

    expected = np.load(sys.argv[2])
    model = keras.models.load_model(sys.argv[1])
    assert "keras_ema" not in sys.modules
    assert not model.compiled
    weights = model.get_weights()
    assert len(weights) == len(expected.files) - 2
    for i, weight in enumerate(weights):
        np.testing.assert_array_equal(weight, expected[f"weight{i}"])
    predictions = model.predict(expected["x"], verbose=0)
    np.testing.assert_allclose(predictions, expected["predictions"], rtol=1e-6)
    print("loaded without keras_ema")
""")


def test_export_loads_without_keras_ema_in_a_fresh_process(tmp_path):
    model, opt = _trained(batchnorm=True)
    path = tmp_path / "model_ema.keras"
    plain = keras_ema.export_averaged(model, path)
    with opt.averaged_weights():
        expected = model.get_weights()
        predictions = model.predict(X, verbose=0)
    _assert_same([bits(w) for w in plain.get_weights()],
                 [bits(w) for w in expected])
    np.savez(tmp_path / "expected.npz", x=X, predictions=predictions,
             **{f"weight{i}": w for i, w in enumerate(expected)})
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_KERAS_EMA, str(path),
         str(tmp_path / "expected.npz")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded without keras_ema" in result.stdout


@pytest.mark.parametrize("swapped_in", [False, True])
def test_export_leaves_model_weights_and_averages_untouched(
    tmp_path, swapped_in
):
    model, opt = _trained()
    if swapped_in:
        opt.swap_weights()
    before = _snapshot(model, opt)
    with opt.averaged_weights():
        expected = [bits(w) for w in model.get_weights()]
    plain = keras_ema.export_averaged(model, str(tmp_path / "ema.keras"))
    _assert_same(_snapshot(model, opt), before)
    assert opt.averages_swapped_in == swapped_in
    _assert_same([bits(w) for w in plain.get_weights()], expected)


@pytest.mark.parametrize(
    "filename, error",
    [("missing/ema.keras", FileNotFoundError), ("ema.h5", ValueError)],
)
def test_export_to_a_bad_path_raises_and_changes_nothing(
    tmp_path, filename, error
):
    model, opt = _trained()
    before = _snapshot(model, opt)
    with pytest.raises(error):
        keras_ema.export_averaged(model, str(tmp_path / filename))
    _assert_same(_snapshot(model, opt), before)
    assert not opt.averages_swapped_in
    assert os.listdir(tmp_path) == []


def test_export_needs_an_optimizer_that_keeps_averages(tmp_path):
    model = small_model()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="ExponentialMovingAverage"):
        keras_ema.export_averaged(model, str(tmp_path / "ema.keras"))
