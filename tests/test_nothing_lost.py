"""Nothing is lost: swaps a Ctrl-C cannot cut in half, settings changed
during training, refused steps that change nothing, files that load whole
or not at all."""

import _thread
import random
import signal
import threading
import time
import traceback

import h5py
import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import bits
from conftest import numpy
from conftest import regression_data
from conftest import sync

import keras_ema
from keras_ema import ExponentialMovingAverage
from keras_ema import _atomic


def _model(batchnorm=False, width=8, dtype=None):
    layers = [keras.Input((4,)),
              keras.layers.Dense(width, activation="relu", dtype=dtype)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(dtype=dtype))
    layers.append(keras.layers.Dense(1, dtype=dtype))
    return keras.Sequential(layers)


# -- swaps are all or nothing under KeyboardInterrupt --------------------------


def _distinct_averages(opt, model):
    """Gives every average a value unlike its weight's; returns both."""
    raw = [numpy(v).copy() for v in model.trainable_variables]
    for v, r in zip(model.trainable_variables, raw):
        opt.average(v).assign((r * 0.5 + 1.0).astype(opt.average(v).dtype))
    averages = [numpy(opt.average(v)).copy() for v in model.trainable_variables]
    return raw, averages


def _consistent(opt, model, raw, averages):
    """The state is one of the two a whole number of swaps gives."""
    weights = [numpy(v) for v in model.trainable_variables]
    slots = [numpy(opt.average(v)) for v in model.trainable_variables]
    if opt.averages_swapped_in:
        # The model holds the averages (cast to its dtype); the raw weights
        # wait in the optimizer, bit for bit.
        held = [np.asarray(a).astype(w.dtype) for a, w in zip(averages, raw)]
        expected_slots = averages if raw[0].dtype != averages[0].dtype else raw
    else:
        held, expected_slots = raw, averages
    return all(
        np.array_equal(bits(w), bits(h)) for w, h in zip(weights, held)
    ) and all(
        np.array_equal(bits(s), bits(e)) for s, e in zip(slots, expected_slots)
    )


def _interrupted(action, horizon, rng):
    """Runs `action` in a loop until a timer interrupts the main thread;
    returns whether the interrupt surfaced from inside `action`."""
    # `interrupt_main` does nothing unless Python's own handler takes
    # SIGINT; in the whole suite on JAX and torch, one left another in
    # place by an earlier test (not identified yet): reinstall it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(rng.uniform(0, horizon), _thread.interrupt_main)
    try:
        timer.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            action()
    except KeyboardInterrupt as error:
        frames = traceback.extract_tb(error.__traceback__)
        return any(f.name in ("swap_weights", "assign_average_vars",
                              "averaged_weights", "__enter__", "__exit__")
                   for f in frames[1:])
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGINT, previous)
    pytest.fail("the timer never interrupted the loop")


@pytest.mark.parametrize("layout", ["packed", "unpacked", "float16"])
@pytest.mark.parametrize("action", ["swap_weights", "averaged_weights",
                                    "assign_average_vars"])
def test_an_interrupt_at_any_moment_never_leaves_a_mixed_or_lost_state(
    layout, action
):
    # Many weights, so that a swap takes long enough to be hit inside.
    dtype = "float16" if layout == "float16" else None
    model = keras.Sequential(
        [keras.Input((4,))]
        + [keras.layers.Dense(4, dtype=dtype) for _ in range(40)]
    )
    exclude = None if layout != "unpacked" else []
    opt = ExponentialMovingAverage("sgd", exclude=exclude)
    if layout == "unpacked":
        from keras_ema import _packing

        limit, _packing.WEIGHT_LIMIT = _packing.WEIGHT_LIMIT, 0
    try:
        model.compile(optimizer=opt, loss="mse")
        opt.shadow_copy(model)
    finally:
        if layout == "unpacked":
            _packing.WEIGHT_LIMIT = limit
    raw, averages = _distinct_averages(opt, model)

    def averaged():
        with opt.averaged_weights():
            pass

    def reset():
        # Under the library's own deferral: only the assignment under test
        # can be cut.
        with _atomic.deferred_signals():
            for v, r in zip(model.trainable_variables, raw):
                v.assign(r)

    def assign_then_reset():
        opt.assign_average_vars(model.trainable_variables)
        reset()

    run = {"swap_weights": opt.swap_weights, "averaged_weights": averaged,
           "assign_average_vars": assign_then_reset}[action]
    run()  # warm up: the first swap compiles its ops on JAX
    start = time.perf_counter()
    run()
    horizon = 3 * (time.perf_counter() - start)
    rng = random.Random(0)
    inside, bad = 0, 0
    # Twelve interrupts: nearly all land inside (59-60 of 60 measured on
    # torch), so a cut state would show. (More cost CI minutes: each try
    # runs a whole swap.)
    for _ in range(12):
        inside += _interrupted(run, horizon, rng)
        if action == "assign_average_vars":
            weights = [numpy(v) for v in model.trainable_variables]
            assigned = [a.astype(r.dtype) for a, r in zip(averages, raw)]
            bad += not (
                all(np.array_equal(bits(w), bits(r)) for w, r in zip(weights, raw))
                or all(np.array_equal(bits(w), bits(a))
                       for w, a in zip(weights, assigned))
            )
            reset()
        else:
            bad += not _consistent(opt, model, raw, averages)
        if action == "averaged_weights":
            bad += opt.averages_swapped_in
    assert bad == 0
    assert inside >= 5, inside


