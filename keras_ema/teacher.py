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

import keras
from keras import ops

# Keras' marker of its shape-only passes (`compute_output_spec`), whose
# inputs are backend placeholders, not `keras.KerasTensor`s; it has no
# public name.
from keras.src.backend.common.symbolic_scope import in_symbolic_scope

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
    optimizer._check_ready("call_with_averages")
    _check_averaged(state, model)
    _bind_if_trained(optimizer, model)
    if state.swapped_in:
        # The model holds the averages already (known eagerly; training
        # refuses while they are in, so no compiled step sees this).
        mapping = [(v, ops.stop_gradient(v.value)) for v in model.variables]
    else:
        values = state.step_values
        mapping = []
        for variable in model.variables:
            i = state.index.get(state.var_key(variable))
            # Read here, in the caller's scope: inside a trainer's stateless
            # step that is the variable's value in this step.
            value = (
                variable.value if i is None
                else _read(state.entries[i][1], values)
            )
            mapping.append((variable, ops.stop_gradient(value)))
    with keras.StatelessScope(state_mapping=mapping):
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

