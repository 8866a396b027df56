"""Calling a model with its averages in place of its weights: a teacher.

Mean teacher, BYOL, DINO and data2vec call the average of the student's
weights inside the student's own train step. `call_with_averages` runs the
model's forward pass in a `keras.StatelessScope` that maps each averaged
variable to its average (gradients stopped) and every other variable to its
current value: no variable is written, nothing is swapped or copied, and the
same code runs eagerly and in compiled steps on every backend.

On JAX the trainer keeps the optimizer's state outside its variables during
a compiled step and shows it to the optimizer only: the guard that wraps the
bound model's train step (`_jax.JaxRoad.run_guarded`) puts that state in
`State.step_values` for the duration of the step, where this reads it.
"""

import warnings

import keras
from keras import ops

# Keras' marker of its shape-only passes (`compute_output_spec`), whose
# inputs are backend placeholders, not `keras.KerasTensor`s; it has no
# public name.
from keras.src.backend.common.symbolic_scope import in_symbolic_scope

# The caller's `keras.StatelessScope`, whose values a teacher inside a
# stateless step must read (public Keras can enter a scope, not find it).
from keras.src.backend.common.stateless_scope import get_stateless_scope

from keras_ema import _binding
from keras_ema import _packing
from keras_ema import _slots
from keras_ema import _update


def call_with_averages(optimizer, model, args, kwargs):
    """`optimizer.call_with_averages(model, *args, **kwargs)`."""
    state = optimizer._ema_state
    if not state.entries:
        if in_symbolic_scope():
            # Keras' first, symbolic pass over `compute_loss` (shapes only),
            # before it builds the optimizer: the weights stand in. The
            # model is known from here on, so that its compiled step, traced
            # next, runs through its guard (on JAX, where the averages are).
            _bind_if_trained(optimizer, model)
            return model(*args, **kwargs)
        # The first step calls the teacher before the optimizer, which
        # would build itself then: the averages start at the weights.
        optimizer.shadow_copy(model)
        state.built_by_teacher = model.name
    optimizer._check_ready("call_with_averages")
    _check_averaged(state, model)
    values = state.step_values
    if values is None and _averages_taken(state):
        # A JAX trainer holds the averages outside their variables, in a
        # step that is not the bound model's guarded one: unreadable here.
        return _refuse_unknown_step(state, model, args, kwargs)
    _bind_if_trained(optimizer, model)
    swapped = state.step_swapped
    if swapped is None and state.road.executing_eagerly():
        swapped = state.swapped_in
    if swapped is None:
        # Traced for every later run (TensorFlow's test function): the swap
        # flag's value when the step runs chooses, not the trace's.
        swapped = ops.not_equal(state.swapped, 0)
    mapping = []
    for variable in model.variables:
        i = state.index.get(state.var_key(variable))
        if i is not None and swapped is False:
            value = _read(state.entries[i][1], values)
        else:
            # Read here, in the caller's scope: inside a trainer's stateless
            # step that is the variable's value in this step.
            value = _current(state, variable, values)
            if i is not None and swapped is not True:
                average = _read(state.entries[i][1], values)
                value = ops.where(
                    swapped, ops.cast(value, average.dtype), average
                )
        mapping.append((variable, ops.stop_gradient(value)))
    with keras.StatelessScope(state_mapping=mapping):
        return model(*args, **kwargs)


def _current(state, variable, values):
    """The variable's value in this step: the caller's scope's, else the
    step's (a JAX trainer's), else its own."""
    scope = get_stateless_scope()
    if scope is not None:
        value = scope.get_current_value(variable)
        if value is not None:
            return value
    if values is not None and id(variable) in values:
        return values[id(variable)]
    if values is None and state.road.is_lost(variable):
        raise ValueError(
            "`call_with_averages` does not support a compiled JAX step of a "
            "model the optimizer was not told about: the trainer holds the "
            f"values of {variable.path} outside it. Instead, call "
            "`optimizer.shadow_copy(model)` after `compile`, before the "
            "model's first `fit`, `evaluate` or `predict`."
        )
    return variable.value


def _averages_taken(state):
    return any(
        state.road.is_lost(_packing.holder(average))
        for _, average, _ in state.entries
    )


def _refuse_unknown_step(state, model, args, kwargs):
    """The teacher in a compiled JAX train step that keras-ema does not
    guard (the model was not told before its train function was built):
    the step is refused, changing nothing, and the fit raises when it ends
    (nothing may raise inside the step: the trainer holds the weights)."""
    state.unguarded_teacher = (
        "`call_with_averages` does not support a model's compiled JAX train "
        "step before the optimizer is told the model: the train function of "
        f"{model.name!r} was built before keras-ema knew it, so the averages "
        "are out of its reach and this fit changed nothing. Instead, call "
        "`optimizer.shadow_copy(model)` after `compile` (or pass a keras-ema "
        "callback to `fit`) and fit again."
    )
    warnings.warn(
        f"keras-ema: this step changes nothing: {state.unguarded_teacher}",
        stacklevel=4,
    )
    return model(*args, **kwargs)


def _bind_if_trained(optimizer, model):
    """Binds `model` if it is the model this optimizer trains: no model is
    bound yet, and its trainable variables are those it was built with (or
    it is not built yet)."""
    state = optimizer._ema_state
    if state.bound_model() is not None:
        return
    keys = [state.var_key(v) for v in model.trainable_variables]
    if state.built and keys != [state.var_key(v) for v in state.built_for]:
        return
    _binding.bind(optimizer, model)


def _check_averaged(state, model):
    """Refuses a model whose weights this optimizer does not average."""
    missing = [
        v for v in model.trainable_variables
        if _slots.should_average(state, v)
        and state.var_key(v) not in state.index
    ]
    if missing:
        raise ValueError(
            "`call_with_averages` does not support a model whose weights "
            f"this optimizer does not average: {model.name!r} has no "
            f"averages of {_update.describe(missing)}. Instead, pass the "
            "model this optimizer trains (or a part of it), or create its "
            "averages first with `optimizer.shadow_copy(model)` before "
            "training."
        )


def _read(average, values):
    """The average's value in this step."""
    if isinstance(average, _packing.PackedAverage):
        buffer = average.pack.buffer
        if values is not None and id(buffer) in values:
            return average.pack.part(values[id(buffer)], average.index)
        return average.value
    if values is not None and id(average) in values:
        return values[id(average)]
    return average.value