# -- settings changed after construction -------------------------------------


class CountingTraces(keras.Sequential):
    """Counts how often its train step runs in Python: once per trace on
    TensorFlow and JAX, once per step on torch."""

    traces = 0

    def train_step(self, *args):
        type(self).traces += 1
        return super().train_step(*args)


def test_a_decay_set_from_a_callback_takes_effect_without_retracing():
    model = CountingTraces(_model().layers)
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.05),
                                   average_decay=0.9, dynamic_decay=False)
    model.compile(optimizer=opt, loss="mse")
    kernel = model.trainable_variables[0]

    def set_decay(epoch, logs):
        if epoch == 1:
            opt.average_decay = 0.0

    x, y = regression_data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    gap = np.abs(numpy(opt.average(kernel)) - numpy(kernel)).max()
    assert gap > 1e-3
    traces = CountingTraces.traces
    model.fit(x, y, batch_size=16, epochs=2, initial_epoch=0, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(
                  on_epoch_begin=set_decay)])
    sync(model)
    # Decay 0 from epoch 1 on: each average follows its weight.
    np.testing.assert_allclose(numpy(opt.average(kernel)), numpy(kernel),
                               rtol=1e-6, atol=1e-7)
    assert opt.get_config()["average_decay"] == 0.0
    if BACKEND != "torch":
        assert CountingTraces.traces == traces


def test_a_changed_decay_is_saved_and_a_resumed_run_matches_bit_for_bit(
    tmp_path,
):
    def make():
        model = _model()
        opt = ExponentialMovingAverage(keras.optimizers.Adam(1e-2),
                                       average_decay=0.5, dynamic_decay=False)
        model.compile(optimizer=opt, loss="mse")
        return model, opt

    keras.utils.set_random_seed(3)
    model, opt = make()
    x, y = regression_data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    opt.average_decay = 0.9999
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.optimizer.average_decay == 0.9999
    for m in (model, loaded):
        m.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False)
    for a, b in zip(model.trainable_variables, loaded.trainable_variables):
        np.testing.assert_array_equal(bits(opt.average(a)),
                                      bits(loaded.optimizer.average(b)))


@pytest.mark.parametrize("name, value", [
    ("start_step", 3), ("update_every", 2), ("dynamic_decay", False),
    ("trainable_weights_only", False), ("average_dtype", "float16"),
    ("exclude", ["bias"]),
])
def test_settings_the_step_reads_once_refuse_to_change_once_built(name, value):
    model = _model()
    opt = ExponentialMovingAverage("sgd")
    setattr(opt, name, value)  # before the averages exist: fine
    assert getattr(opt, name) is not None
    fresh = ExponentialMovingAverage("sgd")
    model.compile(optimizer=fresh, loss="mse")
    model.fit(*regression_data(16), verbose=0)
    before = fresh.get_config()
    with pytest.raises(ValueError, match=f"does not support changing `{name}`"):
        setattr(fresh, name, value)
    assert fresh.get_config() == before


def test_a_schedule_of_another_rule_set_after_training_started_raises():
    model = _model()
    opt = ExponentialMovingAverage("sgd")
    model.compile(optimizer=opt, loss="mse")
    model.fit(*regression_data(16), verbose=0)
    with pytest.raises(ValueError, match="replacing the decay rule"):
        opt.average_decay = keras_ema.schedules.Warmup(0.999)
    assert opt.average_decay == 0.99


def test_a_schedule_replaced_by_one_of_its_class_takes_effect_and_is_saved(
    tmp_path,
):
    model = CountingTraces(_model().layers)
    opt = ExponentialMovingAverage(
        keras.optimizers.SGD(0.05),
        average_decay=keras_ema.schedules.Constant(0.9),
    )
    model.compile(optimizer=opt, loss="mse")
    x, y = regression_data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    kernel = model.trainable_variables[0]
    assert np.abs(numpy(opt.average(kernel)) - numpy(kernel)).max() > 1e-3
    traces = CountingTraces.traces
    opt.average_decay = keras_ema.schedules.Constant(0.0)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    sync(model)
    np.testing.assert_allclose(numpy(opt.average(kernel)), numpy(kernel),
                               rtol=1e-6, atol=1e-7)
    if BACKEND != "torch":
        assert CountingTraces.traces == traces
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(
        tmp_path / "m.keras", custom_objects={"CountingTraces": CountingTraces}
    )
    assert loaded.optimizer.average_decay.decay == 0.0
    assert float(numpy(loaded.optimizer._ema_state.schedule_values["decay"])) == 0.0


