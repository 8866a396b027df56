"""Inputs that used to fail obscurely (or not at all) get errors in Keras' style.

Each test passes a wrong value the way a user writes it, and checks the type
of the error and the parts of its message that say what was wrong, what was
received and what to do instead. All are raised where the value is given
(construction, or the call), never later inside `fit`.
"""

import math
import re

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import regression_data
from conftest import small_model

import keras_ema


def _ema(**kwargs):
    return keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), **kwargs
    )


def _compiled(**kwargs):
    model = small_model()
    opt = _ema(**kwargs)
    model.compile(optimizer=opt, loss="mse")
    return model, opt


# -- exclude ------------------------------------------------------------------


@pytest.mark.parametrize("exclude", [5, 2.5, {"bias": 1}, b"bias"])
def test_exclude_that_is_neither_a_pattern_nor_a_list_is_refused(exclude):
    with pytest.raises(ValueError, match=(
        "ExponentialMovingAverage does not support `exclude` of type "
        rf"{type(exclude).__name__}\. Received: exclude={re.escape(repr(exclude))}"
        r"\. Instead, pass a regular expression or a list of them"
    )):
        _ema(exclude=exclude)


def test_exclude_bytes_pattern_is_refused_with_the_str_to_pass():
    with pytest.raises(ValueError, match=(
        r"does not support `exclude` patterns of type bytes: they are regular "
        r"expressions matched against variable paths, which are str\. "
        r"Received: exclude=\[b'x'\]\. Instead, pass str patterns, e\.g\. "
        r"exclude=\['x'\]"
    )):
        _ema(exclude=[b"x"])


def test_exclude_non_str_item_is_refused():
    with pytest.raises(ValueError, match=(
        r"patterns of type int.*Received: exclude=\['bias\$', 3\]"
    )):
        _ema(exclude=["bias$", 3])


def test_exclude_patterns_still_accepted_and_used():
    model, opt = _compiled(exclude=("bias$", re.compile("dense_1/kernel")))
    opt.shadow_copy(model)
    averaged = [
        v.path for v in model.trainable_variables
        if opt.average(v) is not None
    ]
    assert averaged == [model.layers[0].kernel.path], averaged
    assert opt.get_config()["exclude"] == ["bias$", "dense_1/kernel"]


# -- average_decay ------------------------------------------------------------


def test_average_decay_dict_that_is_no_schedule_config_fails_at_construction():
    with pytest.raises(ValueError, match=(
        r"ExponentialMovingAverage does not support an `average_decay` that "
        r"is neither a number, a schedule, nor a schedule's config\. "
        r"Received: average_decay=\{'bad': 1\}\. Instead, pass a number in "
        r"\[0, 1\]"
    )):
        _ema(average_decay={"bad": 1})


class _Ramp(keras_ema.schedules.DecaySchedule):
    """A faulty schedule: `n / 5`, above 1 from n = 6."""

    def __call__(self, step):
        return keras.ops.cast(step, "float32") / 5.0

    def get_config(self):
        return {}


def _nan_from_1000(n):
    return keras.ops.where(keras.ops.greater_equal(n, 1000), math.nan, 0.99)


def _negative_late(n):
    return 0.999 - keras.ops.cast(n, "float32") * 1e-6


@pytest.mark.parametrize(
    "schedule, n, decay",
    [
        (lambda n: 1.5, 0, "1.5"),
        (lambda n: -0.5, 0, "-0.5"),
        (_Ramp(), 10, "2.0"),
        (_nan_from_1000, 1000, "nan"),
        (_negative_late, 1000000, "-0.00"),
    ],
    ids=["above_one", "negative", "decay_schedule", "nan", "negative_late"],
)
def test_schedule_with_decay_outside_zero_one_fails_at_construction(
    schedule, n, decay
):
    with pytest.raises(ValueError, match=(
        r"ExponentialMovingAverage does not support a decay outside \[0, 1\]: "
        r"the averages would diverge\. Received: average_decay=.*, whose "
        rf"decay at n={n} is {re.escape(decay)}.*Instead, return a decay in "
        r"\[0, 1\] for every n"
    )):
        _ema(average_decay=schedule)


def test_schedule_that_fails_on_an_integer_tensor_is_refused():
    with pytest.raises(ValueError, match=(
        r"does not support a decay schedule that fails on an integer tensor: "
        r"at n=0 it raised .*Instead, pass a function that takes an integer "
        r"tensor `n`"
    )):
        _ema(average_decay=lambda n: {"decay": 0.9})


