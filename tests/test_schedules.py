import inspect
import json
import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_ema import _schedule_base
from keras_ema import schedules


# The docstring example of `DecaySchedule`, registered as a user would.
@keras.saving.register_keras_serializable(package="test_schedules")
class LinearRamp(schedules.DecaySchedule):
    def __init__(self, max_decay, steps):
        self.max_decay = max_decay
        self.steps = steps

    def __call__(self, step):
        n = ops.cast(step, "float32")
        return ops.minimum(n / self.steps, self.max_decay)

    def get_config(self):
        return {"max_decay": self.max_decay, "steps": self.steps}


def _decay(schedule, step):
    decay = schedule(step)
    assert keras.backend.standardize_dtype(decay.dtype) == "float32"
    assert tuple(decay.shape) == ()
    return float(ops.convert_to_numpy(decay))


# The optimizer passes `n` as a Python int or as an int32 / int64 tensor.
@pytest.fixture(params=[None, "int32", "int64"], ids=["int", "int32", "int64"])
def as_step(request):
    if request.param is None:
        return lambda n: n
    return lambda n: ops.convert_to_tensor(n, request.param)


def test_constant_gives_its_decay_at_every_step(as_step):
    schedule = schedules.Constant(0.999)
    for n in (0, 1, 10**6):
        assert _decay(schedule, as_step(n)) == pytest.approx(0.999, rel=1e-7)


def test_dynamic_ramps_as_tf1_num_updates_then_caps_at_max_decay(as_step):
    schedule = schedules.Dynamic(0.99)
    assert _decay(schedule, as_step(0)) == pytest.approx(1 / 10, rel=1e-6)
    assert _decay(schedule, as_step(1)) == pytest.approx(2 / 11, rel=1e-6)
    assert _decay(schedule, as_step(2)) == pytest.approx(3 / 12, rel=1e-6)
    # 1001 / 1010 = 0.991 > 0.99.
    assert _decay(schedule, as_step(1000)) == pytest.approx(0.99, rel=1e-7)


def test_warmup_starts_at_zero_then_follows_the_inverse_power(as_step):
    schedule = schedules.Warmup(0.9999, inv_gamma=1.0, power=2 / 3)
    # 1 - 1 ** (-2/3) = 0; 1 - 8 ** (-2/3) = 1 - 1/4; 1 - 27 ** (-2/3) = 1 - 1/9.
    assert _decay(schedule, as_step(0)) == 0.0
    assert _decay(schedule, as_step(7)) == pytest.approx(0.75, rel=1e-6)
    assert _decay(schedule, as_step(26)) == pytest.approx(8 / 9, rel=1e-6)


def test_warmup_inv_gamma_stretches_the_ramp_and_power_one_is_a_mean():
    # 1 - (1 + 6 / 2) ** -1 = 3/4: the inv_gamma=1 decay at n = 3.
    stretched = schedules.Warmup(1.0, inv_gamma=2.0, power=1.0)
    assert _decay(stretched, 6) == pytest.approx(0.75, rel=1e-6)
    # 1 - (1 + n) ** -1 = n / (n + 1): the running mean of the weights.
    mean = schedules.Warmup(1.0, power=1.0)
    assert _decay(mean, 3) == pytest.approx(0.75, rel=1e-6)


def test_warmup_clips_to_min_decay_and_max_decay(as_step):
    schedule = schedules.Warmup(0.9, min_decay=0.5)
    # Unclipped: 0.0 at n = 0, 0.75 at n = 7, 1 - 1001 ** (-2/3) = 0.990 at n = 1000.
    assert _decay(schedule, as_step(0)) == pytest.approx(0.5, rel=1e-7)
    assert _decay(schedule, as_step(7)) == pytest.approx(0.75, rel=1e-6)
    assert _decay(schedule, as_step(1000)) == pytest.approx(0.9, rel=1e-7)


