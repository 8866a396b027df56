"""Packed averages: the averages of many small weights in one flat variable.

With thousands of small weights a compiled step costs per op, not per byte:
on TensorFlow each graph op costs about as much as moving 10k floats, and
XLA on CPU runs one kernel per fusion. So on TensorFlow and JAX the averages
of small weights of one dtype are stored together, in one flat variable per
group (a "pack"), and moved by one update from the weights joined into one
flat tensor: a reshape per weight and a handful of ops per pack, instead of
four ops per weight. Large weights keep their own average: joining them
would copy more bytes than the ops it saves.

`optimizer.average(weight)` returns a `PackedAverage` for a packed weight: a
view of its slice that reads like a variable and assigns its slice. Files
hold one entry per average, packed or not, so a file saved on one backend
loads on another. Not packed: weights under a `keras.distribution` on JAX,
where each average is laid out like its weight; weights with a raw backup
(low-precision weights); torch, whose multi-tensor kernels already move many
averages per call (`_torch.py`).
"""

import keras
import numpy as np
from keras import ops

# Weights of at most this many elements are packed.
WEIGHT_LIMIT = 1 << 14
# Elements of one pack, at most: bounds the step's temporaries of a pack.
PACK_LIMIT = 1 << 22


class Pack:
    """The averages of `weights`, flattened and joined in `buffer`."""

    def __init__(self, weights):
        self.weights = list(weights)
        self.shapes = [tuple(w.shape) for w in self.weights]
        self.offsets = np.cumsum([0] + [_size(w) for w in weights]).tolist()
        self.buffer = None
        # The rounding errors of `buffer`'s moves, with `compensated`.
        self.compensation = None

    def join(self, weights):
        """The weights (variables or values), flattened and joined."""
        return ops.concatenate([ops.reshape(w, (-1,)) for w in weights], 0)

    def join_once(self, weights, joins):
        """`join`, computed once per step for the averages of every profile
        (`PostHocEMA`), which pack the same weights alike: `joins` (a
        `Joins`, or None) keeps the joins of the step."""
        if joins is None:
            return self.join(weights)
        return joins.get(self, weights)

    def split(self, flat):
        """A flat pack's value, as one tensor per weight, in its shape."""
        parts = ops.split(flat, self.offsets[1:-1])
        return [ops.reshape(p, s) for p, s in zip(parts, self.shapes)]

    def part(self, flat, i):
        """Weight `i`'s slice of a flat pack's value, in its shape."""
        start, stop = self.offsets[i], self.offsets[i + 1]
        return ops.reshape(flat[start:stop], self.shapes[i])


class PackedAverage:
    """The average of a packed weight: a view of its slice of the pack.

    Reads like a variable (`value`, `numpy()`, `np.asarray`, Keras ops);
    `assign` writes its slice of the pack.
    """

    def __init__(self, pack, index):
        self.pack = pack
        self.index = index
        weight = pack.weights[index]
        self.path = f"{getattr(weight, 'path', None) or weight.name}_average"
        self.shape = pack.shapes[index]

    @property
    def dtype(self):
        return self.pack.buffer.dtype

    @property
    def value(self):
        return self.pack.part(self.pack.buffer.value, self.index)

    def numpy(self):
        return ops.convert_to_numpy(self.value)

    def assign(self, value):
        value = ops.cast(ops.convert_to_tensor(value), self.dtype)
        if tuple(value.shape) != self.shape:
            raise ValueError(
                f"The average of {self.pack.weights[self.index].path} has "
                f"shape {self.shape}; it cannot be assigned a value of shape "
                f"{tuple(value.shape)}. Instead, assign a value of the "
                "weight's shape."
            )
        buffer = self.pack.buffer
        start = self.pack.offsets[self.index]
        buffer.assign(
            ops.slice_update(buffer.value, (start,), ops.reshape(value, (-1,)))
        )

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.numpy(), dtype=dtype)

    def __tf_tensor__(self, dtype=None, name=None):
        import tensorflow as tf

        return tf.convert_to_tensor(self.value, dtype=dtype, name=name)

    def __jax_array__(self):
        return self.value

    def __repr__(self):
        return (
            f"<PackedAverage path={self.path}, shape={self.shape}, "
            f"dtype={self.dtype}>"
        )



