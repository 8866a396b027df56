"""The JAX road of `ExponentialMovingAverage`.

On JAX, `model.fit` compiles a stateless train step: the optimizer gets the
values of its own variables and of the trainable weights, and must return new
ones (`stateless_apply`), and the trainer keeps the model's state outside its
variables until the fit ends. Four things need care:

- The averages of non-trainable variables (BatchNorm statistics) cannot be
  updated by the optimizer, which never sees those values: the model's
  train step, wrapped once it is bound (`_binding.py`), reads the step's new
  non-trainable values from the returned state and moves their averages in
  the same compiled step (`run_guarded`).
- Nothing may raise inside the compiled step: the trainer took the state
  out of the variables, and an exception (also at trace time) loses it. A
  step run while the averages are swapped in, or one the optimizer refuses
  (variables it was not built with, or another model than its own), changes
  nothing instead; a warning is given when it is compiled, and a refused
  step's error is raised when the fit ends.
- A trainer's error leaves the model's variables cleared: `sync` and
  `reattach` put them back.
- Speed: the averages must read the new weights from memory, not have XLA
  recompute them, which would copy every old weight per step.
"""

import contextlib
import warnings

import jax
import keras
import numpy as np
from keras import ops

from keras_ema import _packing
from keras_ema import _road
from keras_ema import _step
from keras_ema import _update

_WARNING = (
    "keras-ema: the averages are swapped into the model, so the train steps "
    "change nothing until `optimizer.swap_weights()` puts the training "
    "weights back."
)


