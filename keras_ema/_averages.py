"""The per-variable work of `ExponentialMovingAverage`.

Each averaged model variable has an entry `(weight, average, backup)`. The
average is float32 for float16/bfloat16 weights; such entries also keep a
`backup` of the weight's dtype that holds the raw weight while the averages
are swapped in, so that a swap never rounds the average. The functions below
take one entry's variables (per device under `tf.distribute`) and are run
for all entries by `for_each`, which runs them once per pack for packed
averages (`_packing.py`).
"""

import functools

import keras
from keras import ops

from keras_ema import _decay_variables
from keras_ema import _packing


class Averaged:
    """Plain holder of the entries, not tracked by the optimizer.

    Keras optimizers track every list assigned to one of their attributes, so
    a list of model variables kept on the optimizer would turn the model's
    weights into optimizer variables.
    """

    def __init__(self):
        self.entries = []
        self.index = {}
        # Optimizer variables that `shadow_copy` adds after `build`: loading a
        # `.keras` file rebuilds the optimizer without them.
        self.extra = []
        # Their saved values, read before the model variables were known.
        self.pending = None
        # All saved values, read before the optimizer was built.
        self.deferred = None
        # On torch: the entries grouped for the multi-tensor kernels.
        self.torch_groups = None
        # The `_packing.Pack`s of the averages of small weights.
        self.packs = []
        # Weights whose averages wait for the weights to have a value
        # (`ExponentialMovingAverage._create_averages`).
        self.todo = []
        # A weak reference to the model (`_model.py`), once known.
        self.model = None
        # The inner optimizer's saved values, read before it was built.
        self.deferred_inner = None
        # Another model whose JAX `fit` called this optimizer (`_model.py`).
        self.foreign = None


def update_averages(optimizer, moved, entries=None):
    """Counts a (possibly skipped) real update and moves the averages."""
    step = ops.add(optimizer._step, ops.cast(moved, optimizer._step.dtype))
    optimizer._step.assign(step)
    if entries is None:
        entries = optimizer._averaged.entries
    move_averages(optimizer, entries, moved, step)


def move_averages(optimizer, entries, moved, step):
    """Moves the averages of `entries` for real-update count `step`."""
    since_start = ops.subtract(step, optimizer.start_step)
    n = ops.maximum(ops.subtract(since_start, 1), 0)
    complement = _decay_variables.complement_at(optimizer, n)
    averaging = ops.logical_and(moved, ops.greater(since_start, 0))
    if optimizer.update_every > 1:
        due = ops.equal(ops.mod(since_start, optimizer.update_every), 0)
        averaging = ops.logical_and(averaging, due)
    # Branch-free: a step that must not move uses factor 0, which leaves
    # the average bit-exact, with no conditional per variable. With
    # `update_every`, most steps have nothing to do: on TensorFlow they
    # skip the work under one conditional.
    factor = ops.multiply(ops.cast(averaging, "float32"), complement)
    fn, args, busy = move, (factor,), averaging
    if optimizer.start_step:
        copying = ops.logical_and(moved, ops.less_equal(since_start, 0))
        fn, args = move_or_copy, (factor, copying)
        busy = ops.logical_or(averaging, copying)
    when = busy if optimizer.update_every > 1 else None
    for_each(optimizer, entries, fn, *args, when=when)


def for_each(optimizer, entries, fn, *args, when=None):
    """Calls `fn(average, weight, backup, *args)` for each entry.

    On TensorFlow it runs once per device through the distribution strategy,
    as Keras' own optimizers update their slots, and, given a boolean `when`,
    under one conditional, so that a step with nothing to do costs nothing;
    on torch, which runs eagerly, it is read and the step skipped. On JAX
    `when` is ignored (XLA's conditional copies the buffers it passes
    through, which costs more than the update it skips): the caller's
    arguments must make `fn` a no-op where `when` is false.
    """
    packs = []
    if optimizer._averaged.packs:
        entries, packs = _split_packed(entries)
    backend = keras.backend.backend()
    if backend == "torch":
        from keras_ema import _torch

        if not _torch.due(when):
            return
        if fn is move:
            _torch.move_all(optimizer._averaged, entries, *args, move)
            return
    if backend != "tensorflow":
        for weight, average, backup in entries:
            fn(average, weight, backup, *args)
        for pack, chosen in packs:
            _run_packed(fn, pack, chosen, pack.buffer, pack.weights, *args)
        return
    import tensorflow as tf

    def update_all(distribution, *args):
        for weight, average, backup in entries:
            distribution.extended.update(
                value(average),
                fn,
                args=(value(weight), value(backup), *args),
                group=False,
            )
        for pack, chosen in packs:
            distribution.extended.update(
                pack.buffer.value,
                functools.partial(_run_packed, fn, pack, chosen),
                args=([value(w) for w in pack.weights], *args),
                group=False,
            )

    def update(distribution, *args):
        if when is None:
            update_all(distribution, *args)
            return
        # In cross-replica context, like LossScaleOptimizer's conditional;
        # every replica computed the same `when`.
        flag = distribution.experimental_local_results(when)[0]
        tf.cond(flag, lambda: update_all(distribution, *args), lambda: None)

    strategy = optimizer._distribution_strategy
    if tf.distribute.in_cross_replica_context():
        update(strategy, *args)
    else:
        tf.__internal__.distribute.interim.maybe_merge_call(
            update, strategy, *args
        )