def holder(average):
    """The variable that holds `average`'s value: its pack's, or itself."""
    return average.pack.buffer if isinstance(average, PackedAverage) else average

def plan(weights, average_dtype):
    """Groups of at least two weights whose averages to pack together.

    `average_dtype(weight)` is the average's dtype; only weights whose
    average has their own dtype are packed.
    """
    groups = {}
    for weight in weights:
        dtype = keras.backend.standardize_dtype(weight.dtype)
        if (
            _size(weight) <= WEIGHT_LIMIT
            and average_dtype(weight) == dtype
            and getattr(weight, "_layout", None) is None
        ):
            groups.setdefault((dtype, _devices(weight)), []).append(weight)
    packs = []
    for group in groups.values():
        current, size = [], 0
        for weight in group:
            if current and size + _size(weight) > PACK_LIMIT:
                packs.append(current)
                current, size = [], 0
            current.append(weight)
            size += _size(weight)
        packs.append(current)
    return [p for p in packs if len(p) > 1]


def _size(weight):
    return int(np.prod(weight.shape, dtype="int64"))


def _devices(weight):
    """Where the weight lives (each replica's device under `tf.distribute`)."""
    value = weight.value if isinstance(weight, keras.Variable) else weight
    return tuple(str(c.device) for c in getattr(value, "values", (value,)))


def swap(pack, buffer, weights, is_lost):
    """Exchanges the weights with their averages in the pack, exactly."""
    flat = ops.convert_to_tensor(buffer)
    averages = pack.split(flat)
    # A weight whose buffer a failed JAX step consumed restarts from its
    # average, as an unpacked one does.
    raw = pack.join([
        a if is_lost(w) else w for w, a in zip(weights, averages)
    ])
    for weight, average in zip(weights, averages):
        weight.assign(average)
    buffer.assign(raw)


def assign(pack, buffer, weights, chosen):
    """Overwrites the weights with indices in `chosen` with their averages."""
    flat = ops.convert_to_tensor(buffer)
    for i in chosen:
        weights[i].assign(ops.copy(pack.part(flat, i)))


def assign_all(slots, values):
    """`slot.assign(value)` for each pair; one assignment per pack."""
    packs = {}
    for slot, value in zip(slots, values):
        if not isinstance(slot, PackedAverage):
            slot.assign(value)
            continue
        value = np.asarray(value)
        if value.shape != slot.shape:
            raise ValueError(
                f"Cannot load a value of shape {value.shape} into the average "
                f"of {slot.path}, of shape "
                f"{slot.shape}. Instead, load a file saved for the same model."
            )
        packs.setdefault(id(slot.pack), (slot.pack, {}))[1][slot.index] = value
    # Saved files hold every average of a pack (`_saved_variables`).
    for pack, parts in packs.values():
        dtype = keras.backend.standardize_dtype(pack.buffer.dtype)
        flat = [np.reshape(parts[i], -1) for i in range(len(pack.weights))]
        pack.buffer.assign(np.concatenate(flat).astype(dtype))


class Joins:
    """The packs' joined weights of one step, made once each.

    `graph_key()` (the road's) tells apart the graphs of a traced step: a
    join made in one `tf.cond` branch (`update_every`) cannot be used in
    another.
    """

    def __init__(self, graph_key):
        self.graph_key = graph_key
        self.made = {}

    def get(self, pack, weights):
        key = (self.graph_key(), *map(id, weights))
        if key not in self.made:
            self.made[key] = (weights, pack.join(weights))
        return self.made[key][1]