class JaxRoad(_road.Road):
    stateless = True

    @property
    def packs_averages(self):
        # Under a `keras.distribution` each average is laid out like its
        # weight: not packed.
        return keras.distribution.distribution() is None

    def is_lost(self, variable):
        """Whether a model variable lost its value: cleared by a trainer
        that raised, or its buffer consumed by a compiled step that failed."""
        if not isinstance(variable, keras.Variable):
            return False
        # Keras has no public way to look at a variable without its value
        # being read (which fails on a cleared one).
        array = variable._value
        return array is None or array.is_deleted()

    def sync(self, model):
        model.jax_state_sync()

    def reattach(self, model, values=()):
        """Gives the model's variables back their values after an error.

        While JAX's `evaluate` and `predict` run, the trainer keeps the
        model's state outside its variables: the latest in the model, which
        `jax_state_sync()` attaches, and the one a step is given, `values`
        (the trainable, non-trainable, then metrics variables' values, in
        the trainer's layout). A compiled step that failed consumed the
        state it was given: the swap back then puts the raw weights back.
        """
        # First, also where `values` are given: an error before the first
        # step finishes leaves the model holding the state of an earlier
        # call, which must not be attached later, over `values`.
        model.jax_state_sync()
        groups = (
            model.trainable_variables,
            model.non_trainable_variables,
            model.metrics_variables,
        )
        for variables, given in zip(groups, values):
            given = list(given)
            if len(given) == len(variables) and not any(
                bool(getattr(v, "is_deleted", lambda: False)()) for v in given
            ):
                for variable, value in zip(variables, given):
                    variable.assign(value)

    def for_each(self, state, entries, packs, fn, args, when, joins):
        # `when` is ignored: XLA's conditional copies the buffers it passes
        # through, which costs more than the update it skips. The caller's
        # arguments make `fn` a no-op where `when` is false.
        super().for_each(state, entries, packs, fn, args, None, joins)

    def check_float_dtype(self, dtype):
        if dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError(
                "ExponentialMovingAverage does not support "
                "`average_dtype='float64'` while JAX runs without 64-bit "
                "floats: it would silently use float32. Instead, call "
                "`jax.config.update('jax_enable_x64', True)` first."
            )

    def step_count_limit(self):
        return int(np.iinfo(keras.backend.standardize_dtype("int")).max)

    # -- the compiled train step ----------------------------------------------

    def stateless_apply(self, states, variables, base, built_for,
                        optimizer_variables, grads, trainable_variables):
        """`stateless_apply` of the chain of averages `states` (outermost
        first) over the optimizer `base`; `variables` are the outermost
        optimizer's variables, `built_for` the variables it was built with."""
        # An outer LossScaleOptimizer passes variables, read through its scope.
        optimizer_variables = [_read(v) for v in optimizer_variables]
        trainable_variables = [_read(v) for v in trainable_variables]
        refused = next(
            (s.unguarded_teacher for s in states if s.unguarded_teacher), None
        ) or _refusal(states[0], built_for, trainable_variables)
        if refused is not None:
            states[0].refused = refused
            warnings.warn(f"keras-ema: this step changes nothing: {refused}",
                          stacklevel=3)
            return trainable_variables, optimizer_variables
        swapped = _any_swapped(states, variables, optimizer_variables)
        # A select, not a conditional around the step: XLA fuses it into the
        # update kernels, where a conditional (or a printing callback) would
        # cost a multiple of the step. The warning is given once, when the
        # step is compiled while the averages are known to be swapped in.
        if any(state.swapped_in for state in states):
            warnings.warn(_WARNING, stacklevel=3)

        def keep_if_swapped(old, new):
            return [ops.where(swapped, o, n) for o, n in zip(old, new)]

        where = {id(v): i for i, v in enumerate(variables)}
        base_at = [where[id(v)] for v in base.variables]
        base_values = [optimizer_variables[i] for i in base_at]
        # The inner optimizer runs its own stateless path: it may branch, as
        # a LossScaleOptimizer does, which plain assignments could not.
        with keras.StatelessScope(
            state_mapping=list(zip(base.variables, base_values))
        ):
            before = ops.copy(base.iterations)
        new_trainable, new_base = base.stateless_apply(
            base_values, grads, trainable_variables
        )
        new_trainable = keep_if_swapped(trainable_variables, new_trainable)
        # The averages read the new weights from memory. Without the barrier
        # XLA recomputes each new weight inside the average's kernel, which
        # then needs the old weight too: a copy of every weight per step,
        # 2x-4x the cost of the average itself.
        new_trainable = jax.lax.optimization_barrier(new_trainable)
        with keras.StatelessScope(
            state_mapping=list(zip(base.variables, new_base))
        ):
            moved = ops.not_equal(base.iterations, before)

        values = list(optimizer_variables)
        for i, value in zip(base_at, new_base):
            values[i] = value
        mapping = list(zip(variables, values)) + list(
            zip(built_for, new_trainable)
        )
        joins = _packing.Joins(self.graph_key)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            for state in states:
                _update.update_averages(
                    state, moved, _entries(state, built_for, trained=True),
                    joins=joins,
                )
        new_values = keep_if_swapped(
            optimizer_variables, [scope.get_current_value(v) for v in variables]
        )
        # A teacher called later in the same step sees the moved averages.
        for view in {id(s.step_values): s.step_values for s in states
                     if s.step_values is not None}.values():
            view.update((id(v), x) for v, x in zip(variables, new_values))
        return new_trainable, new_values

    def end_fit(self, state, var_list, iterations):
        if self.is_lost(iterations):
            # The fit raised inside a step, before its trainer put the state
            # back: its error is on its way, and nothing is known here.
            return
        # The steps of this `fit` refused by changing nothing.
        refused, state.refused = state.refused, None
        refused = refused or state.unguarded_teacher
        if refused is not None:
            # Named as the other backends name it, where `var_list` shows.
            _step.refuse_unknown(state, var_list)
            raise ValueError(refused)
        # A callback may have swapped the averages in after the last epoch's
        # steps (`swap_on_epoch=True`): only a fit that left `iterations`
        # where the previous one ended changed nothing. A first fit refused
        # warns when its step compiles (`stateless_apply`).
        last = state.iterations_after_fit
        state.iterations_after_fit = int(ops.convert_to_numpy(iterations))
        if state.swapped_in and last == state.iterations_after_fit:
            warnings.warn(
                "keras-ema: this `fit` changed nothing: the averages are "
                "swapped into the model. Instead, call "
                "`optimizer.swap_weights()` first, or pass "
                "`keras_ema.SwapAverageWeights()` to `fit`."
            )

    def run_guarded(self, model, states, original, args):
        """The model's train step, also moving the averages of its
        non-trainable variables, and changing nothing at all while the
        averages are swapped in."""
        state_values, data = args
        before = state_values[2]
        # The state holds the values of the model's optimizer's variables,
        # which may wrap these (`PostHocEMA`, `LossScaleOptimizer`).
        owner = model.optimizer.variables
        # A teacher call in the step reads the averages from the step's
        # state; `stateless_apply` knows it runs in its model's step. (A
        # swapped step changes nothing: the teacher may read the averages.)
        with _step_view(states, model, state_values, owner, before, False):
            logs, new_state = original(state_values, data)
        trainable, non_trainable, values, metrics = new_state
        for state in states:
            if state.extra:
                values = _move_model_averages(
                    state, model, owner, trainable, non_trainable, before,
                    values,
                )
        # The optimizer kept the weights and its own state; the forward pass
        # moved the BatchNorm statistics: keep them too.
        swapped = _any_swapped(states, owner, before)
        # (The select may round the statistics' update differently, by an
        # ulp, than the same step unguarded: XLA fuses it otherwise.)
        non_trainable = [
            ops.where(swapped, old, new)
            for old, new in zip(state_values[1], non_trainable)
        ]
        return logs, (trainable, non_trainable, values, metrics)


    # -- the compiled test and predict steps ---------------------------------

    def with_averages(self, states, iterator):
        """The batches of `iterator`, each given with the averages' values
        of the moment, or with None while they are swapped in: a compiled
        test or predict step receives only the model's state, and the
        values it would read from the variables are those of its trace."""
        holders = _holders(states)

        class Batches:
            def __next__(self):
                data = next(iterator)
                if any(state.swapped_in for state in states):
                    return StepData(data, None)
                return StepData(data, [v.value for v in holders])

            def __iter__(self):
                return self

            def __getattr__(self, name):
                return getattr(iterator, name)

        return Batches()

    def run_with_averages(self, model, states, original, state_values,
                          data):
        """`original(state_values, data)`, a test or predict step, with the
        values `with_averages` gave the batch where a teacher reads them."""
        if not isinstance(data, StepData):
            return original(state_values, data)
        values = data.averages
        with _step_view(states, model, state_values, _holders(states),
                        values or [], values is None):
            return original(state_values, data.data)