@pytest.mark.parametrize(
    "power, decay, n",
    [
        (2 / 3, 0.999, 31_622),
        (2 / 3, 0.9999, 999_999),
        (3 / 4, 0.999, 9_999),
        (3 / 4, 0.9999, 215_443),
    ],
)
def test_warmup_docstring_guidance_is_when_the_decay_is_reached(power, decay, n):
    # `n` is the first update at `decay` (exact math, 1e-12 for float64 rounding).
    assert 1 - n ** -power < decay - 1e-12 <= 1 - (1 + n) ** -power
    # float32 cannot resolve one step this close to 1; 2% either side it can.
    schedule = schedules.Warmup(1.0, power=power)
    assert _decay(schedule, round(0.98 * n)) < decay < _decay(schedule, round(1.02 * n))


def test_half_life_halves_the_memory_in_half_life_updates():
    assert _decay(schedules.HalfLife(10), 0) ** 10 == pytest.approx(0.5, abs=1e-6)
    assert _decay(schedules.HalfLife(0.5), 123) == pytest.approx(0.25, rel=1e-6)  # 0.5 ** 2


def _compile(fn):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn), "int64"
    if backend == "jax":
        import jax

        return jax.jit(fn), "int32"
    pytest.skip(f"The {backend} backend does not trace the train step.")


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (schedules.Dynamic(0.99), lambda n: (1 + n) / (10 + n)),
        (schedules.Warmup(0.9999), lambda n: 1 - (1 + n) ** (-2 / 3)),
    ],
    ids=["Dynamic", "Warmup"],
)
def test_decay_changes_inside_a_compiled_step_without_retracing(schedule, expected):
    traces = []

    def train_step(n):
        traces.append(n)
        return schedule(n)

    compiled, int_dtype = _compile(train_step)
    decays = [_decay(compiled, ops.convert_to_tensor(n, int_dtype)) for n in range(6)]
    assert len(traces) == 1
    assert decays == pytest.approx([expected(n) for n in range(6)], rel=1e-6)


@pytest.mark.parametrize(
    "schedule",
    [
        schedules.Constant(np.float32(0.5)),
        schedules.Dynamic(0.999),
        schedules.Warmup(0.9999, inv_gamma=2, power=3 / 4, min_decay=0.1),
        schedules.HalfLife(2.5),
        LinearRamp(0.999, 1000),
    ],
    ids=lambda s: type(s).__name__,
)
def test_config_lists_every_argument_and_round_trips_through_json(schedule):
    arguments = inspect.signature(type(schedule)).parameters
    assert set(schedule.get_config()) == set(arguments)
    config = json.loads(json.dumps(schedules.serialize(schedule)))
    restored = schedules.deserialize(config)
    assert type(restored) is type(schedule)
    assert restored.get_config() == schedule.get_config()
    assert _decay(restored, 37) == _decay(schedule, 37)


def test_user_subclass_from_the_docstring_works():
    schedule = LinearRamp(0.999, 1000)
    assert _decay(schedule, 0) == 0.0
    assert _decay(schedule, 500) == pytest.approx(0.5, rel=1e-7)
    assert _decay(schedule, 5000) == pytest.approx(0.999, rel=1e-7)
    assert repr(schedule) == "LinearRamp(max_decay=0.999, steps=1000)"


def test_subclass_missing_a_method_says_what_to_implement():
    class Incomplete(schedules.DecaySchedule):
        pass

    message = "`Incomplete` must implement `__call__(self, step)`"
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        Incomplete()(0)
    message = "`Incomplete` must implement `get_config(self)`"
    with pytest.raises(NotImplementedError, match=re.escape(message)):
        Incomplete().get_config()


def test_repr_shows_every_argument():
    assert repr(schedules.Warmup(0.9, power=0.75)) == (
        "Warmup(max_decay=0.9, inv_gamma=1.0, power=0.75, min_decay=0.0)"
    )
    assert repr(schedules.HalfLife(100)) == "HalfLife(half_life=100.0)"


def test_get_turns_a_number_into_constant_or_dynamic():
    constant = schedules.get(0.99)
    assert type(constant) is schedules.Constant and constant.decay == 0.99
    dynamic = schedules.get(np.float64(0.99), dynamic=True)
    assert type(dynamic) is schedules.Dynamic and dynamic.max_decay == 0.99
    assert schedules.get(1).get_config() == {"decay": 1.0}


