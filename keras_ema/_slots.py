"""Which variables get an average, in which dtypes, and creating them.

Which variables (`should_average`), in which dtypes (`slot_dtypes`), packed
or alone (`_packing.py`), and when they start: averages start equal to
their weights, and those of weights that have no value yet (a model built by
its first call inside a traced step) start once the weights have one
(`start_waiting`). `add_variable` is the optimizer's `add_variable`, which
creates and tracks an optimizer variable.
"""

import keras
from keras import ops

from keras_ema import _checks
from keras_ema import _packing
from keras_ema import _update


def should_average(state, variable):
    dtype = keras.backend.standardize_dtype(variable.dtype)
    return (
        dtype in _checks.FLOATS
        # Overwritten by their gradient (e.g. float8 scales): not weights.
        and not getattr(variable, "overwrite_with_gradient", False)
        and not any(p.search(_update.path(variable)) for p in state.exclude)
    )


def slot_dtypes(state, variable):
    """The dtypes of the average and, if needed, of the raw backup."""
    weight_dtype = keras.backend.standardize_dtype(variable.dtype)
    dtype = state.average_dtype or (
        "float32" if weight_dtype in ("float16", "bfloat16")
        else weight_dtype
    )
    return [dtype] if dtype == weight_dtype else [dtype, weight_dtype]


def add_averages(state, weights, add_variable):
    """The averages of `weights`, packed where the road packs them."""
    packed = {}
    # A BEMA average moves with its companion (`bema.move`), one by one.
    if state.road.packs_averages and not state.bias_corrected:
        for group in _packing.plan(
            weights, lambda v: slot_dtypes(state, v)[0]
        ):
            pack = _add_pack(state, group, add_variable)
            for i, weight in enumerate(group):
                packed[id(weight)] = _packing.PackedAverage(pack, i)
    for variable in weights:
        if id(variable) in packed:
            _add_entry(state, variable, [packed[id(variable)]])
        else:
            add_average(state, variable, add_variable)


def start_waiting(state):
    """Starts the averages of weights that had no value when they were
    created, once they have one.

    A model built by its first call, inside the `tf.function` that `fit`
    or a custom loop traces, has weights without a value in that first
    trace, where the averages must be created; TensorFlow initializes
    the weights, then traces the function again: the averages start
    then, from the weights' real values.
    """
    road = state.road
    if not state.todo or not all(map(road.initialized, state.todo)):
        return
    todo = {id(v) for v in state.todo}
    state.todo = []
    entries = [e for e in state.entries if id(e[0]) in todo]
    with road.eager_scope():
        _update.start_averages(state, entries)


def restart_untrained(state):
    """Sets the averages to the weights again while no real update has
    moved them: they start from what training starts with, also when the
    weights changed after the averages were created (a `Normalization`
    adapted, weights loaded after `shadow_copy`). Eager, at `fit`'s start.
    """
    if not state.built or state.swapped_in or not state.entries:
        return
    if int(ops.convert_to_numpy(state.step)) != 0:
        return
    with state.road.eager_scope():
        _update.start_averages(state, state.entries)


def add_extra_averages(state, model, add_variable, take_pending):
    """The averages of the model's non-trainable variables, if asked;
    `take_pending(state, variables, model)` gives values a file left for
    them (`_layout.take_pending`)."""
    if state.trainable_weights_only:
        return
    new = [
        v for v in model.non_trainable_variables
        if should_average(state, v) and state.var_key(v) not in state.index
    ]
    if new and state.trained:
        raise ValueError(
            "`shadow_copy` cannot add averages after training started: the "
            "compiled train step would never update the averages of "
            f"{_update.describe(new)}. Instead, call `shadow_copy(model)` right "
            "after `compile()`, before the first `fit`."
        )
    saved = take_pending(state, new, model)
    for variable in new:
        add_average(state, variable, add_variable, saved, extra=True)


