"""The decay as the compiled train step reads it: from variables.

A Python attribute read while a step is traced is frozen into it. So the
decay lives in optimizer variables: a number in `average_decay`, and the
`parameters` of a schedule (`schedules.DecaySchedule.parameters`) in one
variable each. Setting `optimizer.average_decay` assigns them, which takes
effect from the next update without retracing, and saves them with the
optimizer. What a variable cannot express, a change of rule (a number for a
schedule, another schedule class), is refused once training started. The
variables are float64 where the backend computes in it
(`_schedule_base.wide_float`): a decay near 1 keeps its digits.
"""

import keras
import numpy as np

from keras_ema import _checks
from keras_ema import _schedule_base
from keras_ema import bema
from keras_ema import schedules

_FROZEN = (
    "ExponentialMovingAverage does not support replacing the decay rule "
    "once training started: the compiled train step keeps the rule it was "
    "traced with. Received: average_decay={!r}. Instead, set a number where "
    "a number was set, or a schedule of the class in use (its `parameters` "
    "are read from variables), or create the optimizer with this "
    "`average_decay`."
)


_BEMA_FIXED = (
    "ExponentialMovingAverage does not support switching to or from "
    "`schedules.BEMA` once the averages exist: BEMA's averages keep their "
    "EMA and starting weights in variables created with them. Received: "
    "average_decay={!r}. Instead, create the optimizer with the rule it "
    "keeps."
)


def set_decay(state, value, add_variable):
    """`optimizer.average_decay = value`."""
    number = _schedule_base.is_real(value)
    if number:
        value = _schedule_base.check_decay(
            "ExponentialMovingAverage", "average_decay", value
        )
        schedule = None
    else:
        schedule = _checks.check_schedule(
            schedules.get(value), state.road.eager_scope
        )
    old = state.schedule
    if state.built and bema.is_bema(schedule) != state.bias_corrected:
        raise ValueError(_BEMA_FIXED.format(value))
    bema.check_settings(schedule, state.compensated)
    if state.trained and not (
        (number and old is None) or _same_rule(schedule, old)
    ):
        raise ValueError(_FROZEN.format(value))
    state.average_decay = value
    state.schedule = schedule
    if state.built:
        hold(state, add_variable)


def _same_rule(schedule, old):
    """Whether `schedule` can replace `old` in a traced step: a schedule
    of the same class whose parameters the step reads from variables, or
    one equal to it (`Uniform()` for `Uniform()`)."""
    if old is None or type(schedule) is not type(old):
        return False
    if schedule is old or schedules.parameters(schedule):
        return True
    return isinstance(schedule, schedules.DecaySchedule) and (
        schedule.get_config() == old.get_config()
    )


def create(state, add_variable):
    """Creates the variables, holding the decay set so far.

    With initial values rather than assignments: in a replica context of
    `tf.distribute` an assignment would be a merge call.
    """
    number = state.average_decay if state.schedule is None else 0.0
    state.decay = _add(state, add_variable, "average_decay", number)
    _create_schedule_values(state, add_variable)


def hold(state, add_variable):
    """Puts the decay's numbers into the variables the step reads."""
    schedule = state.schedule
    road = state.road
    with road.strategy_scope(state), road.eager_scope():
        if schedule is None:
            state.decay.assign(state.average_decay)
            return
        held = state.schedule_values
        if set(held) != set(schedules.parameters(schedule)):
            _create_schedule_values(state, add_variable)
            return
        for name, variable in held.items():
            variable.assign(getattr(schedule, name))


def sync_from_variables(state):
    """The Python decay (what `get_config` saves) from the variables, after
    a load wrote them."""
    def number(variable):
        return float(keras.ops.convert_to_numpy(variable))

    if state.schedule is None:
        decay = number(state.decay)
        if np.float32(state.average_decay) != np.float32(decay):
            state.average_decay = decay
        return
    schedule = state.schedule
    loaded = {k: number(v) for k, v in state.schedule_values.items()}
    # Values that float32 holds as they were keep their Python spelling.
    changed = {
        k: v for k, v in loaded.items()
        if np.float32(getattr(schedule, k)) != np.float32(v)
    }
    if changed:
        state.schedule = schedules.with_values(schedule, changed)
        state.average_decay = state.schedule


def _create_schedule_values(state, add_variable):
    schedule = state.schedule
    names = schedules.parameters(schedule) if schedule is not None else ()
    state.schedule_values = {
        name: _add(state, add_variable, f"average_decay_{name}",
                   getattr(schedule, name))
        for name in names
    }


def _add(state, add_variable, name, value):
    # Eagerly, also while `fit` traces the step that builds the optimizer.
    # Wide: float32 holds 0.9999 as 0.99989998, whose `1 - decay` is 1.7e-4
    # relative off.
    road = state.road
    with road.strategy_scope(state), road.eager_scope():
        variable = add_variable(
            shape=(), dtype=_schedule_base.wide_float(),
            aggregation="only_first_replica",
            initializer=keras.initializers.Constant(np.float64(value)),
            name=name,
        )
    state.own_variables.append(variable)
    return variable


def complement_at(state, n):
    """`1 - decay` of the averaging update after real update `n + 1` since
    `start_step`, read from the variables (`schedules.complement`)."""
    return schedules.complement(_read(state), n, state.update_every)


def bias_correction_at(state, t):
    """BEMA's `(beta_t, alpha_t)` for `t` real updates since averaging
    started, read from the variables (`bema.BEMA.coefficients`)."""
    return _read(state).coefficients(t)


def _read(state):
    """The schedule in use, with the values of the variables that hold its
    parameters."""
    schedule = state.schedule
    # Values, not variables: plain arithmetic on a variable inside a
    # traced JAX step is refused.
    if schedule is None:
        rule = (schedules.Dynamic if state.dynamic_decay
                else schedules.Constant)(0.0)
        return schedules.with_values(
            rule, {schedules.parameters(rule)[0]: state.decay.value}
        )
    if state.schedule_values:
        values = {k: v.value for k, v in state.schedule_values.items()}
        if not _schedule_base.computes_complement(schedule):
            # A schedule whose `1 - decay` is `1 - schedule(n)` computes in
            # float32, as `DecaySchedule` asks of `__call__`.
            values = {k: keras.ops.cast(v, "float32") for k, v in values.items()}
        schedule = schedules.with_values(schedule, values)
    return schedule