def test_get_returns_schedules_and_functions_as_is():
    warmup = schedules.Warmup(0.999)
    assert schedules.get(warmup) is warmup
    assert schedules.get(warmup, dynamic=True) is warmup
    fn = lambda n: ops.convert_to_tensor(0.5, "float32")  # noqa: E731
    assert schedules.get(fn) is fn


def test_get_deserializes_a_config_dict():
    schedule = schedules.get(schedules.serialize(schedules.Warmup(0.999, power=0.75)))
    assert type(schedule) is schedules.Warmup
    assert schedule.get_config() == {
        "max_decay": 0.999, "inv_gamma": 1.0, "power": 0.75, "min_decay": 0.0
    }


@pytest.mark.parametrize(
    "identifier",
    ["0.99", None, True, [0.99], schedules.Warmup],
    ids=["str", "None", "bool", "list", "class"],
)
def test_get_rejects_what_it_cannot_interpret(identifier):
    with pytest.raises(ValueError, match=re.escape("Could not interpret `average_decay`")):
        schedules.get(identifier)


DECAY_01 = "to be a real number in [0, 1]"
POSITIVE = "to be a finite real number > 0"


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: schedules.Constant(1.5),
            f"`Constant` requires `decay` {DECAY_01}. "
            "Received: decay=1.5. Instead, pass e.g. decay=0.999.",
        ),
        (lambda: schedules.Constant(-0.1), "Received: decay=-0.1"),
        (lambda: schedules.Constant(True), "Received: decay=True"),
        (lambda: schedules.Constant(float("nan")), "Received: decay=nan"),
        (lambda: schedules.Constant("0.99"), "Received: decay='0.99'"),
        (lambda: schedules.Dynamic(1.01), f"`Dynamic` requires `max_decay` {DECAY_01}"),
        (lambda: schedules.Warmup(2.0), f"`Warmup` requires `max_decay` {DECAY_01}"),
        (lambda: schedules.Warmup(0.9, min_decay=-1), f"`Warmup` requires `min_decay` {DECAY_01}"),
        (lambda: schedules.Warmup(0.9, inv_gamma=0), f"`Warmup` requires `inv_gamma` {POSITIVE}"),
        (lambda: schedules.Warmup(0.9, power=-1), f"`Warmup` requires `power` {POSITIVE}"),
        (
            lambda: schedules.Warmup(0.5, min_decay=0.9),
            "`Warmup` requires `min_decay <= max_decay`. Received: min_decay=0.9, max_decay=0.5",
        ),
        (lambda: schedules.HalfLife(0), f"`HalfLife` requires `half_life` {POSITIVE}"),
        (lambda: schedules.HalfLife(float("inf")), "Received: half_life=inf"),
        (lambda: schedules.get(1.5), "`Constant` requires `decay`"),
        (lambda: schedules.get(-1, dynamic=True), "`Dynamic` requires `max_decay`"),
    ],
)
def test_invalid_arguments_raise_a_value_error_that_says_what_was_expected(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


@pytest.mark.skipif(
    _schedule_base.wide_float() != "float64",
    reason="JAX without jax_enable_x64 computes the decays in float32",
)
def test_complements_are_computed_in_float64_on_every_backend():
    # Keras' `ops.minimum` / `ops.maximum` compute two float64 tensors in
    # float32 on torch, and `ops.cast` of a Python number goes through
    # float32 on TensorFlow: Cosine's and Dynamic's complements took their
    # rounding.
    n = np.array([3, 96, 12345, 987654])
    rise = (np.cos(np.pi * np.minimum(n, 10**6) / 10**6) + 1.0) / 2.0
    cosine = schedules.Cosine(0.9, 0.999, steps=10**6)
    dynamic = schedules.Dynamic(0.99999999)
    for i, k in enumerate(n):
        step = keras.ops.convert_to_tensor(int(k), "int64")
        got = float(keras.ops.convert_to_numpy(cosine.complement(step)))
        assert got == pytest.approx((1 - 0.999) + (0.999 - 0.9) * rise[i],
                                    rel=1e-14)
        got = float(keras.ops.convert_to_numpy(dynamic.complement(step)))
        assert got == pytest.approx(max(9.0 / (10.0 + k), 1e-8), rel=1e-14)