@jax.tree_util.register_pytree_node_class
class StepData:
    """A batch and the averages' values (None: swapped in), passed together
    to a compiled step; a swap changes the structure, hence the trace."""

    def __init__(self, data, averages):
        self.data = data
        self.averages = averages

    def tree_flatten(self):
        return (self.data, self.averages), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@contextlib.contextmanager
def _step_view(states, model, state_values, variables, values, swapped):
    """Within the block, `call_with_averages` reads the values of a step:
    `values` of `variables`, and the model's from the step's state."""
    view = {id(v): x for v, x in zip(variables, values)}
    groups = (model.trainable_variables, model.non_trainable_variables)
    for group, given in zip(groups, state_values):
        view.update((id(v), x) for v, x in zip(group, given))
    for state in states:
        state.step_values, state.step_swapped = view, swapped
    try:
        yield
    finally:
        for state in states:
            state.step_values, state.step_swapped = None, None


def _holders(states):
    """The variables that hold the averages of the chain `states`."""
    found = {}
    for state in states:
        for _, average, _ in state.entries:
            holder = _packing.holder(average)
            found[id(holder)] = holder
    return list(found.values())


def _refusal(state, built_for, values):
    """Why a traced step must change nothing, or None: values of other
    variables than the optimizer's, or a step outside its model's."""
    shapes = [tuple(v.shape) for v in values]
    if shapes != [tuple(v.shape) for v in built_for]:
        return (
            f"ExponentialMovingAverage does not support training variables it "
            f"was not built with: it was built for {len(built_for)} variables "
            f"({_update.paths(built_for[:3])}{', ...' * (len(built_for) > 3)})"
            f" and this step trains {len(values)} of other shapes. Instead, "
            "compile each model with its own optimizer, or call "
            "`optimizer.shadow_copy(model)` with the model that it trains "
            "before it trains another."
        )
    model = state.bound_model()
    if model is None and not state.trainable_weights_only:
        return _step.NO_MODEL
    if model is not None and state.step_values is None:
        return (
            f"ExponentialMovingAverage averages the weights of {model.name!r} "
            "(told by `shadow_copy` or a keras-ema callback) and, on JAX, "
            "trains them only in that model's train step; this step is "
            "another model's, or a custom loop's. Instead, compile each model "
            "with its own optimizer, e.g. `keras_ema.ExponentialMovingAverage"
            ".from_config(opt.get_config())`."
        )
    return None


def _move_model_averages(state, model, variables, trainable, non_trainable,
                         before, values):
    built = {id(v) for v in model.trainable_variables}
    entries = [e for e in state.entries if id(e[0]) not in built]
    # The step counter moved iff the optimizer made a real update.
    step = _value(variables, values, state.step)
    moved = ops.not_equal(step, _value(variables, before, state.step))
    mapping = (
        list(zip(variables, values))
        + list(zip(model.trainable_variables, trainable))
        + list(zip(model.non_trainable_variables, non_trainable))
    )
    with keras.StatelessScope(state_mapping=mapping) as scope:
        _update.move_averages(state, entries, moved, step)
    return [scope.get_current_value(v) for v in variables]


def _any_swapped(states, variables, values):
    """Whether any average of the chain `states` is swapped in."""
    flags = [
        ops.not_equal(_value(variables, values, state.swapped), 0)
        for state in states
    ]
    for flag in flags[1:]:
        flags[0] = ops.logical_or(flags[0], flag)
    return flags[0]


def _entries(state, built_for, trained):
    """The entries of the variables the optimizer was built with (the
    trainable weights, which its stateless step sees), or of the others."""
    ids = {id(v) for v in built_for}
    return [e for e in state.entries if (id(e[0]) in ids) == trained]


def _read(value):
    return value.value if isinstance(value, keras.Variable) else value


def _value(variables, values, variable):
    for v, value in zip(variables, values):
        if v is variable:
            return value
    raise ValueError(f"{variable.path} is not a variable of the optimizer.")