def test_schedule_that_returns_a_vector_is_refused():
    with pytest.raises(ValueError, match=(
        r"does not support a decay schedule that returns a non-scalar: at "
        r"n=0 it returned shape \(2,\)"
    )):
        _ema(average_decay=lambda n: keras.ops.ones((2,)) * 0.9)


@pytest.mark.parametrize(
    "schedule",
    [
        keras_ema.schedules.Warmup(0.9999, power=3 / 4),
        keras_ema.schedules.HalfLife(10),
        lambda n: keras.ops.minimum(
            0.999, 1.0 - 1.0 / (1.0 + keras.ops.cast(n, "float32"))
        ),
        lambda n: 1.0,
        lambda n: 0.0,
    ],
    ids=["warmup", "half_life", "function", "one", "zero"],
)
def test_schedules_with_decay_in_zero_one_are_accepted(schedule):
    assert _ema(average_decay=schedule).average_decay is schedule


# -- assign_average_vars and shadow_copy --------------------------------------


def test_assign_average_vars_refuses_arrays_in_the_list():
    model, opt = _compiled()
    opt.shadow_copy(model)
    with pytest.raises(ValueError, match=(
        r"`assign_average_vars` does not support items of `var_list` that are "
        r"not variables\. Received: var_list\[0\]=<ndarray shape=\(4, 8\) "
        r"dtype=float32> of type ndarray\. Instead, pass the model's "
        r"variables themselves"
    )):
        opt.assign_average_vars([np.zeros((4, 8), "float32")])


def test_assign_average_vars_refuses_a_bare_array_or_variable():
    model, opt = _compiled()
    opt.shadow_copy(model)
    with pytest.raises(ValueError, match=(
        r"does not support a `var_list` that is not a list of variables\. "
        r"Received: var_list=<ndarray shape=\(4, 8\) dtype=float32>"
    )):
        opt.assign_average_vars(np.zeros((4, 8), "float32"))
    kernel = model.trainable_variables[0]
    with pytest.raises(ValueError, match=(
        rf"Received: var_list=<Variable path={re.escape(kernel.path)} "
        r"shape=\(4, 8\) dtype=float32> of type Variable\. Instead, pass a "
        r"list, e\.g\. `\[variable\]`"
    )):
        opt.assign_average_vars(kernel)
    before = kernel.numpy()
    opt.assign_average_vars([kernel])  # the list form still works
    np.testing.assert_array_equal(kernel.numpy(), before)


@pytest.mark.parametrize("model", [None, "model", 3])
def test_shadow_copy_refuses_what_is_not_a_model(model):
    opt = _ema()
    with pytest.raises(ValueError, match=(
        r"`shadow_copy` does not support a model that is not a Keras model "
        rf"or layer\. Received: model={re.escape(repr(model))} of type "
        rf"{type(model).__name__}\. Instead, pass the `keras\.Model`"
    )):
        opt.shadow_copy(model)
    assert not opt.built


def test_shadow_copy_of_the_variables_says_to_pass_the_model():
    model, opt = _compiled()
    with pytest.raises(ValueError, match=(
        r"Instead, pass the model itself, not its variables"
    )):
        opt.shadow_copy(model.trainable_variables)


# -- start_step and update_every: the step counter's range --------------------

INT32_MAX = 2**31 - 1


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's int32 step counter")
@pytest.mark.parametrize("name", ["start_step", "update_every"])
def test_jax_refuses_counts_beyond_its_int32_step_counter(name):
    with pytest.raises(ValueError, match=(
        rf"ExponentialMovingAverage does not support `{name}` above "
        rf"{INT32_MAX} on JAX: the step counter is int32.*Received: "
        rf"{name}={2**31}\. Instead, pass {name} <= {INT32_MAX}\."
    )):
        _ema(**{name: 2**31})


@pytest.mark.parametrize(
    "start_step", [INT32_MAX] + ([] if BACKEND == "jax" else [2**31, 2**40])
)
def test_largest_start_step_trains_and_only_copies(start_step):
    model, opt = _compiled(start_step=start_step)
    model.fit(*regression_data(16), batch_size=8, epochs=1, verbose=0)
    for weight in model.trainable_variables:
        np.testing.assert_array_equal(
            np.asarray(opt.average(weight)), weight.numpy()
        )
