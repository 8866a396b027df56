"""keras-ema under Keras' JAX distribution API over two host devices.

Run by `tests/test_distribute.py` in a fresh process, because JAX reads
`XLA_FLAGS=--xla_force_host_platform_device_count=2` when it starts:

    python tests/_dist_jax.py OUT.json [SCENARIO ...]

Each scenario returns the facts it measured (shardings, bits compared,
differences to a single-device run); the tests assert on them.
"""

import json
import os
import sys
import time
import traceback

os.environ["KERAS_BACKEND"] = "jax"
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""),
    "--xla_force_host_platform_device_count=2",
]).strip()

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402

DECAY = 0.9
BATCH = 16
RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 4)).astype("float32")
Y = (X @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")
X_VAL, Y_VAL = X[:32] + 0.5, Y[:32]
FIT = dict(batch_size=BATCH, shuffle=False, verbose=0)


def make(batchnorm=False, **kwargs):
    """Created under the distribution set with `set_distribution`."""
    keras.utils.set_random_seed(0)
    layers = [
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu", name="hidden"),
    ]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(name="norm"))
    layers.append(keras.layers.Dense(1, name="out"))
    model = keras.Sequential(layers, name="net")
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=DECAY, **kwargs
    )
    model.compile(optimizer=opt, loss="mse")
    return model, opt


def bits(array):
    array = np.asarray(array)
    return array.view(f"uint{array.dtype.itemsize * 8}")


def values(variables):
    return [np.asarray(v.value) for v in variables]


def equal(xs, ys):
    return len(xs) == len(ys) and all(
        np.array_equal(bits(x), bits(y)) for x, y in zip(xs, ys)
    )


def max_diff(xs, ys):
    return max(
        float(np.max(np.abs(np.asarray(x, "float64") - np.asarray(y))))
        for x, y in zip(xs, ys)
    )


def sharding_facts(model, opt, variables=None):
    variables = model.trainable_variables if variables is None else variables
    facts = []
    for w in variables:
        a = opt.average(w)
        facts.append({
            "path": w.path,
            "weight_spec": str(w.value.sharding.spec),
            "average_spec": str(a.value.sharding.spec),
            "same_sharding": a.value.sharding == w.value.sharding,
            "weight_devices": sorted(
                d.id for d in w.value.sharding.device_set
            ),
            "average_devices": sorted(
                d.id for d in a.value.sharding.device_set
            ),
            "average_shard_shapes": sorted(
                tuple(s.data.shape) for s in a.value.addressable_shards
            ),
            "weight_shard_shapes": sorted(
                tuple(s.data.shape) for s in w.value.addressable_shards
            ),
        })
    return facts


def step_of(opt):
    (step,) = [v for v in opt.variables if v.name == "average_step"]
    return int(np.asarray(step.value))


def single_device_reference(initial, **kwargs):
    keras.distribution.set_distribution(None)
    model, opt = make(**kwargs)
    model.set_weights(initial)
    model.fit(X, Y, **FIT)
    return model, opt


def swap_facts(model, opt, variables=None):
    """One swap and back: exact, and the shardings stay."""
    variables = model.trainable_variables if variables is None else variables
    averages = [opt.average(v) for v in variables]
    raw_w, raw_a = values(variables), values(averages)
    before = [v.value.sharding for v in variables + averages]
    opt.swap_weights()
    swapped_w, swapped_a = values(variables), values(averages)
    during = [v.value.sharding for v in variables + averages]
    opt.swap_weights()
    after = [v.value.sharding for v in variables + averages]
    return {
        "weights_are_old_averages": equal(swapped_w, raw_a),
        "averages_are_old_weights": equal(swapped_a, raw_w),
        "back_bit_for_bit": equal(values(variables), raw_w)
        and equal(values(averages), raw_a),
        "shardings_kept_while_swapped": during == before,
        "shardings_kept_after": after == before,
    }


