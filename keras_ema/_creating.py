"""Creating the averages of `ExponentialMovingAverage`.

Which variables get an average (`should_average`), in which dtypes
(`slots`), packed or alone (`_packing.py`), and when they start: averages
start equal to their weights, and those of weights that have no value yet
(a model built by its first call inside a traced step) start once the
weights have one (`start_averages`).
"""

import keras
from keras import ops

from keras_ema import _averages
from keras_ema import _checks
from keras_ema import _decay_variables
from keras_ema import _model
from keras_ema import _packing
from keras_ema import _saving
from keras_ema import _tf


def build(optimizer, var_list, build_base):
    """`optimizer.build(var_list)`: its state, the inner optimizer's, the
    averages; `build_base` is Keras' `Optimizer.build` (index maps)."""
    # Built by a trainer (`fit`, loading a model): that is its model.
    model = _model.calling_model(skip=2)
    if model is not None and _model.owns(model, var_list):
        _model.register_with(optimizer, model)
    # Created eagerly, also when `fit` builds the optimizer while tracing
    # its step, so that values loaded before (a file read into an optimizer
    # not built yet) can be restored right away.
    with _tf.eager_scope():
        optimizer._step = optimizer.add_variable(
            shape=(), dtype="int", aggregation="only_first_replica",
            name="average_step",
        )
        optimizer._swapped = optimizer.add_variable(
            shape=(), dtype="int", aggregation="only_first_replica",
            name="averages_swapped_in",
        )
        optimizer.inner_optimizer.build(var_list)
    _decay_variables.create(optimizer)
    build_base(var_list)
    add_averages(
        optimizer, [v for v in var_list if should_average(optimizer, v)]
    )
    model = _model.get(optimizer._averaged)
    if model is not None:
        add_extra_averages(optimizer, model)
    start_averages(optimizer)


def add_averages(optimizer, weights):
    packed = {}
    if _packing.enabled():
        for group in _packing.plan(weights, lambda v: slot_dtypes(optimizer, v)[0]):
            pack = add_pack(optimizer, group)
            for i, weight in enumerate(group):
                packed[id(weight)] = _packing.PackedAverage(pack, i)
    for variable in weights:
        if id(variable) in packed:
            add_entry(optimizer, variable, [packed[id(variable)]])
        else:
            add_average(optimizer, variable)


def start_averages(optimizer):
    """Starts the averages of weights that had no value when they were
    created, once they have one.

    A model built by its first call, inside the `tf.function` that `fit`
    or a custom loop traces, has weights without a value in that first
    trace, where the averages must be created; TensorFlow initializes
    the weights, then traces the function again: the averages start
    then, from the weights' real values.
    """
    averaged = optimizer._averaged
    if not all(map(_tf.initialized, averaged.todo)):
        return
    if averaged.todo:
        todo = {id(v) for v in averaged.todo}
        averaged.todo = []
        entries = [e for e in averaged.entries if id(e[0]) in todo]
        with _tf.eager_scope():
            _averages.for_each(optimizer, entries, _averages.start)
    # Values that `load_weights` read into an unbuilt optimizer wait for
    # `build`: restoring them earlier would find no averages.
    if optimizer.built:
        _saving.restore_deferred(optimizer)


def add_extra_averages(optimizer, model):
    """The averages of the model's non-trainable variables, if asked."""
    if optimizer.trainable_weights_only:
        return
    new = [
        v for v in model.non_trainable_variables
        if should_average(optimizer, v) and optimizer.average(v) is None
    ]
    if new and optimizer._trained:
        raise ValueError(
            "`shadow_copy` cannot add averages after training started: "
            "the compiled train step would never update the averages of "
            f"{_averages.paths(new)}. Instead, call `shadow_copy(model)` right "
            "after `compile()`, before the first `fit`."
        )
    saved = _saving.take_pending(optimizer, new)
    for variable in new:
        add_average(optimizer, variable, saved, extra=True)


def should_average(optimizer, variable):
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return (
        dtype in _checks.FLOATS
        # Overwritten by their gradient (e.g. float8 scales): not weights.
        and not optimizer._overwrite_variable_with_gradient(variable)
        and not any(p.search(_averages.path(variable)) for p in optimizer.exclude)
    )


def slot_dtypes(optimizer, variable):
    """The dtypes of the average and, if needed, of the raw backup."""
    weight_dtype = keras.backend.standardize_dtype(variable.dtype)
    dtype = optimizer.average_dtype or (
        "float32" if weight_dtype in ("float16", "bfloat16")
        else weight_dtype
    )
    return [dtype] if dtype == weight_dtype else [dtype, weight_dtype]


def add_average(optimizer, variable, saved=None, extra=False):
    slots = []
    started = saved is not None or _tf.initialized(variable)
    if not started:
        optimizer._averaged.todo.append(variable)
    for dtype, suffix in zip(slot_dtypes(optimizer, variable), ("average", "raw")):
        value = variable if saved is None else next(saved)

        def initializer(shape, dtype, value=value):
            if not started:
                return ops.zeros(shape, dtype)
            # An explicit copy: on torch a same-dtype cast aliases storage.
            return ops.copy(ops.cast(_averages.value(value), dtype))

        # Created eagerly, also when `fit` builds the optimizer while tracing
        # its step: a variable created in the trace keeps its initial value
        # alive as a captured input of the step (a second copy of the
        # weights, for as long as the model lives), and cannot be lifted out
        # of an XLA-compiled step at all.
        with _tf.eager_scope(), _tf.colocate_with(optimizer, variable):
            slots.append(optimizer.add_variable(
                shape=variable.shape,
                initializer=initializer,
                dtype=dtype,
                name=f"{_averages.path(variable).replace('/', '_')}_{suffix}",
                layout=getattr(variable, "_layout", None),
            ))
    add_entry(optimizer, variable, slots)
    if extra:
        optimizer._averaged.extra.extend(slots)


def add_pack(optimizer, weights):
    """One flat variable for the averages of `weights` (`_packing.py`)."""
    pack = _packing.Pack(weights)
    unstarted = [w for w in weights if not _tf.initialized(w)]
    optimizer._averaged.todo.extend(unstarted)

    def initializer(shape, dtype):
        if unstarted:
            return ops.zeros(shape, dtype)
        return ops.cast(pack.join(weights), dtype)

    with _tf.eager_scope(), _tf.colocate_with(optimizer, weights[0]):
        pack.buffer = optimizer.add_variable(
            shape=(pack.offsets[-1],),
            initializer=initializer,
            dtype=weights[0].dtype,
            name=f"packed_averages_{len(optimizer._averaged.packs)}",
        )
    optimizer._averaged.packs.append(pack)
    return pack


def add_entry(optimizer, variable, slots):
    averaged = optimizer._averaged
    averaged.index[optimizer._var_key(variable)] = len(averaged.entries)
    averaged.entries.append((variable, slots[0], (slots + [None])[1]))

