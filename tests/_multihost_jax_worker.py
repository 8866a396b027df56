"""One process of a two-process JAX run of keras-ema, or its reference.

Run by `tests/test_multihost_jax.py`: two processes on 127.0.0.1, one CPU
device each (CPU collectives by gloo), Keras' `DataParallel` over both
processes' devices; and a single-process reference on the same global data:

    python tests/_multihost_jax_worker.py PROCESS_ID PORT OUT_DIR
    python tests/_multihost_jax_worker.py reference - OUT_DIR

Each process feeds its own rows of every global batch: Keras' JAX trainer
joins the processes' batches with `jax.make_array_from_process_local_data`,
process 0's rows first, so both train on the global batches that the
reference sees whole. Each writes `OUT_DIR/<name>.json` (facts, the
traceback of any stage that raised) and `OUT_DIR/<name>.npz` (averages and
weights); the test asserts on them. A process whose `jax.distributed` does
not start writes `init_error` and exits with `INIT_FAILED`.

Every eager op on a weight laid out over both processes' devices, and
every variable created under the distribution, is a step that both
processes must run, in the same order: both run the same stages; only the
saves by process 0 alone (`save_process_0_undistributed`, and the probes of
`save_process_0_alone`, last) do otherwise.
"""

import faulthandler
import json
import os
import sys
import time
import traceback

os.environ["KERAS_BACKEND"] = "jax"
# One CPU device per process, whatever the parent's XLA_FLAGS said.
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import jax  # noqa: E402
import numpy as np  # noqa: E402

INIT_FAILED = 3
PROCESSES = 2
DECAY = 0.9
GLOBAL_BATCH = 16
EPOCHS = 2
RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 4)).astype("float32")
Y = (X @ np.array([[1.0], [-2.0], [0.5], [3.0]], "float32")).astype("float32")
X_VAL, Y_VAL = X[:32] + 0.5, Y[:32]
SCENARIOS = {"plain": False, "batchnorm": True}  # name: with BatchNorm


def local_rows(array, process, processes):
    """This process's rows of each global batch, in order."""
    local = GLOBAL_BATCH // processes
    batches = array.reshape(-1, GLOBAL_BATCH, *array.shape[1:])
    mine = batches[:, process * local:(process + 1) * local]
    return mine.reshape(-1, *array.shape[1:])


def initial_weights(batchnorm):
    """The same starting weights in every process and in the reference."""
    rng = np.random.default_rng(1)

    def normal(*shape):
        return rng.normal(scale=0.5, size=shape).astype("float32")

    weights = [normal(4, 8), normal(8)]
    if batchnorm:
        # gamma, beta, moving mean, moving variance
        weights += [1 + normal(8), normal(8), normal(8), 1 + normal(8) ** 2]
    return weights + [normal(8, 1), normal(1)]


def make(batchnorm):
    """The model, compiled; with BatchNorm its statistics are averaged."""
    import keras

    import keras_ema

    layers = [
        keras.Input((4,)),
        keras.layers.Dense(8, activation="relu", name="hidden"),
    ]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization(name="norm"))
    layers.append(keras.layers.Dense(1, name="out"))
    model = keras.Sequential(layers, name="net")
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05),
        average_decay=DECAY,
        trainable_weights_only=not batchnorm,
    )
    model.compile(optimizer=opt, loss="mse")
    model.set_weights(initial_weights(batchnorm))
    # Builds the optimizer, so that `load_weights` restores it at once, and
    # creates the averages of the BatchNorm statistics.
    opt.shadow_copy(model)
    return model, opt


def key(model, variable):
    """A variable's path without the model's name: a loaded model's paths
    lack it."""
    prefix = model.name + "/"
    path = variable.path
    return path[len(prefix):] if path.startswith(prefix) else path


def averaged(model, opt):
    return [v for v in model.variables if opt.average(v) is not None]


def averages_of(model, opt):
    return {
        key(model, v): np.asarray(opt.average(v).value)
        for v in averaged(model, opt)
    }


def weights_of(model):
    return {key(model, v): np.asarray(v.value) for v in model.variables}


def shardings_of(model, opt):
    return {
        key(model, v): str(opt.average(v).value.sharding)
        for v in averaged(model, opt)
    }


