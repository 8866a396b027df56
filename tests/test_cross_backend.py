"""A `.keras` file written on one backend loads on the others, averages too."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import BACKEND

BACKENDS = ["tensorflow", "jax", "torch"]

# In the PyTorch run: the shortest of the three (tests/run_backends.py runs
# TensorFlow beside JAX, then PyTorch).
pytestmark = pytest.mark.skipif(
    BACKEND != "torch",
    reason="starts one process per backend itself: once per suite run is "
    "enough, in the PyTorch run",
)

SAVE = textwrap.dedent(
    """
    import sys
    import numpy as np, keras, keras_ema
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8),
        keras.layers.BatchNormalization(), keras.layers.Dense(1),
    ])
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.Adam(1e-2), trainable_weights_only=False,
        average_decay=0.9,
    )
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    model.fit(x, x.sum(1, keepdims=True), batch_size=16, epochs=2, verbose=0)
    model.save(sys.argv[1] + ".keras")
    np.savez(sys.argv[1] + ".npz",
             *[np.asarray(v) for v in model.variables],
             *[np.asarray(opt.average(v)) for v in model.variables])
    """
)

LOAD = textwrap.dedent(
    """
    import sys
    import numpy as np, keras, keras_ema
    model = keras.models.load_model(sys.argv[1] + ".keras")
    opt = model.optimizer
    opt.shadow_copy(model)  # attaches the BatchNorm averages
    saved = np.load(sys.argv[1] + ".npz")
    saved = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    n = len(model.variables)
    bits = lambda a: np.asarray(a).view(np.uint32)
    for v, w, a in zip(model.variables, saved[:n], saved[n:]):
        assert np.array_equal(bits(v), bits(w)), v.path
        assert np.array_equal(bits(opt.average(v)), bits(a)), v.path
    with opt.averaged_weights():
        for v, a in zip(model.variables, saved[n:]):
            assert np.array_equal(bits(v), bits(a)), v.path
    print("loaded", keras.backend.backend(), n, "variables and averages")
    """
)


def _run(backend, script, path):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.parametrize("source", BACKENDS)
def test_a_keras_file_from_one_backend_loads_on_the_others(source, tmp_path):
    path = tmp_path / f"from_{source}"
    _run(source, SAVE, path)
    saved = np.load(f"{path}.npz")
    # 8 variables (BatchNorm statistics too) and 8 averages.
    assert len(saved.files) == 16
    for target in BACKENDS:
        if target != source:
            out = _run(target, LOAD, path)
            assert f"loaded {target} 8 variables and averages" in out