def _split_packed(entries):
    """The unpacked entries, and `(pack, indices)` for the packed ones."""
    unpacked, packs = [], {}
    for entry in entries:
        average = entry[1]
        if isinstance(average, _packing.PackedAverage):
            pack = average.pack
            packs.setdefault(id(pack), (pack, []))[1].append(average.index)
        else:
            unpacked.append(entry)
    return unpacked, list(packs.values())


def _run_packed(fn, pack, chosen, buffer, weights, *args):
    """`fn` for the entries of `pack` with indices in `chosen`, at once."""
    if fn is assign:
        _packing.assign(pack, buffer, weights, chosen)
        return
    # Moves and swaps get every average of the pack.
    if fn is swap:
        _packing.swap(pack, buffer, weights, is_lost)
        return
    fn(buffer, pack.join_once(weights), None, *args)


def value(variable):
    """The backend variable of a `keras.Variable`; a `tf.Variable` itself."""
    if isinstance(variable, keras.Variable):
        return variable.value
    return variable


def path(variable):
    """A variable's `path`; a plain `tf.Variable` has its `name` only."""
    return getattr(variable, "path", None) or variable.name


def paths(variables):
    """The paths of `variables`, for error messages."""
    return ", ".join(path(v) for v in variables)


def move(average, weight, backup, factor):
    """`average -= factor * (average - weight)`, in the average's dtype."""
    delta = ops.subtract(average, ops.cast(weight, average.dtype))
    factor = ops.cast(factor, average.dtype)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # One in-place kernel instead of a multiply and an assignment: with
        # thousands of small variables the step costs per op, not per byte.
        tf.raw_ops.ResourceApplyGradientDescent(
            var=average.handle, alpha=factor, delta=delta
        )
        return
    average.assign_sub(ops.multiply(factor, delta))


def move_or_copy(average, weight, backup, factor, copying):
    """`move`, or a real copy of the weight where `copying` is true."""
    # `a - 1 * (a - w)` is not always `w`, so a copy is a real assignment.
    weight = ops.cast(weight, average.dtype)
    delta = ops.subtract(average, weight)
    moved = ops.subtract(
        average, ops.multiply(ops.cast(factor, average.dtype), delta)
    )
    average.assign(ops.where(copying, weight, moved))


def swap(average, weight, backup, swapped_in):
    """Exchanges weight and average exactly; `swapped_in` is the state before.

    Never `a += b; b = a - b; a -= b`: that arithmetic loses bits. An
    explicit copy, because on torch a same-dtype cast aliases storage.
    """
    raw = weight
    if is_lost(weight):
        # A compiled JAX step that failed consumed the buffer of the average
        # swapped into the model: that average is lost, and restarts from
        # the raw weight, which waits in the slot.
        raw = average if backup is None else backup
    raw = ops.copy(raw)
    if backup is None:
        weight.assign(average)
        average.assign(raw)
        return
    # Casting the float32 average into the weight would round it: the average
    # stays, and the raw weight waits in `backup` until the swap back.
    going_in = ops.equal(swapped_in, 0)
    held = ops.convert_to_tensor(backup)
    weight.assign(ops.where(going_in, ops.cast(average, weight.dtype), held))
    backup.assign(ops.where(going_in, raw, held))


def start(average, weight, backup):
    """Sets the average to the weight: where every average starts."""
    average.assign(ops.copy(ops.cast(weight, average.dtype)))


def assign(average, weight, backup):
    """Overwrites the weight with its average."""
    # A copy: on JAX a same-dtype cast is the same array, and two variables
    # sharing a buffer break the trainer's buffer donation.
    weight.assign(ops.copy(ops.cast(average, weight.dtype)))


def is_lost(variable):
    """Whether a JAX model variable lost its value: cleared by a trainer
    that raised, or its buffer consumed by a compiled step that failed."""
    if keras.backend.backend() != "jax" or not isinstance(variable, keras.Variable):
        return False
    array = variable._value
    return array is None or array.is_deleted()
