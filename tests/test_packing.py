"""Packed averages: the averages of small weights in one flat variable.

On TensorFlow and JAX the averages of small weights of one dtype share one
flat variable (`keras_ema/_packing.py`); `average(weight)` is a view of the
weight's slice. These tests pin what a user sees of that: the view reads and
writes exactly its slice, swaps and partial assignments are exact, files hold
one entry per average (so packed and unpacked optimizers load each other's
files), and only small weights are packed. `test_fast_path.py` checks the
packed update against the rule.
"""

import keras
import numpy as np
import pytest

import keras_ema
from conftest import BACKEND, bits, tensorflow_only
from keras_ema import _packing

pytestmark = pytest.mark.skipif(
    BACKEND == "torch", reason="averages are never packed on torch"
)

# Values a lossy swap would change: extremes, a subnormal, -0.0.
SPAN = np.array([1e-38, 3.4e38, -3.3e-20, 5e20, 1e-45, -0.0], "float32")


def small_model():
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(2),  # kernel of 6 values, bias of 2
        keras.layers.Dense(6),  # kernel of 12, bias of 6
    ])


def built(model, **kwargs):
    opt = keras_ema.ExponentialMovingAverage(keras.optimizers.SGD(0.1), **kwargs)
    model.compile(optimizer=opt, loss="mse")
    opt.build(model.trainable_variables)
    return opt


def test_view_reads_and_assigns_its_slice_only():
    model = small_model()
    opt = built(model)
    kernel = model.layers[0].kernel
    average = opt.average(kernel)
    assert isinstance(average, _packing.PackedAverage)
    assert average.shape == (3, 2)
    assert keras.backend.standardize_dtype(average.dtype) == "float32"
    for read in (np.asarray, keras.ops.convert_to_numpy, lambda a: a.numpy()):
        np.testing.assert_array_equal(bits(read(average)), bits(kernel))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(keras.ops.add(average, 1.0)),
        kernel.numpy() + 1.0,
    )

    others = [v for v in model.trainable_variables if v is not kernel]
    before = [bits(opt.average(v)).copy() for v in others]
    average.assign(SPAN.reshape(3, 2))
    np.testing.assert_array_equal(bits(average), bits(SPAN.reshape(3, 2)))
    for v, b in zip(others, before):
        np.testing.assert_array_equal(bits(opt.average(v)), b)
    # A refused assignment changes nothing.
    with pytest.raises(ValueError, match="cannot be assigned a value of shape"):
        average.assign(np.zeros((2, 3), "float32"))
    np.testing.assert_array_equal(bits(average), bits(SPAN.reshape(3, 2)))
    for v, b in zip(others, before):
        np.testing.assert_array_equal(bits(opt.average(v)), b)


def _set_apart(model, opt):
    """Weights and averages set to distinct values a lossy swap would
    change; returns both as bits."""
    raw, averages = [], []
    for i, v in enumerate(model.trainable_variables):
        values = np.resize(np.roll(SPAN, i), v.shape).astype("float32")
        v.assign(values)
        opt.average(v).assign(values[::-1] * np.float32(0.37))
        raw.append(bits(v).copy())
        averages.append(bits(opt.average(v)).copy())
    return raw, averages


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=tensorflow_only)]
)
def test_packed_swaps_are_exact(compiled):
    model = small_model()
    opt = built(model)
    raw, averages = _set_apart(model, opt)
    swap = opt.swap_weights
    if compiled:
        import tensorflow as tf

        swap = tf.function(opt.swap_weights)
    swap()
    for v, r, a in zip(model.trainable_variables, raw, averages):
        np.testing.assert_array_equal(bits(v), a)
        np.testing.assert_array_equal(bits(opt.average(v)), r)
    swap()
    for v, r, a in zip(model.trainable_variables, raw, averages):
        np.testing.assert_array_equal(bits(v), r)
        np.testing.assert_array_equal(bits(opt.average(v)), a)


def test_assigning_some_packed_averages_leaves_the_others():
    model = small_model()
    opt = built(model)
    raw, averages = _set_apart(model, opt)
    kernel = model.layers[1].kernel
    opt.assign_average_vars([kernel])
    for i, v in enumerate(model.trainable_variables):
        expected = averages[i] if v is kernel else raw[i]
        np.testing.assert_array_equal(bits(v), expected)
        np.testing.assert_array_equal(bits(opt.average(v)), averages[i])


@pytest.mark.parametrize("saved_packed", [True, False])
def test_packed_and_unpacked_optimizers_load_each_others_files(
    tmp_path, monkeypatch, saved_packed
):
    """A file holds one entry per average either way."""
    if not saved_packed:
        monkeypatch.setattr(_packing, "WEIGHT_LIMIT", 0)
    model = small_model()
    opt = built(model)
    _, averages = _set_apart(model, opt)
    assert isinstance(
        opt.average(model.layers[0].kernel), _packing.PackedAverage
    ) == saved_packed
    model.save_weights(tmp_path / "model.weights.h5")

    monkeypatch.setattr(
        _packing, "WEIGHT_LIMIT", 0 if saved_packed else 1 << 14
    )
    fresh = small_model()
    fresh_opt = built(fresh)
    assert isinstance(
        fresh_opt.average(fresh.layers[0].kernel), _packing.PackedAverage
    ) != saved_packed
    fresh.load_weights(tmp_path / "model.weights.h5")
    for v, a in zip(fresh.trainable_variables, averages):
        np.testing.assert_array_equal(bits(fresh_opt.average(v)), a)


def test_only_small_weights_of_one_dtype_are_packed():
    model = keras.Sequential([
        keras.Input((200,)),
        keras.layers.Dense(100),  # kernel of 20,000 values: its own average
        keras.layers.Dense(3),
        keras.layers.Dense(3, dtype="bfloat16"),  # float32 average + backup
    ])
    opt = built(model)
    kinds = [
        type(opt.average(v)).__name__ for v in model.trainable_variables
    ]
    assert kinds == [
        "Variable", "PackedAverage", "PackedAverage", "PackedAverage",
        "Variable", "Variable",
    ]
    # A single small weight is not packed either.
    lone = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, use_bias=False)])
    assert type(built(lone).average(lone.layers[0].kernel)).__name__ == "Variable"


@tensorflow_only
def test_sparse_gradients_pass_the_swap_check():
    """An Embedding's gradient is an `IndexedSlices` on TensorFlow; the
    compiled step's swap check passes it on whole."""
    model = keras.Sequential([
        keras.Input((2,), dtype="int32"),
        keras.layers.Embedding(20, 3),
        keras.layers.Flatten(),
        keras.layers.Dense(1),
    ])
    opt = built(model)
    start = [v.numpy().copy() for v in model.trainable_variables]
    x = np.array([[1, 5], [7, 1]], "int32")
    model.fit(x, np.ones((2, 1), "float32"), batch_size=2, verbose=0)
    # The first update's decay is 0.1: average = start - 0.9 (start - w).
    for v, s in zip(model.trainable_variables, start):
        expected = s - np.float32(0.9) * (s - v.numpy())
        np.testing.assert_array_equal(bits(opt.average(v)), bits(expected))
    embedding = model.trainable_variables[0].numpy()
    assert not np.array_equal(embedding[1], start[0][1])
    np.testing.assert_array_equal(embedding[2], start[0][2])
