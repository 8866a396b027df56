"""The JAX road of `ExponentialMovingAverage`.

On JAX, `model.fit` compiles a stateless train step: the optimizer gets the
values of its own variables and of the trainable weights, and must return new
ones (`stateless_apply`). Three things need care there:

- The averages of non-trainable variables (BatchNorm statistics) cannot be
  updated by the optimizer, which never sees those values. The model's
  `train_step` is wrapped instead (`_model.install_guard`): the wrapper reads
  the step's new non-trainable values from the returned state and moves
  their averages in the same compiled step.
- An exception inside the compiled step would lose the model's weights (the
  trainer donates their buffers), so a step run while the averages are
  swapped in changes nothing instead of raising (the wrapper keeps the
  BatchNorm statistics too); a warning is given when such a step is
  compiled.
- Speed: the averages must read the new weights from memory, not have XLA
  recompute them, which would copy every old weight per step.
"""

import warnings

import jax
import keras
from keras import ops
from keras.src.backend import StatelessScope

from keras_ema import _averages
from keras_ema import _model
from keras_ema import _packing
from keras_ema import teacher

_WARNING = (
    "keras-ema: the averages are swapped into the model, so the train steps "
    "change nothing until `optimizer.swap_weights()` puts the training "
    "weights back."
)


def stateless_apply(optimizer, optimizer_variables, grads, trainable_variables):
    """`ExponentialMovingAverage.stateless_apply` on JAX."""
    # An outer LossScaleOptimizer passes variables, read through its scope.
    optimizer_variables = [_read(v) for v in optimizer_variables]
    trainable_variables = [_read(v) for v in trainable_variables]
    swapped = _any_swapped(optimizer, optimizer.variables, optimizer_variables)
    # A select, not a conditional around the step: XLA fuses it into the
    # update kernels, where a conditional (or a printing callback) would
    # cost a multiple of the step. The warning is given once, when the step
    # is compiled while the averages are known to be swapped in.
    chain = _model.chain(optimizer)
    if any(averaging._swapped_in for averaging in chain):
        warnings.warn(_WARNING, stacklevel=2)

    def keep_if_swapped(old, new):
        return [ops.where(swapped, o, n) for o, n in zip(old, new)]

    # This optimizer moves the averages of the ones it wraps too (the
    # profiles of `PostHocEMA`), after one step of the optimizer they wrap.
    base = chain[-1].inner_optimizer
    variables = optimizer.variables
    where = {id(v): i for i, v in enumerate(variables)}
    base_at = [where[id(v)] for v in base.variables]
    base_values = [optimizer_variables[i] for i in base_at]
    # The inner optimizer runs its own stateless path: it may branch, as a
    # LossScaleOptimizer does, which plain assignments could not.
    with StatelessScope(state_mapping=list(zip(base.variables, base_values))):
        before = ops.copy(base.iterations)
    new_trainable, new_base = base.stateless_apply(
        base_values, grads, trainable_variables
    )
    new_trainable = keep_if_swapped(trainable_variables, new_trainable)
    # The averages read the new weights from memory. Without the barrier
    # XLA recomputes each new weight inside the average's kernel, which then
    # needs the old weight too: a copy of every weight per step, 2x-4x the
    # cost of the average itself.
    new_trainable = jax.lax.optimization_barrier(new_trainable)
    with StatelessScope(state_mapping=list(zip(base.variables, new_base))):
        moved = ops.not_equal(base.iterations, before)

    values = list(optimizer_variables)
    for i, value in zip(base_at, new_base):
        values[i] = value
    mapping = list(zip(variables, values)) + list(
        zip(optimizer._trainable_variables, new_trainable)
    )
    with StatelessScope(state_mapping=mapping) as scope, \
            _packing.sharing_joins():
        for averaging in chain:
            _averages.update_averages(
                averaging, moved, _entries(averaging, built=True)
            )
    new_values = [scope.get_current_value(v) for v in variables]
    return new_trainable, keep_if_swapped(optimizer_variables, new_values)


def guarded_train_step(model, optimizer, original):
    """`model.train_step`, also moving the averages it alone can see, and
    changing nothing at all while the averages are swapped in."""

    def train_step(state, data):
        if not any(p is optimizer for p in _model.chain(model.optimizer)):
            # Left by an optimizer the model was compiled with before (e.g.
            # by `clone_model`): the model's optimizer has its own guard.
            return original(state, data)
        before = state[2]
        # A teacher call in the step reads the averages from its state.
        with teacher.stepping(model.optimizer.variables, before):
            logs, new_state = original(state, data)
        trainable, non_trainable, values, metrics = new_state
        # The state holds the values of the model's optimizer's variables,
        # which may wrap this one (`PostHocEMA`, `LossScaleOptimizer`).
        owner = model.optimizer.variables
        if optimizer._averaged.extra:
            values = _move_model_averages(
                optimizer, model, owner, trainable, non_trainable, before,
                values,
            )
        # The optimizer kept the weights and its own state; the forward pass
        # moved the BatchNorm statistics: keep them too.
        swapped = _any_swapped(optimizer, owner, before)
        non_trainable = [
            ops.where(swapped, old, new)
            for old, new in zip(state[1], non_trainable)
        ]
        return logs, (trainable, non_trainable, values, metrics)

    return train_step


def _move_model_averages(optimizer, model, variables, trainable,
                         non_trainable, before, values):
    entries = _entries(optimizer, built=False)
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
        _averages.move_averages(optimizer, entries, moved, step)
    return [scope.get_current_value(v) for v in variables]


def _any_swapped(optimizer, variables, values):
    """Whether any average of the chain is swapped in (`_model.chain`)."""
    flags = [
        ops.not_equal(_value(optimizer, variables, values, p._swapped), 0)
        for p in _model.chain(optimizer)
    ]
    for flag in flags[1:]:
        flags[0] = ops.logical_or(flags[0], flag)
    return flags[0]


def _entries(optimizer, built):
    """The entries of the variables the optimizer was built with (the
    trainable weights, which its stateless step sees), or of the others."""
    ids = {id(v) for v in optimizer._trainable_variables}
    return [e for e in optimizer._averaged.entries if (id(e[0]) in ids) == built]


def _read(value):
    return value.value if isinstance(value, keras.Variable) else value


def _value(optimizer, variables, values, variable):
    for v, value in zip(variables, values):
        if v is variable:
            return value
    raise ValueError(f"{variable.path} is not a variable of {optimizer.name}.")
