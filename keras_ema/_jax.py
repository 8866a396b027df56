"""The JAX road of `ExponentialMovingAverage`.

On JAX, `model.fit` compiles a stateless train step: the optimizer gets the
values of its own variables and of the trainable weights, and must return new
ones (`stateless_apply`). Two things need care there:

- The averages of non-trainable variables (BatchNorm statistics) cannot be
  updated by the optimizer, which never sees those values. `shadow_copy`
  wraps the model's `train_step` instead: the wrapper reads the step's new
  non-trainable values from the returned state and moves their averages in
  the same compiled step.
- An exception inside the compiled step would lose the model's weights (the
  trainer donates their buffers), so a step run while the averages are
  swapped in changes nothing and prints a warning instead of raising.
"""

import jax
import keras
from keras import ops
from keras.src.backend import StatelessScope

_WARNING = (
    "keras-ema: this train step changed nothing, because the averages are "
    "swapped into the model. Call `optimizer.swap_weights()` to put the "
    "training weights back before training."
)


def stateless_apply(optimizer, optimizer_variables, grads, trainable_variables):
    """`ExponentialMovingAverage.stateless_apply` on JAX."""
    # An outer LossScaleOptimizer passes variables, read through its scope.
    optimizer_variables = [_read(v) for v in optimizer_variables]
    trainable_variables = [_read(v) for v in trainable_variables]
    swapped = _value(optimizer, optimizer.variables, optimizer_variables,
                     optimizer._swapped)

    def refuse():
        jax.debug.print(_WARNING)
        return trainable_variables, optimizer_variables

    def train():
        return _train(optimizer, optimizer_variables, grads, trainable_variables)

    return ops.cond(ops.not_equal(swapped, 0), refuse, train)


def _train(optimizer, optimizer_variables, grads, trainable_variables):
    inner = optimizer.inner_optimizer
    variables = optimizer.variables
    own = len(variables) - len(inner.variables) - len(optimizer._averaged.extra)
    inner_values = optimizer_variables[own : own + len(inner.variables)]
    # The inner optimizer runs its own stateless path: it may branch, as a
    # LossScaleOptimizer does, which plain assignments could not.
    with StatelessScope(state_mapping=list(zip(inner.variables, inner_values))):
        before = ops.copy(inner.iterations)
    new_trainable, new_inner = inner.stateless_apply(
        inner_values, grads, trainable_variables
    )
    with StatelessScope(state_mapping=list(zip(inner.variables, new_inner))):
        moved = ops.not_equal(inner.iterations, before)

    trainable = {id(v) for v in optimizer._trainable_variables}
    entries = [e for e in optimizer._averaged.entries if id(e[0]) in trainable]
    values = optimizer_variables[:own] + new_inner + optimizer_variables[
        own + len(inner.variables) :
    ]
    mapping = list(zip(variables, values)) + list(
        zip(optimizer._trainable_variables, new_trainable)
    )
    with StatelessScope(state_mapping=mapping) as scope:
        optimizer._update_averages(moved, entries)
    return new_trainable, [scope.get_current_value(v) for v in variables]


def install_train_step(model, optimizer):
    """Wraps `model.train_step` to move the averages it alone can see."""
    if getattr(vars(model).get("train_step"), "_keras_ema", None) is optimizer:
        return
    original = model.train_step

    def train_step(state, data):
        before = state[2]
        logs, state = original(state, data)
        trainable, non_trainable, values, metrics = state
        values = _move_model_averages(
            optimizer, model, trainable, non_trainable, before, values
        )
        return logs, (trainable, non_trainable, values, metrics)

    train_step._keras_ema = optimizer
    model.train_step = train_step
    if getattr(model, "train_function", None) is not None:
        # Compiled before, it would not call the wrapper. `fit` compiles it
        # before `on_train_begin`, so rebuild it rather than drop it.
        model.make_train_function(force=True)


def _move_model_averages(optimizer, model, trainable, non_trainable, before,
                         values):
    built = {id(v) for v in optimizer._trainable_variables}
    entries = [e for e in optimizer._averaged.entries if id(e[0]) not in built]
    variables = optimizer.variables
    # The step counter moved iff the optimizer made a real update.
    step = _value(optimizer, variables, values, optimizer._step)
    moved = ops.not_equal(
        step, _value(optimizer, variables, before, optimizer._step)
    )
    mapping = (
        list(zip(variables, values))
        + list(zip(model.trainable_variables, trainable))
        + list(zip(model.non_trainable_variables, non_trainable))
    )
    with StatelessScope(state_mapping=mapping) as scope:
        optimizer._move_averages(entries, moved, step)
    return [scope.get_current_value(v) for v in variables]


def _read(value):
    return value.value if isinstance(value, keras.Variable) else value


def _value(optimizer, variables, values, variable):
    for v, value in zip(variables, values):
        if v is variable:
            return value
    raise ValueError(f"{variable.path} is not a variable of {optimizer.name}.")
