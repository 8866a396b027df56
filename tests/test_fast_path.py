"""The fast update path gives the averages of the plain rule, bit for bit.

Each backend moves the averages its own fast way: TensorFlow with one
in-place kernel per average (`ResourceApplyGradientDescent`) or per pack of
small averages, torch with multi-tensor kernels over groups of averages, JAX
from the new weights as materialized in memory, packed too. Here a model with many variables of several sizes and
dtypes trains through `fit`, and its averages are checked against the rule
written out in numpy float32 from the recorded weights: after every batch,
through a swap round trip and across a `.keras` save and load. Bit for bit
on TensorFlow and torch; on JAX, where XLA fuses the multiply and the
subtraction, and on torch where it moves with `lerp` (a factor below one
half, on CPU), within 1 ulp of the rule without the product's rounding.
"""

import keras
import numpy as np
import pytest

import keras_ema
from conftest import BACKEND, bits, sync

DECAY = 0.9


def many_variables_model():
    """26 variables: small Dense layers, a wider one, and bfloat16 ones."""
    inputs = keras.Input((6,))
    x = inputs
    for _ in range(10):
        x = keras.layers.Dense(6, activation="tanh")(x)
    x = keras.layers.Dense(300, activation="tanh")(x)
    # bfloat16 weights: float32 averages, the path with a raw backup.
    x = keras.layers.Dense(5, dtype="bfloat16")(x)
    outputs = keras.layers.Dense(1, dtype="bfloat16")(x)
    return keras.Model(inputs, outputs)


def data(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(48, 6)).astype("float32")
    return x, np.sin(x.sum(axis=1, keepdims=True)).astype("float32")


def fit_recording(model, seed):
    """Fits 6 batches; returns the weights and the averages after each."""
    weights, averages = [], []
    opt = model.optimizer

    def record(batch, logs):
        sync(model)
        variables = model.trainable_variables
        weights.append([v.numpy().copy() for v in variables])
        averages.append([np.asarray(opt.average(v)).copy() for v in variables])

    model.fit(*data(seed), batch_size=8, epochs=1, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=record)])
    return weights, averages


def assert_rule(start, weights, averages, first_update):
    """Each update is `average -= (1 - decay) * (average - weight)` of the
    previous average, in numpy float32, with the dynamic decay
    `min(0.9, (1 + n) / (10 + n))` of the n-th update, whose `1 - decay`
    is computed without cancellation, `max(1 - 0.9, 9 / (10 + n))`, then
    rounded to float32 (JAX without x64 holds 0.9 in float32)."""
    held = float(np.float32(DECAY)) if BACKEND == "jax" else DECAY
    before = start
    for n, (step_weights, after) in enumerate(
        zip(weights, averages), start=first_update
    ):
        factor = np.float32(max(1.0 - held, 9.0 / (10.0 + n)))
        for a, w, actual in zip(before, step_weights, after):
            delta = a - w.astype("float32")
            # torch on CPU moves a float32 weight's average with one `lerp`
            # for factors below one half: a fused multiply-add too.
            lerp = BACKEND == "torch" and factor < 0.5 and w.dtype == a.dtype
            if BACKEND == "jax" or lerp:
                # XLA contracts the multiply and the subtraction into one
                # fused multiply-add: the product is not rounded. In float64
                # it is exact; the float32 result then within 1 ulp.
                expected = a.astype("float64") - np.float64(factor) * delta
                assert ulps(actual, expected).max() <= 1, (n, actual, expected)
            else:
                expected = a - factor * delta
                np.testing.assert_array_equal(bits(actual), bits(expected))
        before = after


def ulps(a, b):
    a = np.asarray(a, "float32").view("int32").astype("int64")
    return np.abs(a - np.asarray(b, "float32").view("int32").astype("int64"))


def numpy_averages(opt, model):
    return [np.asarray(opt.average(v)) for v in model.trainable_variables]


@pytest.fixture(params=["default", "tiny-groups", "unpacked"])
def layout(request, monkeypatch):
    """How the averages are laid out: by default, on TensorFlow and JAX the
    small ones are packed (`_packing.py`) and on torch grouped for the
    multi-tensor kernels; "tiny-groups" makes packs or groups of at most 64
    elements, so there are many; "unpacked" (TensorFlow and JAX) gives every
    average its own variable."""
    from keras_ema import _packing

    if request.param == "tiny-groups":
        if BACKEND == "torch":
            from keras_ema import _torch

            monkeypatch.setattr(_torch, "_GROUP_SIZE", 64)
        else:
            monkeypatch.setattr(_packing, "PACK_LIMIT", 64)
    if request.param == "unpacked":
        if BACKEND == "torch":
            pytest.skip("averages are never packed on torch")
        monkeypatch.setattr(_packing, "WEIGHT_LIMIT", 0)
    return request.param


def packed_count(opt, model):
    from keras_ema import _packing

    return sum(
        isinstance(opt.average(v), _packing.PackedAverage)
        for v in model.trainable_variables
    )


def test_fast_path_equals_plain_rule_through_fit_swap_and_save(
    tmp_path, layout
):
    model = many_variables_model()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05, momentum=0.5), average_decay=DECAY
    )
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)
    start = [v.numpy().astype("float32") for v in model.trainable_variables]
    assert len(start) == 26
    # The 22 float32 weights are packed; the bfloat16 ones have a backup.
    packs = {"default": 22, "tiny-groups": 20, "unpacked": 0}[layout]
    assert packed_count(opt, model) == (0 if BACKEND == "torch" else packs)

    weights, averages = fit_recording(model, seed=0)
    assert_rule(start, weights, averages, first_update=0)
    averages = averages[-1]

    # The averages swap in exactly, and the raw weights come back exactly.
    with opt.averaged_weights():
        for variable, average in zip(model.trainable_variables, averages):
            np.testing.assert_array_equal(
                bits(variable), bits(average.astype(variable.dtype))
            )
    for variable, raw in zip(model.trainable_variables, weights[-1]):
        np.testing.assert_array_equal(bits(variable), bits(raw))

    # Saved and loaded bit for bit, training goes on with the same rule.
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    loaded.optimizer.build(loaded.trainable_variables)
    assert packed_count(loaded.optimizer, loaded) == packed_count(opt, model)
    for saved, average in zip(averages, numpy_averages(loaded.optimizer, loaded)):
        np.testing.assert_array_equal(bits(average), bits(saved))
    more_weights, more_averages = fit_recording(loaded, seed=1)
    assert_rule(averages, more_weights, more_averages, first_update=len(weights))
