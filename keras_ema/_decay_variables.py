"""The decay as the compiled train step reads it: from variables.

A Python attribute read while a step is traced is frozen into it. So the
decay lives in optimizer variables: a number in `average_decay`, and the
`parameters` of a schedule (`schedules.DecaySchedule.parameters`) in one
variable each. Setting `optimizer.average_decay` assigns them, which takes
effect from the next update without retracing, and saves them with the
optimizer. What a variable cannot express, a change of rule (a number for a
schedule, another schedule class), is refused once training started.
"""

import keras

from keras_ema import _checks
from keras_ema import _tf
from keras_ema import schedules

_FROZEN = (
    "ExponentialMovingAverage does not support replacing the decay rule "
    "once training started: the compiled train step keeps the rule it was "
    "traced with. Received: average_decay={!r}. Instead, set a number where "
    "a number was set, or a schedule of the class in use (its `parameters` "
    "are read from variables), or create the optimizer with this "
    "`average_decay`."
)


def set_decay(optimizer, value):
    """`optimizer.average_decay = value`."""
    number = schedules._is_real(value)
    if number:
        value = schedules._check_decay(
            "ExponentialMovingAverage", "average_decay", value
        )
        schedule = None
    else:
        schedule = _checks.check_schedule(schedules.get(value))
    old = optimizer.__dict__.get("_schedule")
    if optimizer._trained and not (
        (number and old is None)
        or (old is not None and type(schedule) is type(old)
            and schedules.parameters(schedule))
    ):
        raise ValueError(_FROZEN.format(value))
    optimizer.__dict__["_average_decay"] = value
    optimizer.__dict__["_schedule"] = schedule
    if optimizer.built:
        hold(optimizer)


def create(optimizer):
    """Creates the variables, holding the decay set so far.

    With initial values rather than assignments: in a replica context of
    `tf.distribute` an assignment would be a merge call.
    """
    schedule = optimizer._schedule
    number = optimizer._average_decay if schedule is None else 0.0
    optimizer._decay = _add(optimizer, "average_decay", number)
    _create_schedule_values(optimizer, schedule)


def hold(optimizer):
    """Puts the decay's numbers into the variables the step reads."""
    schedule = optimizer._schedule
    with _tf.strategy_scope(optimizer), _tf.eager_scope():
        if schedule is None:
            optimizer._decay.assign(optimizer._average_decay)
            return
        held = optimizer.__dict__.get("_schedule_values") or {}
        if set(held) != set(schedules.parameters(schedule)):
            _create_schedule_values(optimizer, schedule)
            return
        for name, variable in held.items():
            variable.assign(getattr(schedule, name))


def _create_schedule_values(optimizer, schedule):
    names = schedules.parameters(schedule) if schedule is not None else ()
    optimizer.__dict__["_schedule_values"] = {
        name: _add(optimizer, f"average_decay_{name}", getattr(schedule, name))
        for name in names
    }


def _add(optimizer, name, value):
    # Eagerly, also while `fit` traces the step that builds the optimizer.
    with _tf.strategy_scope(optimizer), _tf.eager_scope():
        return optimizer.add_variable(
            shape=(), dtype="float32", aggregation="only_first_replica",
            initializer=keras.initializers.Constant(value), name=name,
        )


def complement_at(optimizer, n):
    """`1 - decay` of the averaging update after real update `n + 1` since
    `start_step`, read from the variables (`schedules.complement`)."""
    schedule = optimizer._schedule
    if schedule is None:
        def schedule(step):
            return schedules.number_rule(
                step, optimizer._decay, optimizer.dynamic_decay
            )
    else:
        held = optimizer.__dict__.get("_schedule_values")
        if held:
            # Values, not variables: plain arithmetic on a variable inside a
            # traced JAX step is refused.
            schedule = schedules.with_values(
                schedule, {k: v.value for k, v in held.items()}
            )
    return schedules.complement(schedule, n, optimizer.update_every)