def bits_equal(a, b):
    return sorted(a) == sorted(b) and all(
        a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()
        for k in a
    )


class Run:
    """What one process measured; every stage timed, its errors kept."""

    def __init__(self, name, out_dir):
        self.name = name
        self.out_dir = out_dir
        self.facts = {"errors": {}, "seconds": {}}
        self.arrays = {}

    def stage(self, label, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - reported to the test
            self.facts["errors"][label] = traceback.format_exc()[-6000:]
            return None
        finally:
            self.facts["seconds"][label] = round(
                time.perf_counter() - start, 2
            )

    def put(self, prefix, arrays):
        for name, value in arrays.items():
            self.arrays[f"{prefix}/{name}"] = value

    def write(self):
        np.savez(os.path.join(self.out_dir, f"{self.name}.npz"), **self.arrays)
        path = os.path.join(self.out_dir, f"{self.name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.facts, f, indent=1, default=float)
        os.replace(path + ".tmp", path)


def train(run, scenario, process, processes):
    """`fit` with `SwapAverageWeights`; then evaluates on the averages."""
    import keras_ema

    model, opt = make(SCENARIOS[scenario])
    run.put(scenario + "/initial_averages", averages_of(model, opt))
    x, y = local_rows(X, process, processes), local_rows(Y, process, processes)
    xv = local_rows(X_VAL, process, processes)
    yv = local_rows(Y_VAL, process, processes)
    batch = GLOBAL_BATCH // processes
    history = model.fit(
        x, y, batch_size=batch, epochs=EPOCHS, shuffle=False, verbose=0,
        validation_data=(xv, yv),
        callbacks=[keras_ema.SwapAverageWeights()],
    ).history
    facts = run.facts[scenario] = {
        "val_loss": [float(v) for v in history["val_loss"]],
        "iterations": int(np.asarray(opt.iterations.value)),
        "swapped_in_after_fit": opt.averages_swapped_in,
        "shardings": shardings_of(model, opt),
    }
    run.put(scenario + "/averages", averages_of(model, opt))
    run.put(scenario + "/weights", weights_of(model))
    with opt.averaged_weights():
        facts["evaluate_on_averages"] = float(
            model.evaluate(xv, yv, batch_size=batch, verbose=0)
        )
    facts["evaluate_on_raw"] = float(
        model.evaluate(xv, yv, batch_size=batch, verbose=0)
    )
    return model, opt


def restored(model, opt, loaded):
    """Whether a loaded model holds the averages and weights bit for bit,
    the averages laid out as before."""
    loaded_opt = loaded.optimizer
    # Attaches the saved averages of the BatchNorm statistics (README).
    loaded_opt.shadow_copy(loaded)
    return {
        "averages": bits_equal(
            averages_of(loaded, loaded_opt), averages_of(model, opt)
        ),
        "weights": bits_equal(weights_of(loaded), weights_of(model)),
        "shardings": shardings_of(loaded, loaded_opt)
        == shardings_of(model, opt),
        "swapped_in": loaded_opt.averages_swapped_in,
    }


def load_keras(path, scenario):
    import keras

    return keras.saving.load_model(path + ".keras")


def load_weights_h5(path, scenario):
    """`load_weights` into a freshly compiled model (optimizer built)."""
    fresh, _ = make(SCENARIOS[scenario])
    fresh.load_weights(path + ".weights.h5")
    return fresh


LOADERS = {"keras": load_keras, "weights_h5": load_weights_h5}


def save_every_process(run, scenario, model, opt, process):
    """Every process saves to its own path (`model.save`, `save_weights`);
    each then loads its own files and process 0's."""

    def path(process):
        return os.path.join(run.out_dir, f"{scenario}-{process}")

    model.save(path(process) + ".keras")
    model.save_weights(path(process) + ".weights.h5")
    barrier(f"{scenario}-saved")
    found = run.facts[scenario]["every_process_saves"] = {}
    for whose, saver in (("own", process), ("process_0s", 0)):
        for kind, load in LOADERS.items():
            label = f"{whose}_{kind}"
            loaded = run.stage(
                f"{scenario}/load_{label}", load, path(saver), scenario
            )
            if loaded is not None:
                found[label] = run.stage(
                    f"{scenario}/check_{label}", restored, model, opt, loaded
                )


def save_process_0_undistributed(run, scenario, model, opt, process):
    """Process 0 alone saves, with no distribution set while it does; both
    processes then load its file."""
    import keras

    path = os.path.join(run.out_dir, f"{scenario}-alone-undistributed")
    if process == 0:
        distribution = keras.distribution.distribution()
        keras.distribution.set_distribution(None)
        try:
            model.save(path + ".keras")
        finally:
            keras.distribution.set_distribution(distribution)
    barrier(f"{scenario}-saved-alone")
    loaded = load_keras(path, scenario)
    run.facts[scenario]["process_0_saves_undistributed"] = restored(
        model, opt, loaded
    )


def save_process_0_alone(run, scenario, model, opt):
    """The probes: process 0 alone calls `model.save`, then `save_weights`,
    while process 1 waits at a barrier. Each outcome is recorded: the error,
    or, once both passed the barrier, what both processes load."""
    outcomes = run.facts[scenario]["process_0_alone"] = {}
    path = os.path.join(run.out_dir, f"{scenario}-alone")
    for name, save, load in (
        ("save", lambda: model.save(path + ".keras"), load_keras),
        ("save_weights", lambda: model.save_weights(path + ".weights.h5"),
         load_weights_h5),
    ):
        try:
            if jax.process_index() == 0:
                save()
            barrier(f"{scenario}-alone-{name}")
        except Exception:  # noqa: BLE001 - the outcome is the fact
            outcomes[name] = {"error": traceback.format_exc()[-6000:]}
            continue
        outcomes[name] = {
            "error": None,
            "restored": restored(model, opt, load(path, scenario)),
        }


def barrier(name):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def initialize(port, process):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=PROCESSES,
        process_id=process,
        initialization_timeout=30,
    )
    barrier("initialized")


def main(which, port, out_dir):
    reference = which == "reference"
    process = 0 if reference else int(which)
    processes = 1 if reference else PROCESSES
    run = Run("reference" if reference else f"process-{process}", out_dir)
    # A collective that one process never joins would wait forever: print
    # every stack and exit instead, before the test's own timeout.
    faulthandler.dump_traceback_later(180, exit=True)
    if not reference:
        # Kept if `initialize` kills the process (jaxlib can crash there).
        run.facts["init_error"] = "jax.distributed.initialize did not return"
        run.write()
        try:
            initialize(port, process)
        except Exception:  # noqa: BLE001 - the test skips on it
            run.facts["init_error"] = traceback.format_exc()[-4000:]
            run.write()
            sys.exit(INIT_FAILED)
        del run.facts["init_error"]
    import keras

    # Keras draws initial weights from its global seed: the processes must
    # agree on it, or JAX refuses the first `device_put` of a replicated
    # weight (`keras.distribution.initialize` agrees on a random one; plain
    # `jax.distributed.initialize` does not).
    keras.utils.set_random_seed(0)
    keras.config.disable_traceback_filtering()  # full stacks in the facts
    run.facts.update({
        "versions": {"jax": jax.__version__, "keras": keras.__version__},
        "process_index": jax.process_index(),
        "devices": [str(d) for d in jax.devices()],
        "local_devices": [str(d) for d in jax.local_devices()],
    })
    if not reference:
        # The data is already split by process (`local_rows`); Keras' own
        # split (`auto_shard_dataset=True`) takes a `tf.data.Dataset` only.
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(
                devices=jax.devices(), auto_shard_dataset=False
            )
        )
    trained = {}
    for scenario in SCENARIOS:
        trained[scenario] = run.stage(
            scenario + "/fit", train, run, scenario, process, processes
        )
        if trained[scenario] is not None and not reference:
            run.stage(
                scenario + "/save_every_process", save_every_process, run,
                scenario, *trained[scenario], process,
            )
            run.stage(
                scenario + "/save_process_0_undistributed",
                save_process_0_undistributed, run, scenario,
                *trained[scenario], process,
            )
        run.write()
    if not reference and trained["plain"] is not None:
        save_process_0_alone(run, "plain", *trained["plain"])
    barrier("done")
    run.write()


if __name__ == "__main__":
    main(*sys.argv[1:4])
