"""Calling a model with its averages in place of its weights: a teacher.

Mean teacher, BYOL, DINO and data2vec call the average of the student's
weights inside the student's own train step. `call_with_averages` runs the
model's forward pass in a `keras.StatelessScope` that maps each averaged
variable to its average (gradients stopped) and every other variable to its
current value: no variable is written, nothing is swapped or copied, and the
same code runs eagerly and in compiled steps on every backend.

On JAX the trainer keeps the optimizer's state outside its variables during
a compiled step and shows it to the optimizer only: the guard that wraps the
model's train step (`_model.install_guard`) makes that state visible here,
for the duration of the step (`stepping`).
"""

import contextlib
import threading

import keras
from keras import ops

from keras_ema import _packing

# Keras' marker of its shape-only passes (`compute_output_spec`); it has no
# public name.
from keras.src.backend.common.symbolic_scope import in_symbolic_scope  # noqa: E402

_current = threading.local()


@contextlib.contextmanager
def stepping(variables, values):
    """Within a JAX train step: the optimizer's variables hold `values`."""
    previous = getattr(_current, "values", None)
    _current.values = {id(v): value for v, value in zip(variables, values)}
    try:
        yield
    finally:
        _current.values = previous


def call_with_averages(optimizer, model, *args, **kwargs):
    """`optimizer.call_with_averages(model, *args, **kwargs)`."""
    if not optimizer.has_shadow_copy:
        if in_symbolic_scope():
            # Keras' first, symbolic pass over `compute_loss` (shapes only),
            # before it builds the optimizer: the weights stand in.
            return model(*args, **kwargs)
        # The first step calls the teacher before the optimizer, which
        # would build itself then: the averages start at the weights.
        optimizer.shadow_copy(model)
    optimizer._check_ready("call_with_averages")
    if optimizer._swapped_in:
        # The model holds the averages already (known eagerly; training
        # refuses while they are in, so no compiled step sees this).
        mapping = [(v, ops.stop_gradient(v.value)) for v in model.variables]
    else:
        state = getattr(_current, "values", None)
        index = optimizer._averaged.index
        entries = optimizer._averaged.entries
        mapping = []
        for variable in model.variables:
            i = index.get(optimizer._var_key(variable))
            # Read here, in the caller's scope: inside a trainer's stateless
            # step that is the variable's value in this step.
            value = variable.value if i is None else _read(entries[i][1], state)
            mapping.append((variable, ops.stop_gradient(value)))
    with keras.StatelessScope(state_mapping=mapping):
        return model(*args, **kwargs)


def _read(average, state):
    """The average's value in this step."""
    if isinstance(average, _packing.PackedAverage):
        buffer = average.pack.buffer
        if state is not None and id(buffer) in state:
            return average.pack.part(state[id(buffer)], average.index)
        return average.value
    if state is not None and id(average) in state:
        return state[id(average)]
    return average.value
