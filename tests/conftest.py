import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.utils.set_random_seed(0)
    yield
    keras.mixed_precision.set_dtype_policy("float32")
    keras.backend.clear_session()


def small_model(batchnorm=False):
    """A real Keras model: Dense, optional BatchNorm, Dense."""
    layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    layers.append(keras.layers.Dense(1))
    return keras.Sequential(layers)


def regression_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype(
        "float32"
    )
    return x, y


def bits(value):
    """The raw bits of a float array, so that -0.0 != 0.0 and NaNs compare."""
    value = np.asarray(keras.ops.convert_to_numpy(value))
    return value.view(f"uint{value.dtype.itemsize * 8}")
