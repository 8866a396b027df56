"""Peak resident memory of `model.fit` with and without averages.

An average is one more copy of each averaged weight: for float32 weights,
4 bytes per parameter. This checks that it costs that and nothing more. It
fits an MLP of more than 50M float32 parameters (13 Dense layers 2048
wide by default; how the parameters split into variables changes the
transient buffers, so try `--width 4096 --depth 4` too) for a few steps on
small generated batches (so that activations stay small) with plain `SGD` (no
momentum: no optimizer slots), Keras' built-in `SGD(use_ema=True)`, and
keras-ema's wrapper around the same SGD. Each variant runs in a fresh
Python process (this script runs itself with `--variant`).

Each process reads its resident memory (`VmRSS`) after building the model,
then resets its peak (`/proc/self/clear_refs`), so that the peak that
`ru_maxrss` reports after `fit` is the peak of compiling and fitting alone,
not of initializing the weights. After `fit` it reads the memory still in
use, after `gc.collect()` and glibc's `malloc_trim(0)` return what the
allocators merely cache. On TensorFlow it also reads the bytes that TF's
own CPU allocator holds and its peak (`tf.config.experimental.
get_memory_info`), which count tensors exactly.

The script prints the figures in MiB, how much the peak and the memory in
use after `fit` exceed plain SGD's, and that excess as a multiple of one
float32 copy of the weights (1.00 is the claim; transient buffers of an
update step add to the peak). Keras' `use_ema` assigns the averages to the
weights at the end of `fit`, which then share their buffers: its memory in
use after `fit` is not what it holds while training.

    KERAS_BACKEND=tensorflow python benchmarks/peak_rss.py
    KERAS_BACKEND=torch python benchmarks/peak_rss.py --steps 3 --repeats 1
    # the averages created before `fit`, outside any traced function:
    KERAS_BACKEND=tensorflow python benchmarks/peak_rss.py --build-optimizer
"""

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow 2.21 counts the bytes of its CPU allocator only as a BFC one.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

MIB = 2**20


def _sgd(**kwargs):
    import keras

    return keras.optimizers.SGD(0.01, **kwargs)


def _wrapped():
    import keras_ema

    return keras_ema.ExponentialMovingAverage(_sgd())


VARIANTS = {
    "SGD": _sgd,
    "SGD use_ema": lambda: _sgd(use_ema=True),
    "keras-ema": _wrapped,
}


def _rss_mib():
    """Resident memory now, from /proc (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / MIB
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_mib():
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB


def _reset_peak():
    """Resets the peak to the current RSS (Linux 4.0+); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


def _rss_in_use_mib():
    """RSS once Python's garbage and glibc's free pages are released."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return _rss_mib()


def _tf_allocator_mib():
    """TensorFlow's CPU allocator: bytes in use and peak, or None."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    info = tf.config.experimental.get_memory_info("CPU:0")
    return {"live": info["current"] / MIB, "peak": info["peak"] / MIB}


def measure(variant, args):
    """Runs one variant in this process; returns its figures in MiB."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((args.inputs,))])
    for _ in range(args.depth):
        model.add(keras.layers.Dense(args.width, activation="relu"))
    model.add(keras.layers.Dense(10))
    rng = np.random.default_rng(0)
    samples = args.steps * args.batch_size
    x = rng.standard_normal((samples, args.inputs)).astype("float32")
    y = rng.integers(0, 10, samples).astype("int32")
    built = _rss_in_use_mib()
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.reset_memory_stats("CPU:0")
    peak_reset = _reset_peak()
    model.compile(
        optimizer=VARIANTS[variant](),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    if args.build_optimizer:
        model.optimizer.build(model.trainable_variables)
    model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False,
              verbose=0)
    return {
        "params": model.count_params(),
        "built": built,
        "peak": _peak_mib(),
        "peak_reset": peak_reset,
        "in_use": _rss_in_use_mib(),
        "tf": _tf_allocator_mib(),
    }


def run_variant(variant, args):
    """Runs `measure` for `variant` in a fresh Python process."""
    command = [sys.executable, os.path.abspath(__file__), "--variant", variant,
               "--inputs", str(args.inputs), "--width", str(args.width),
               "--depth", str(args.depth), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size)]
    if args.build_optimizer:
        command.append("--build-optimizer")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"variant {variant!r} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def _table(title, columns, rows, copy):
    """Prints each figure, and its excess over SGD's in MiB and in copies."""
    print(title)
    header = "".join(f" {c:>9} {'-SGD':>6} {'/copy':>5}" for c in columns)
    print(f"{'variant':<12}{header}")
    for name, values in rows.items():
        cells = ""
        for column, value in zip(columns, values):
            extra = value - rows["SGD"][columns.index(column)]
            cells += f" {value:9.0f} {extra:6.0f} {extra / copy:5.2f}"
        print(f"{name:<12}{cells}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1024)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=13,
                        help="hidden Dense layers of --width units")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2,
                        help="processes per variant; the median is printed")
    parser.add_argument("--build-optimizer", action="store_true",
                        help="create the optimizer's variables before `fit`")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return

    runs = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name in VARIANTS:
            runs[name].append(run_variant(name, args))

    def median(name, get):
        values = sorted(get(run) for run in runs[name])
        return values[len(values) // 2]

    first = runs["SGD"][0]
    copy = first["params"] * 4 / MIB
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    print(f"backend: {backend}, {first['params']:,} parameters, one float32 "
          f"copy: {copy:.1f} MiB, {args.steps} steps of batch "
          f"{args.batch_size}, optimizer built "
          f"{'before' if args.build_optimizer else 'by'} fit, median of "
          f"{args.repeats} processes per variant; MiB")
    if not all(run["peak_reset"] for r in runs.values() for run in r):
        print("could not reset the peak: it includes building the model")
    _table(
        "resident memory: after build, peak of fit, in use after fit",
        ["built", "peak", "in use"],
        {name: [median(name, lambda r, k=k: r[k])
                for k in ("built", "peak", "in_use")] for name in VARIANTS},
        copy,
    )
    if first["tf"] is not None:
        _table(
            "TensorFlow CPU allocator: peak of fit, live after fit",
            ["peak", "live"],
            {name: [median(name, lambda r, k=k: r["tf"][k])
                    for k in ("peak", "live")] for name in VARIANTS},
            copy,
        )


if __name__ == "__main__":
    main()
