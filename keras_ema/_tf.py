"""The TensorFlow seams of `ExponentialMovingAverage`.

Under `tf.distribute` the averages must be created in the strategy's scope and
colocated with their weights, and a compiled `tf.function` step runs long
after it was traced. Each function here is a no-op on the other backends.
"""

import contextlib

import keras


def _tensorflow():
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf


UNINITIALIZED = (
    "ExponentialMovingAverage could not create the averages of weights that "
    "are created inside this `tf.function`: TensorFlow ran the function "
    "before it initialized them. Instead, build the model before its first "
    "step (`model.build(input_shape)`, or start it with `keras.Input`)."
)


def colocate_with(optimizer, variable):
    """Creates the variables of the block on `variable`'s devices."""
    if _tensorflow() is None:
        return contextlib.nullcontext()
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return optimizer._distribution_strategy.extended.colocate_vars_with(
        variable
    )


def initialized(variable):
    """Whether `variable` has a value outside the function being traced.

    A weight created by a model's first call inside a `tf.function` has none
    in the function's first trace: TensorFlow initializes it afterwards and
    traces the function again.
    """
    tf = _tensorflow()
    if tf is None:
        return True
    if isinstance(variable, keras.Variable):
        variable = variable.value
    with tf.init_scope():
        return bool(variable.is_initialized())


def strategy_scope(optimizer):
    """The optimizer's distribution strategy scope, unless already in one.

    `shadow_copy` runs where the user calls it (after `compile()`), or in
    `SwapAverageWeights.on_train_begin`: outside the scope, where TF would
    create plain, unmirrored variables or refuse to colocate.
    """
    tf = _tensorflow()
    if tf is None or tf.distribute.has_strategy():
        return contextlib.nullcontext()
    return optimizer._distribution_strategy.scope()


def eager_scope():
    """Runs its block eagerly, also while a `tf.function` is being traced."""
    tf = _tensorflow()
    return contextlib.nullcontext() if tf is None else tf.init_scope()


def executing_eagerly():
    tf = _tensorflow()
    return True if tf is None else tf.executing_eagerly()


def gate(flag, message, values, small, bunch, never=None):
    """In a traced step: `values`, released only once `flag` is checked 0.

    A compiled step is traced once but may run after any later swap. Gating
    what the optimizer consumes, rather than making every op of its update
    wait on the check, keeps the step's order: each weight still updates as
    soon as its gradient is ready, instead of every gradient of the step
    being held in memory until the check has run. Tensors of at most `small`
    elements pass in bunches of at most `bunch` elements, one `IdentityN`
    per bunch (one graph op each costs as much as moving 10k floats); the
    others one by one. Given a message `never`, the traced step fails with it
    if it ever runs (a first trace, which TensorFlow discards once it has
    initialized the variables created in it). Eagerly, `values`.

    In a replica context, a value that every replica passes as the same
    object (a gradient captured from outside `strategy.run`) is gated once,
    across replicas, and stays one object: the inner optimizer's all-reduce
    takes such a value once, as it takes it ungated. Gated by each replica,
    it would be one value per replica, and summed.
    """
    if executing_eagerly():
        return values
    tf = _tensorflow()
    values = list(values)
    if not tf.distribute.has_strategy() or (
        tf.distribute.in_cross_replica_context()
    ):
        return _gate(flag, message, values, small, bunch, never)

    def gate_shared(strategy, values):
        # Here a value that differs across replicas is a `PerReplica`. The
        # all-reduce sends a shared one from its device: it keeps it.
        shared = [None] * len(values)
        devices = {}
        for i, value in enumerate(values):
            if isinstance(value, (tf.Tensor, tf.IndexedSlices)):
                devices.setdefault(value.device, []).append(i)
        for device, indices in devices.items():
            with tf.device(device):
                gated = _gate(
                    flag, message, [values[i] for i in indices], small, bunch,
                    never,
                )
            for i, value in zip(indices, gated):
                shared[i] = value
        return shared

    shared = tf.__internal__.distribute.interim.maybe_merge_call(
        gate_shared, tf.distribute.get_strategy(), values
    )
    local = [v if s is None else None for v, s in zip(values, shared)]
    local = _gate(flag, message, local, small, bunch, never)
    return [v if s is None else s for v, s in zip(local, shared)]


def _gate(flag, message, values, small, bunch, never):
    tf = _tensorflow()
    # `IndexedSlices` gradients pass as their component tensors.
    flat = list(tf.nest.flatten(values, expand_composites=True))
    if all(tensor is None for tensor in flat):
        return values
    check = _assert_zero(flag, message)
    if never is not None:
        with tf.control_dependencies([check]):
            check = tf.debugging.Assert(False, [never])
    bunches, size = [[]], 0
    for i, tensor in enumerate(flat):
        if tensor is None:
            continue
        count = tensor.shape.num_elements()
        if count is None or count > small:
            bunches.append([i])
            continue
        if size + count > bunch:
            bunches.append([])
            size = 0
        bunches[-1].append(i)
        size += count
    for indices in bunches:
        if not indices:
            continue
        with tf.control_dependencies([check]):
            gated = tf.identity_n([flat[i] for i in indices])
        for i, tensor in zip(indices, gated):
            flat[i] = tensor
    return tf.nest.pack_sequence_as(values, flat, expand_composites=True)


def check_zero(flag, message):
    """In a traced step: the block's ops run only once `flag` is checked 0.

    A compiled step is traced once but may run after any later swap, so the
    variable itself is checked (one scalar op per step), and every update of
    the step waits for that check. Eagerly, nothing to do here.
    """
    if executing_eagerly():
        return contextlib.nullcontext()
    return _tensorflow().control_dependencies([_assert_zero(flag, message)])


def _assert_zero(flag, message):
    tf = _tensorflow()
    # One flag, or several (the swap flags of a `PostHocEMA`'s profiles).
    flags = flag if isinstance(flag, (list, tuple)) else [flag]
    value = tf.add_n([f.value for f in flags])
    return tf.debugging.assert_equal(value, tf.zeros_like(value), message=message)