def add_average(state, variable, add_variable, saved=None, extra=False):
    """An average of its own for `variable` (and a raw backup if its dtype
    is narrower); `saved` iterates over loaded values to start from."""
    road = state.road
    slots = []
    started = saved is not None or road.initialized(variable)
    if not started:
        state.todo.append(variable)
    for dtype, suffix in zip(slot_dtypes(state, variable), ("average", "raw")):
        value = variable if saved is None else next(saved)

        def initializer(shape, dtype, value=value):
            if not started:
                return ops.zeros(shape, dtype)
            # An explicit copy: on torch a same-dtype cast aliases storage.
            return ops.copy(ops.cast(_value(value), dtype))

        # Created eagerly, also when `fit` builds the optimizer while tracing
        # its step: a variable created in the trace keeps its initial value
        # alive as a captured input of the step (a second copy of the
        # weights, for as long as the model lives), and cannot be lifted out
        # of an XLA-compiled step at all.
        with road.eager_scope(), road.colocate_with(state, variable):
            slots.append(add_variable(
                shape=variable.shape,
                initializer=initializer,
                dtype=dtype,
                name=f"{_update.path(variable).replace('/', '_')}_{suffix}",
                layout=getattr(variable, "_layout", None),
            ))
    _add_entry(state, variable, slots)
    companion = add_companion(state, slots[0], variable, add_variable, saved)
    if extra:
        state.extra.extend(slots + [companion] * (companion is not None))
    add_compensation(state, slots[0], variable, add_variable,
                     f"average_{len(state.entries) - 1}")


def add_companion(state, average, variable, add_variable, saved=None):
    """With a BEMA decay, the companion of `average`: `[ema, theta_0]`
    (`bema.py`), both starting as the weight (or the next of `saved`);
    else None. Saved beside the averages (`_layout.py`, role "bema")."""
    if not state.bias_corrected:
        return None
    road = state.road
    value = None if saved is None else next(saved)

    def initializer(shape, dtype):
        if value is not None:
            return ops.cast(value, dtype)
        if not road.initialized(variable):
            return ops.zeros(shape, dtype)  # started by `start_waiting`
        weight = ops.cast(_value(variable), dtype)
        return ops.stack([weight, weight])

    with road.eager_scope(), road.colocate_with(state, variable):
        companion = add_variable(
            shape=(2, *variable.shape),
            initializer=initializer,
            dtype=average.dtype,
            name=f"{_update.path(variable).replace('/', '_')}_bema",
        )
    state.companions[id(average)] = companion
    return companion


def slot_roles(state, variable):
    """`(dtype, role)` of each slot a file holds for `variable`'s average,
    in order: the average, the raw backup if any, the BEMA companion."""
    dtypes = slot_dtypes(state, variable)
    roles = list(zip(dtypes, ("average", "raw")))
    if state.bias_corrected:
        roles.append((dtypes[0], "bema"))
    return roles


def _add_pack(state, weights, add_variable):
    """One flat variable for the averages of `weights` (`_packing.py`)."""
    road = state.road
    pack = _packing.Pack(weights)
    unstarted = [w for w in weights if not road.initialized(w)]
    state.todo.extend(unstarted)

    def initializer(shape, dtype):
        if unstarted:
            return ops.zeros(shape, dtype)
        return ops.cast(pack.join(weights), dtype)

    with road.eager_scope(), road.colocate_with(state, weights[0]):
        pack.buffer = add_variable(
            shape=(pack.offsets[-1],),
            initializer=initializer,
            dtype=weights[0].dtype,
            name=f"packed_averages_{len(state.packs)}",
        )
    state.packs.append(pack)
    pack.compensation = add_compensation(
        state, pack.buffer, weights[0], add_variable, pack.buffer.name
    )
    return pack


def add_compensation(state, average, weight, add_variable, name):
    """With `compensated`, the buffer that keeps the rounding error of the
    moves of `average` (`_update.move_compensated`), zeros; else None.

    Saved with the optimizer's own variables (`_layout.py`), by a name that
    says which average it belongs to by position, as a model's weights get
    other names in another model of the same architecture. A file without
    it (saved without `compensated`, or on a backend that packs otherwise)
    leaves it as it is, which costs the averages at most one float32
    rounding.
    """
    if not state.compensated:
        return None
    road = state.road
    with road.eager_scope(), road.colocate_with(state, weight):
        variable = add_variable(
            shape=average.shape, initializer="zeros", dtype=average.dtype,
            name=f"{name}_compensation",
            layout=getattr(weight, "_layout", None),
        )
    state.compensation[id(average)] = variable
    state.own_variables.append(variable)
    return variable


def _add_entry(state, variable, slots):
    state.index[state.var_key(variable)] = len(state.entries)
    state.entries.append((variable, slots[0], (slots + [None])[1]))


def _value(variable):
    """The value of a `keras.Variable`, or what is given."""
    return variable.value if isinstance(variable, keras.Variable) else variable
