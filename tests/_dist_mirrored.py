"""keras-ema under `tf.distribute.MirroredStrategy` over two logical CPUs.

Run by `tests/test_distribute.py` in a fresh process, because the logical
devices must be configured before TensorFlow initialises its devices:

    python tests/_dist_mirrored.py OUT.json [SCENARIO ...]

Each scenario trains a tiny model and returns the facts it measured (bits
compared, differences, step counts, devices); the tests assert on them. A
scenario that raises records its traceback instead, so one failure does not
hide the others.
"""

import contextlib
import json
import os
import sys
import time
import traceback

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402
from keras_ema import _packing  # noqa: E402

STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
DECAY = 0.9
BATCH = 16  # global batch: 8 per replica
RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 4)).astype("float32")
Y = (X @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")
X_VAL, Y_VAL = X[:32] + 0.5, Y[:32]
FIT = dict(batch_size=BATCH, shuffle=False, verbose=0)
STEPS = len(X) // BATCH
WORKDIR = "."  # main() sets it to the folder of its output file


# -- helpers ------------------------------------------------------------------


def make(batchnorm=False, strategy=STRATEGY, compile=True, **kwargs):
    """Model and optimizer created in the strategy's scope: nothing else."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        layers = [keras.Input((4,)), keras.layers.Dense(8, activation="relu")]
        if batchnorm:
            layers.append(keras.layers.BatchNormalization())
        layers.append(keras.layers.Dense(1))
        model = keras.Sequential(layers)
        opt = keras_ema.ExponentialMovingAverage(
            keras.optimizers.SGD(0.05), average_decay=DECAY, **kwargs
        )
        if compile:
            model.compile(optimizer=opt, loss="mse")
    return model, opt


def storage(opt, weight):
    """The variable that holds `weight`'s average: its own, or its pack's."""
    average = opt.average(weight)
    if isinstance(average, _packing.PackedAverage):
        return average.pack.buffer
    return average


def replicas(variable):
    """The per-device values of a (Keras) variable, as numpy arrays."""
    if isinstance(variable, _packing.PackedAverage):
        # A packed average: its slice of each replica of the pack.
        return [
            np.array(variable.pack.part(r, variable.index))
            for r in replicas(variable.pack.buffer)
        ]
    value = getattr(variable, "value", variable)
    return [
        np.array(t.numpy()) for t in STRATEGY.experimental_local_results(value)
    ]


def bits(array):
    array = np.asarray(array)
    return array.view(f"uint{array.dtype.itemsize * 8}")


def same_bits(a, b):
    return len(a) == len(b) and all(
        np.array_equal(bits(x), bits(y)) for x, y in zip(a, b)
    )


def snapshot(model, opt, variables=None):
    """{"w": per weight, per replica values; "a": same for the averages}."""
    variables = model.trainable_variables if variables is None else variables
    return {
        "w": [replicas(v) for v in variables],
        "a": [replicas(opt.average(v)) for v in variables],
    }


def identical_across_replicas(snap):
    return all(
        all(np.array_equal(bits(r[0]), bits(o)) for o in r[1:])
        for group in snap.values()
        for r in group
    )


def equal(group_a, group_b):
    """Per variable, per replica: same bits."""
    return len(group_a) == len(group_b) and all(
        same_bits(x, y) for x, y in zip(group_a, group_b)
    )


def swap_facts(before, after, model, opt):
    """What a swap did, against the state `before` it."""
    return {
        "weights_are_old_averages": equal(after["w"], before["a"]),
        "averages_are_old_weights": equal(after["a"], before["w"]),
        "identical_across_replicas": identical_across_replicas(after),
        "averages_swapped_in": opt.averages_swapped_in,
    }


def in_scope(enter):
    return STRATEGY.scope() if enter else contextlib.nullcontext()


def numpy_ema(recorded, decay=DECAY):
    """The documented EMA of the recorded weights (dynamic decay)."""
    averages = [np.array(w, "float32") for w in recorded[0]]
    for n, weights in enumerate(recorded[1:]):
        factor = np.float32(1.0) - np.float32(min(decay, (1 + n) / (10 + n)))
        averages = [a - factor * (a - w) for a, w in zip(averages, weights)]
    return averages


def max_diff(xs, ys):
    return max(
        float(np.max(np.abs(np.asarray(x, "float64") - np.asarray(y))))
        for x, y in zip(xs, ys)
    )


class Recorder(keras.callbacks.Callback):
    """Weights (first replica) at the start and after every batch."""

    def __init__(self, opt=None):
        super().__init__()
        self.opt = opt
        self.weights = []
        self.last = None

    def on_train_begin(self, logs=None):
        self.weights = [[w.numpy() for w in self.model.trainable_weights]]

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([w.numpy() for w in self.model.trainable_weights])
        if self.opt is not None:
            # Per replica, right before validation runs at an epoch's end.
            self.last = snapshot(self.model, self.opt)


def step_per_replica(opt):
    return [int(v) for v in replicas(_state(opt, "average_step"))]


def _state(opt, name):
    (variable,) = [v for v in opt.variables if v.name == name]
    return variable


def single_device_run(initial, **kwargs):
    """The same training without a strategy, from the same weights."""
    model, opt = make(strategy=tf.distribute.get_strategy(), **kwargs)
    model.set_weights(initial)
    model.fit(X, Y, **FIT)
    return model, opt


def distributed_step_fn(model, opt):
    """A custom training step: `strategy.run` calling `apply_gradients`."""

    @tf.function
    def step(x, y):
        def replica_step(x, y):
            with tf.GradientTape() as tape:
                error = model(x, training=True) - y
                # Mean over the global batch: the replicas' gradients sum.
                loss = tf.reduce_sum(tf.square(error)) / BATCH
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))

        STRATEGY.run(replica_step, args=(x, y))

    return step


def distributed_dataset():
    data = tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH)
    return STRATEGY.experimental_distribute_dataset(data)


# -- scenarios ----------------------------------------------------------------


def placement():
    """Averages are mirrored variables colocated with their weights."""
    model, opt = make()
    model.fit(X, Y, **FIT)
    facts = []
    for w in model.trainable_variables:
        a = storage(opt, w)
        facts.append({
            "path": w.path,
            "packed": isinstance(opt.average(w), _packing.PackedAverage),
            "weight_type": type(w.value).__name__,
            "average_type": type(a.value).__name__,
            "average_is_distributed": isinstance(
                a.value, tf.distribute.DistributedValues
            ),
            "weight_devices": [c.device for c in w.value.values],
            "average_devices": [c.device for c in a.value.values],
        })
    state = {
        name: {
            "type": type(_state(opt, name).value).__name__,
            "devices": [c.device for c in _state(opt, name).value.values],
        }
        for name in ("average_step", "averages_swapped_in")
    }
    return {
        "averages": facts,
        "state": state,
        "replicas": STRATEGY.num_replicas_in_sync,
    }


def _fit_against_references(**kwargs):
    model, opt = make(**kwargs)
    initial = model.get_weights()
    recorder = Recorder()
    model.fit(X, Y, callbacks=[recorder], **FIT)
    snap = snapshot(model, opt)
    averages = [r[0] for r in snap["a"]]
    weights = [r[0] for r in snap["w"]]
    ref_model, ref_opt = single_device_run(initial, **kwargs)
    ref_averages = [
        np.asarray(ref_opt.average(v)) for v in ref_model.trainable_variables
    ]
    return {
        "steps_run": len(recorder.weights) - 1,
        "step_per_replica": step_per_replica(opt),
        "iterations": int(opt.iterations.numpy()),
        "reference_step": int(_state(ref_opt, "average_step").numpy()),
        "identical_across_replicas": identical_across_replicas(snap),
        "max_diff_to_numpy_ema": max_diff(
            averages, numpy_ema(recorder.weights)
        ),
        "max_diff_to_single_device_averages": max_diff(averages, ref_averages),
        "max_diff_to_single_device_weights": max_diff(
            weights, ref_model.get_weights()
        ),
        "min_average_to_weight_distance": min(
            float(np.max(np.abs(a - w))) for a, w in zip(averages, weights)
        ),
    }


def fit():
    return _fit_against_references()


def fit_start_step_update_every():
    facts = _fit_against_references(start_step=1, update_every=2)
    facts.pop("max_diff_to_numpy_ema")  # the numpy reference is the default
    return facts


def round_trip_facts(model, opt, swap):
    """Swaps in and back with `swap`: what each side held, on every replica."""
    raw = snapshot(model, opt)
    swap()
    facts = swap_facts(raw, snapshot(model, opt), model, opt)
    swap()
    back = snapshot(model, opt)
    facts["back_bit_for_bit"] = equal(back["w"], raw["w"]) and equal(
        back["a"], raw["a"]
    )
    facts["swapped_in_after_back"] = opt.averages_swapped_in
    return facts


def swap_cross_replica():
    """Eagerly, eagerly inside the scope, and in a `tf.function`."""
    model, opt = make()
    model.fit(X, Y, **FIT)
    facts = {}
    swaps = {
        "eager": opt.swap_weights,
        "eager_in_scope": opt.swap_weights,
        "tf_function": tf.function(opt.swap_weights),
    }
    for mode, swap in swaps.items():
        with in_scope(mode == "eager_in_scope"):
            facts[mode] = round_trip_facts(model, opt, swap)
    return facts


def swap_in_replica_context():
    """`strategy.run(opt.swap_weights)`, traced and eager."""
    model, opt = make()
    model.fit(X, Y, **FIT)
    traced = tf.function(lambda: STRATEGY.run(opt.swap_weights))
    facts = {}
    for mode, swap in {
        "tf_function": traced,
        "eager": lambda: STRATEGY.run(opt.swap_weights),
    }.items():
        facts[mode] = round_trip_facts(model, opt, swap)
    return facts


def eager_replica_swap_then_train():
    """After an eager `strategy.run(swap_weights)`, training must refuse."""
    model, opt = make()
    model.fit(X, Y, **FIT)
    STRATEGY.run(opt.swap_weights)
    before = snapshot(model, opt)
    step = step_per_replica(opt)
    grads = [tf.ones_like(v.value) for v in model.trainable_variables]
    error = None
    try:
        STRATEGY.run(lambda: opt.apply(grads, model.trainable_variables))
    except Exception as e:  # noqa: BLE001 - the type is the fact
        error = f"{type(e).__name__}: {e}"
    after = snapshot(model, opt)
    return {
        "error": error,
        "weights_unchanged": equal(after["w"], before["w"]),
        "averages_unchanged": equal(after["a"], before["a"]),
        "step_unchanged": step_per_replica(opt) == step,
    }


def assign_average_vars():
    """Eagerly, inside the scope, and from an eager `strategy.run`."""
    model, opt = make()
    model.fit(X, Y, **FIT)
    raw = [w.numpy() for w in model.trainable_variables]
    facts = {}
    for mode in ("eager", "in_scope", "eager_strategy_run"):
        before = snapshot(model, opt)
        variables = model.trainable_variables
        if mode == "eager":
            opt.assign_average_vars(variables)
        elif mode == "in_scope":
            with STRATEGY.scope():
                opt.assign_average_vars(variables)
        else:
            STRATEGY.run(opt.assign_average_vars, args=(variables,))
        after = snapshot(model, opt)
        facts[mode] = {
            "weights_are_averages": equal(after["w"], before["a"]),
            "averages_unchanged": equal(after["a"], before["a"]),
            "identical_across_replicas": identical_across_replicas(after),
        }
        for w, value in zip(model.trainable_variables, raw):
            w.assign(value)  # cross-replica: every replica
    return facts


def assign_average_vars_in_replica_fn():
    """`strategy.run(opt.assign_average_vars)` inside a `tf.function`."""
    model, opt = make()
    model.fit(X, Y, **FIT)
    before = snapshot(model, opt)
    variables = model.trainable_variables
    tf.function(
        lambda: STRATEGY.run(opt.assign_average_vars, args=(variables,))
    )()
    after = snapshot(model, opt)
    return {
        "weights_are_averages": equal(after["w"], before["a"]),
        "averages_unchanged": equal(after["a"], before["a"]),
        "identical_across_replicas": identical_across_replicas(after),
    }


def averaged_weights():
    """Inside and outside the scope; and a block that raises."""
    model, opt = make()
    model.fit(X, Y, **FIT)
    facts = {}
    for mode in ("outside_scope", "in_scope", "raising"):
        raw = snapshot(model, opt)
        scope = in_scope(mode == "in_scope")
        inside = None
        try:
            with scope, opt.averaged_weights():
                inside = swap_facts(raw, snapshot(model, opt), model, opt)
                if mode == "raising":
                    raise KeyError("inside the block")
        except KeyError:
            pass
        back = snapshot(model, opt)
        facts[mode] = {
            **inside,
            "back_bit_for_bit": equal(back["w"], raw["w"])
            and equal(back["a"], raw["a"]),
            "swapped_in_after": opt.averages_swapped_in,
        }
    return facts


def callbacks():
    """`SwapAverageWeights` + `AverageModelCheckpoint` in a fit, outside and
    inside `strategy.scope()`."""
    facts = {}
    for mode in ("outside_scope", "in_scope"):
        model, opt = make()
        recorder = Recorder(opt)
        path = os.path.join(WORKDIR, f"ema_{mode}.weights.h5")
        cbs = [
            recorder,
            keras_ema.SwapAverageWeights(log_raw_metrics=True),
            keras_ema.AverageModelCheckpoint(path, save_weights_only=True),
        ]
        scope = in_scope(mode == "in_scope")
        with scope:
            history = model.fit(
                X, Y, epochs=2, validation_data=(X_VAL, Y_VAL),
                callbacks=cbs, **FIT,
            ).history
        after = snapshot(model, opt)
        swapped_in_after_fit = opt.averages_swapped_in
        raw_loss = model.evaluate(X_VAL, Y_VAL, verbose=0)
        with opt.averaged_weights():
            average_loss = model.evaluate(X_VAL, Y_VAL, verbose=0)
        saved, _ = make(strategy=tf.distribute.get_strategy(), compile=False)
        saved.load_weights(path)
        facts[mode] = {
            "val_loss": history["val_loss"],
            "val_raw_loss": history["val_raw_loss"],
            "evaluate_on_averages": float(average_loss),
            "evaluate_on_raw": float(raw_loss),
            "raw_back_bit_for_bit": equal(after["w"], recorder.last["w"]),
            "averages_unchanged": equal(after["a"], recorder.last["a"]),
            "identical_across_replicas": identical_across_replicas(after),
            "swapped_in_after_fit": swapped_in_after_fit,
            "checkpoint_holds_averages": all(
                np.array_equal(bits(np.asarray(v)), bits(a[0]))
                for v, a in zip(saved.trainable_variables, after["a"])
            ),
        }
    return facts


def custom_loop():
    """`strategy.run` calling `opt.apply_gradients` in a `tf.function`."""
    model, opt = make(compile=False)
    with STRATEGY.scope():
        # As for any Keras optimizer: built in the scope before the loop.
        opt.build(model.trainable_variables)
    step = distributed_step_fn(model, opt)
    recorded = [[w.numpy() for w in model.trainable_weights]]
    for x, y in distributed_dataset():
        step(x, y)
        recorded.append([w.numpy() for w in model.trainable_weights])
    snap = snapshot(model, opt)
    averages = [r[0] for r in snap["a"]]
    tf.function(lambda: STRATEGY.run(opt.swap_weights))()
    swapped = swap_facts(snap, snapshot(model, opt), model, opt)
    return {
        "steps_run": len(recorded) - 1,
        "step_per_replica": step_per_replica(opt),
        "iterations": int(opt.iterations.numpy()),
        "identical_across_replicas": identical_across_replicas(snap),
        "max_diff_to_numpy_ema": max_diff(averages, numpy_ema(recorded)),
        "swap_in_loop": swapped,
    }


def _batchnorm_facts(model, opt):
    stats = [v for v in model.non_trainable_variables]
    averages = [opt.average(v) for v in stats]
    raw = snapshot(model, opt, stats)
    opt.swap_weights()
    swapped = snapshot(model, opt, stats)
    opt.swap_weights()
    back = snapshot(model, opt, stats)
    return {
        "paths": [v.path for v in stats],
        "average_types": [type(a.value).__name__ for a in averages],
        "colocated": all(
            [c.device for c in a.value.values]
            == [c.device for c in v.value.values]
            for a, v in zip(averages, stats)
        ),
        # Keras keeps BatchNorm statistics per replica, unsynchronised;
        # each replica's average follows its own statistics.
        "statistics_differ_across_replicas": not identical_across_replicas(
            {"w": raw["w"]}
        ),
        "per_replica_exact_swap": equal(swapped["w"], raw["a"])
        and equal(swapped["a"], raw["w"]),
        "back_bit_for_bit": equal(back["w"], raw["w"])
        and equal(back["a"], raw["a"]),
        "trainable_identical_across_replicas": identical_across_replicas(
            snapshot(model, opt)
        ),
        **state_facts(opt),
    }


def state_facts(opt):
    """The step counter and swap flag: one mirrored value on every replica."""
    return {
        "state_types": [
            type(_state(opt, n).value).__name__
            for n in ("average_step", "averages_swapped_in")
        ],
        "step_per_replica": step_per_replica(opt),
    }


def non_trainable_shadow_copy_in_scope():
    model, opt = make(batchnorm=True, trainable_weights_only=False)
    with STRATEGY.scope():
        opt.shadow_copy(model)
    model.fit(X, Y, **FIT)
    return _batchnorm_facts(model, opt)


def shadow_copy_outside_scope():
    """`shadow_copy(model)` as the README says (after compile), and the
    callback that calls it in `on_train_begin`, both outside the scope."""
    model, opt = make()
    opt.shadow_copy(model)
    recorder = Recorder()
    model.fit(X, Y, callbacks=[recorder], **FIT)
    snap = snapshot(model, opt)
    trainable_only = {
        "identical_across_replicas": identical_across_replicas(snap),
        "max_diff_to_numpy_ema": max_diff(
            [r[0] for r in snap["a"]], numpy_ema(recorder.weights)
        ),
        "average_types": [
            type(storage(opt, v).value).__name__
            for v in model.trainable_variables
        ],
        **state_facts(opt),
    }
    model, opt = make(batchnorm=True, trainable_weights_only=False)
    opt.shadow_copy(model)
    model.fit(X, Y, **FIT)
    explicit = _batchnorm_facts(model, opt)
    model, opt = make(batchnorm=True, trainable_weights_only=False)
    model.fit(
        X, Y, validation_data=(X_VAL, Y_VAL),
        callbacks=[keras_ema.SwapAverageWeights()], **FIT,
    )
    return {
        "trainable_only": trainable_only,
        "explicit": explicit,
        "callback": _batchnorm_facts(model, opt),
    }


def low_precision():
    """bfloat16 weights: float32 averages plus a raw backup, per replica."""
    keras.mixed_precision.set_dtype_policy("bfloat16")
    try:
        model, opt = make()
        model.fit(X, Y, **FIT)
        w = model.trainable_variables[0]
        raw = snapshot(model, opt)
        opt.swap_weights()
        swapped = snapshot(model, opt)
        opt.swap_weights()
        back = snapshot(model, opt)
        rounded = [
            [np.asarray(r.astype(w.value.dtype.as_numpy_dtype)) for r in a]
            for a in raw["a"]
        ]
        return {
            "weight_dtype": str(w.dtype),
            "average_dtype": str(opt.average(w).dtype),
            "average_type": type(storage(opt, w).value).__name__,
            "weights_are_rounded_averages": equal(swapped["w"], rounded),
            "averages_untouched_while_swapped": equal(swapped["a"], raw["a"]),
            "identical_across_replicas": identical_across_replicas(swapped),
            "back_bit_for_bit": equal(back["w"], raw["w"])
            and equal(back["a"], raw["a"]),
        }
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


SCENARIOS = {
    f.__name__: f
    for f in (
        placement,
        fit,
        fit_start_step_update_every,
        swap_cross_replica,
        swap_in_replica_context,
        eager_replica_swap_then_train,
        assign_average_vars,
        assign_average_vars_in_replica_fn,
        averaged_weights,
        callbacks,
        custom_loop,
        non_trainable_shadow_copy_in_scope,
        shadow_copy_outside_scope,
        low_precision,
    )
}


# -- one step from `strategy.run`: a gradient from outside, an unbuilt
# optimizer (issue "Everyday Keras code", point 6) ----------------------------

LR = 0.1
G = np.array([1.0, 2.0, 3.0], "float32")
W0 = np.array([1.0, -1.0, 0.5], "float32")


def _gradient(kind):
    """A function that each replica calls for its gradient of `kind`.

    "captured": one tensor made before the step, outside `strategy.run`, the
    same object on every replica: Keras' optimizers apply it once.
    "per_replica": made in each replica, `G * (1 + replica_id)`: Keras'
    optimizers apply their sum, `3 * G`.
    """
    if kind == "captured":
        captured = tf.constant(G)
        return lambda: captured
    return lambda: tf.constant(G) * tf.cast(
        1 + tf.distribute.get_replica_context().replica_id_in_sync_group,
        "float32",
    )


def _inner(name):
    if name == "adam":
        return keras.optimizers.Adam(LR)
    return keras.optimizers.SGD(LR)


def _one_step(opt, variable, gradient, mode):
    """`strategy.run(opt.apply)` once, eagerly or in a `tf.function`."""

    def step():
        STRATEGY.run(lambda: opt.apply([gradient()], [variable]))

    (tf.function(step) if mode == "tf_function" else step)()
    return [r.tolist() for r in replicas(variable)]


def _step_against_reference(inner, kind, mode, build):
    """One step of the wrapper and of its inner optimizer alone (built in
    the scope, as Keras documents), from the same weight and gradient."""
    results = {}
    for who in ("reference", "ema"):
        with STRATEGY.scope():
            variable = keras.Variable(W0, name="w")
            opt = _inner(inner)
            if who == "ema":
                opt = keras_ema.ExponentialMovingAverage(opt)
            if who == "reference" or build:
                opt.build([variable])
        results[who] = _one_step(opt, variable, _gradient(kind), mode)
        if who == "ema":
            average = opt.average(variable)
            results["average"] = [r.tolist() for r in replicas(average)]
            results["average_type"] = type(storage(opt, variable).value).__name__
            results["state_types"] = state_facts(opt)["state_types"]
            results["step_per_replica"] = step_per_replica(opt)
    return results


def _each_case(cases, build):
    """The facts of each `(inner, kind, mode)`, or the error it raised."""
    facts = {}
    for inner, kind, mode in cases:
        try:
            facts[f"{inner}/{kind}/{mode}"] = _step_against_reference(
                inner, kind, mode, build
            )
        except Exception:  # noqa: BLE001 - reported to the test
            facts[f"{inner}/{kind}/{mode}"] = {
                "error": traceback.format_exc()
            }
    return facts


def gradient_from_outside_strategy_run():
    """A built wrapper: the gradient applied as its inner SGD applies it."""
    return _each_case(
        [("sgd", kind, mode)
         for kind in ("captured", "per_replica")
         for mode in ("eager", "tf_function")],
        build=True,
    )


def unbuilt_in_strategy_run():
    """The first `strategy.run` step builds the wrapper, as `apply` does."""
    return _each_case(
        [(inner, kind, mode)
         for inner in ("sgd", "adam")
         for kind in ("captured", "per_replica")
         for mode in ("eager", "tf_function")],
        build=False,
    )


SCENARIOS.update(
    (f.__name__, f)
    for f in (gradient_from_outside_strategy_run, unbuilt_in_strategy_run)
)


def _jsonable(value):
    if isinstance(value, (np.bool_,)):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON: {value!r}")


def main(out, names):
    global WORKDIR
    WORKDIR = os.path.dirname(os.path.abspath(out))
    results = {}
    for name in names or SCENARIOS:
        start = time.perf_counter()
        try:
            results[name] = {"facts": SCENARIOS[name]()}
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = {"error": traceback.format_exc()}
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
        keras.backend.clear_session()
    with open(out, "w") as f:
        json.dump(results, f, default=_jsonable, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
