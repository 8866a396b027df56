import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow 2.21's CPU allocator keeps byte counts (`get_memory_info`, read
# by test_memory.py) only as a BFC allocator.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

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


BACKEND = keras.backend.backend()

# What TensorFlow prints at start-up on a CPU machine (keras_ema/_startup.py
# hides it in the programs and notebooks).
START_UP_NOTICE = (
    r"cuInit|oneDNN custom operations|absl::InitializeLog|cuda drivers"
    r"|cpu_feature_guard|E0000|I0000"
)

tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="TensorFlow API (tf.function, tf.train.Checkpoint, tf.errors); "
    "the compiled steps of JAX and torch are covered through model.fit",
)


def tensor(value, dtype="float32"):
    """A backend tensor: Keras' torch optimizers do not take numpy arrays."""
    return keras.ops.convert_to_tensor(np.asarray(value, dtype), dtype)


def numpy(value):
    return np.asarray(keras.ops.convert_to_numpy(value))


def sync(model):
    """Gives the model's variables their values inside a JAX `fit`.

    JAX's trainer keeps the state outside the variables between batches and
    attaches it at epoch ends, or when a callback asks, as this does.
    """
    if BACKEND == "jax":
        model.jax_state_sync()


def compiled_step(opt, grads, variables):
    """One optimizer step the way each backend's `fit` runs it.

    On JAX the trainer calls `stateless_apply` inside a compiled function;
    elsewhere it calls `apply` (inside `tf.function` on TensorFlow).
    """
    if BACKEND != "jax":
        opt.apply(grads, variables)
        return
    import jax

    @jax.jit
    def step(optimizer_values, grads, values):
        return opt.stateless_apply(optimizer_values, grads, values)

    values, optimizer_values = step(
        [v.value for v in opt.variables], grads, [v.value for v in variables]
    )
    for variable, value in zip(variables, values):
        variable.assign(value)
    for variable, value in zip(opt.variables, optimizer_values):
        variable.assign(value)


def fit_recording_kernel(update_every=1):
    """Fits a small model with the wrapper (SGD, decay 0.9), recording the
    first kernel before training and after every batch.

    Returns the optimizer, the kernel and the list of recorded values.
    """
    import keras_ema

    model = small_model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=0.9, update_every=update_every
    )
    model.compile(optimizer=opt, loss="mse")
    model.build((None, 4))
    kernel = model.trainable_variables[0]
    history = [kernel.numpy().copy()]

    def record(batch, logs):
        sync(model)
        history.append(kernel.numpy().copy())

    callback = keras.callbacks.LambdaCallback(on_train_batch_end=record)
    model.fit(*regression_data(), batch_size=8, epochs=2, callbacks=[callback],
              verbose=0)
    return opt, kernel, history


# A fresh process that cannot import keras_ema, as where it is not installed,
# loads a file and saves its predictions.
_PREDICT_WITHOUT_KERAS_EMA = """
import sys

class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "keras_ema":
            raise ImportError("keras_ema is not installed here")

sys.meta_path.insert(0, NotInstalled())

import keras
import numpy as np

model = keras.models.load_model(sys.argv[1])
assert "keras_ema" not in sys.modules and not model.compiled
np.save(sys.argv[3], model.predict(np.load(sys.argv[2]), verbose=0))
"""


def predict_without_keras_ema(path, x, folder):
    """The predictions on `x` of the model file `path`, loaded by a process
    in which keras_ema cannot be imported; `folder` holds the arrays."""
    import os
    import subprocess
    import sys

    inputs, outputs = os.path.join(folder, "x.npy"), os.path.join(folder, "out.npy")
    np.save(inputs, x)
    result = subprocess.run(
        [sys.executable, "-c", _PREDICT_WITHOUT_KERAS_EMA, str(path), inputs,
         outputs],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    predictions = np.load(outputs)
    os.remove(inputs)
    os.remove(outputs)
    return predictions
