"""Putting a JAX model's state back into its variables after an error.

While JAX's `fit`, `evaluate` and `predict` run, the trainer keeps the
model's state outside its variables; an error leaves them empty.
`SwapAverageWeights` calls `reattach` before it swaps back.
"""

import keras


def reattach(model, state=()):
    """Gives the model's variables back their values after a JAX error.

    While JAX's `evaluate` and `predict` run, the trainer keeps the model's
    state outside its variables: the latest in the model, which
    `jax_state_sync()` attaches, and the one a step is given, `state` (the
    values of the trainable, non-trainable, then metrics variables, in the
    trainer's layout). An error leaves the variables empty. A compiled step
    that failed consumed the state it was given: the swap back then puts
    the raw weights back (and warns that the averages in the model are lost).
    """
    if keras.backend.backend() != "jax":
        return
    # First, also where `state` is given: an error before the first step
    # finishes leaves the model holding the state of an earlier call (after
    # `predict_on_batch`, or one that failed), which must not be attached
    # later, over what `state` gives back. This marks it attached.
    model.jax_state_sync()
    groups = (
        model.trainable_variables,
        model.non_trainable_variables,
        model.metrics_variables,
    )
    for variables, values in zip(groups, state):
        values = list(values)
        if len(values) == len(variables) and not any(
            _is_deleted(value) for value in values
        ):
            for variable, value in zip(variables, values):
                variable.assign(value)


def _is_deleted(value):
    return bool(getattr(value, "is_deleted", lambda: False)())