def _fit_and_compare(distribution, **kwargs):
    keras.distribution.set_distribution(distribution)
    model, opt = make(**kwargs)
    initial = model.get_weights()
    model.fit(X, Y, **FIT)
    facts = {
        "shardings": sharding_facts(model, opt),
        "step": step_of(opt),
        "iterations": int(np.asarray(opt.iterations.value)),
    }
    averages = values([opt.average(v) for v in model.trainable_variables])
    weights = values(model.trainable_variables)
    facts["swap"] = swap_facts(model, opt)
    with opt.averaged_weights():
        facts["specs_inside_averaged_weights"] = [
            str(v.value.sharding.spec) for v in model.trainable_variables
        ]
    ref_model, ref_opt = single_device_reference(initial, **kwargs)
    facts["max_diff_to_single_device_averages"] = max_diff(
        averages,
        values([ref_opt.average(v) for v in ref_model.trainable_variables]),
    )
    facts["max_diff_to_single_device_weights"] = max_diff(
        weights, values(ref_model.trainable_variables)
    )
    facts["min_average_to_weight_distance"] = min(
        float(np.max(np.abs(a - w))) for a, w in zip(averages, weights)
    )
    return facts


def data_parallel():
    return _fit_and_compare(
        keras.distribution.DataParallel(devices=jax.devices())
    )


def model_parallel():
    mesh = keras.distribution.DeviceMesh(
        (1, 2), ["batch", "model"], devices=jax.devices()
    )
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*hidden/kernel"] = (None, "model")
    layout_map[".*hidden/bias"] = ("model",)
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    return _fit_and_compare(distribution)


def data_parallel_callback():
    """`SwapAverageWeights` validating on the averages under DataParallel."""
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices())
    )
    model, opt = make()
    last = {}

    class Last(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            self.model.jax_state_sync()
            last["w"] = values(self.model.trainable_variables)

    history = model.fit(
        X, Y, epochs=2, validation_data=(X_VAL, Y_VAL),
        callbacks=[Last(), keras_ema.SwapAverageWeights(log_raw_metrics=True)],
        **FIT,
    ).history
    raw_back = equal(values(model.trainable_variables), last["w"])
    raw_loss = model.evaluate(X_VAL, Y_VAL, verbose=0)
    with opt.averaged_weights():
        average_loss = model.evaluate(X_VAL, Y_VAL, verbose=0)
    return {
        "val_loss": history["val_loss"],
        "val_raw_loss": history["val_raw_loss"],
        "evaluate_on_averages": float(average_loss),
        "evaluate_on_raw": float(raw_loss),
        "raw_back_bit_for_bit": raw_back,
        "swapped_in_after_fit": opt.averages_swapped_in,
        "shardings": sharding_facts(model, opt),
    }


def data_parallel_batchnorm():
    """Averages of BatchNorm statistics (moved by the wrapped train step)."""
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices())
    )
    model, opt = make(batchnorm=True, trainable_weights_only=False)
    opt.shadow_copy(model)
    stats = list(model.non_trainable_variables)
    start = values([opt.average(v) for v in stats])
    model.fit(X, Y, **FIT)
    return {
        "shardings": sharding_facts(model, opt, stats),
        "statistics_averages_moved": not equal(
            values([opt.average(v) for v in stats]), start
        ),
        "swap": swap_facts(model, opt, stats),
    }


SCENARIOS = {
    f.__name__: f
    for f in (
        data_parallel,
        model_parallel,
        data_parallel_callback,
        data_parallel_batchnorm,
    )
}


def main(out, names):
    results = {"devices": [str(d) for d in jax.devices()]}
    for name in names or SCENARIOS:
        start = time.perf_counter()
        try:
            results[name] = {"facts": SCENARIOS[name]()}
        except Exception:  # noqa: BLE001 - reported to the test
            results[name] = {"error": traceback.format_exc()}
        finally:
            keras.distribution.set_distribution(None)
            keras.backend.clear_session()
        results[name]["seconds"] = round(time.perf_counter() - start, 2)
    with open(out, "w") as f:
        json.dump(results, f, default=lambda v: v.item(), indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