def test_start_step_set_before_compile_takes_effect():
    model = _model()
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.1))
    opt.start_step = 2
    model.compile(optimizer=opt, loss="mse")
    x, y = regression_data(16)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # two copying steps
    sync(model)
    kernel = model.trainable_variables[0]
    np.testing.assert_array_equal(bits(opt.average(kernel)), bits(kernel))


# -- a refused step changes nothing ------------------------------------------


def test_a_step_refused_on_swapped_in_averages_changes_nothing():
    model = _model(batchnorm=True)
    opt = ExponentialMovingAverage(keras.optimizers.Adam(1e-2))
    model.compile(optimizer=opt, loss="mse")
    # The guarantee covers the model the optimizer was told: the forward
    # pass of a model it does not know runs before any optimizer code.
    opt.shadow_copy(model)
    x, y = regression_data()
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    sync(model)
    opt.swap_weights()
    before = [numpy(v).copy() for v in model.variables + opt.variables]
    iterations = int(numpy(opt.iterations))
    if BACKEND == "jax":
        # An exception inside JAX's step would lose the state: the steps
        # change nothing, and `fit` says so at its end.
        with pytest.warns(UserWarning, match="changed nothing"):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    else:
        with pytest.raises(Exception, match="cannot train while the averages"):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    sync(model)
    after = [numpy(v) for v in model.variables + opt.variables]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(bits(a), bits(b))
    assert int(numpy(opt.iterations)) == iterations


# -- files load whole or not at all ------------------------------------------


def test_a_file_with_other_averages_is_refused_before_anything_is_written(
    tmp_path,
):
    model = _model()
    opt = ExponentialMovingAverage(keras.optimizers.Adam(1e-2),
                                   exclude=["bias"])
    model.compile(optimizer=opt, loss="mse")
    model.fit(*regression_data(), verbose=0)
    model.save_weights(tmp_path / "m.weights.h5")
    other = _model()
    other_opt = ExponentialMovingAverage(keras.optimizers.Adam(1e-2))
    other.compile(optimizer=other_opt, loss="mse")
    other.fit(*regression_data(seed=1), verbose=0)
    sync(other)
    before = [numpy(v).copy() for v in other_opt.variables]
    before_averages = [numpy(other_opt.average(v)).copy()
                       for v in other.trainable_variables]
    with pytest.raises(ValueError, match="exclude=\\['bias'\\]"):
        other.load_weights(tmp_path / "m.weights.h5")
    for b, v in zip(before, other_opt.variables):
        np.testing.assert_array_equal(bits(v), bits(b))
    for b, v in zip(before_averages, other.trainable_variables):
        np.testing.assert_array_equal(bits(other_opt.average(v)), bits(b))


def test_each_variable_is_stored_once_in_a_file(tmp_path):
    model = _model()
    opt = ExponentialMovingAverage(keras.optimizers.Adam(1e-2))
    model.compile(optimizer=opt, loss="mse")
    model.fit(*regression_data(), verbose=0)
    model.save_weights(tmp_path / "m.weights.h5")
    stored = []
    with h5py.File(tmp_path / "m.weights.h5") as f:
        f.visititems(lambda name, obj: stored.append(obj.size)
                     if isinstance(obj, h5py.Dataset) and
                     not name.endswith("layout") else None)
    params = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    inner = sum(int(np.prod(v.shape)) for v in opt.inner_optimizer.variables)
    # Weights, Adam's state, the averages, and a few scalars: once each.
    assert sum(stored) == params + inner + params + 5


def test_loaded_values_wait_for_build_when_averages_are_asked_first(tmp_path):
    # Asking for an average after `load_weights` into an unbuilt optimizer
    # raised a layout error, and dropped the loaded averages and Adam's state.
    model = _model()
    opt = ExponentialMovingAverage(keras.optimizers.Adam(1e-2))
    model.compile(optimizer=opt, loss="mse")
    model.fit(*regression_data(), batch_size=16, verbose=0)
    sync(model)
    model.save_weights(tmp_path / "m.weights.h5")
    other = _model()
    other_opt = ExponentialMovingAverage(keras.optimizers.Adam(1e-2))
    other.compile(optimizer=other_opt, loss="mse")
    other.load_weights(tmp_path / "m.weights.h5")
    assert other_opt.average(other.trainable_variables[0]) is None
    other_opt.shadow_copy(other)
    assert int(numpy(other_opt.iterations)) == int(numpy(opt.iterations)) == 4
    for v, w in zip(model.trainable_variables, other.trainable_variables):
        np.testing.assert_array_equal(bits(opt.average(v)),
                                      bits(other_opt.average(w)))
    for v, w in zip(opt.inner_optimizer.variables,
                    other_opt.inner_optimizer.variables):
        np.testing.assert_array_equal(bits(v), bits(w))
