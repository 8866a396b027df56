"""Extra time of one EMA update per train step, against a memory bound.

An EMA update reads the average and the weight and writes the average. This
times a compiled optimizer step over many variables with plain SGD, Keras'
built-in `use_ema`, and keras-ema's wrapper (`update_every` 1 and 4), and
prints each one's extra time over plain SGD as a multiple of the one-pass
bound: numpy reading two arrays and writing one of the same total size, in
the same process. Medians of many repetitions after warm-up.

    KERAS_BACKEND=tensorflow python benchmarks/ema_overhead.py
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402

SHAPES = [(8, 1_000_000), (400, 20_000), (2000, 1_000)]


def _median_seconds(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _compiled_step(opt, variables, grads):
    """One optimizer step as `model.fit` would run it on this backend."""
    backend = keras.backend.backend()
    opt.build(variables)
    if backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda: opt.apply(grads, variables))
        return lambda: step()
    if backend == "jax":
        import jax

        jitted = jax.jit(opt.stateless_apply, donate_argnums=(0, 2))
        state = {
            "opt": [v.value for v in opt.variables],
            "vars": [v.value for v in variables],
        }

        def run():
            state["vars"], state["opt"] = jitted(state["opt"], grads, state["vars"])
            jax.block_until_ready(state["vars"])

        return run
    return lambda: opt.apply(grads, variables)


def _bound_seconds(count, size, repeats):
    a, b, out = (np.random.rand(count * size).astype("float32") for _ in range(3))
    return _median_seconds(lambda: np.add(a, b, out=out), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    variants = {
        "use_ema": lambda: keras.optimizers.SGD(0.01, use_ema=True),
        "keras-ema": lambda: keras_ema.ExponentialMovingAverage(
            keras.optimizers.SGD(0.01)
        ),
        "keras-ema k=4": lambda: keras_ema.ExponentialMovingAverage(
            keras.optimizers.SGD(0.01), update_every=4
        ),
    }
    print(f"backend: {keras.backend.backend()}; extra time / one-pass bound")
    print(f"{'shape':>14} {'SGD ms':>8} {'bound ms':>9} "
          + " ".join(f"{name:>14}" for name in variants))
    for count, size in SHAPES:
        rng = np.random.default_rng(0)
        values = [rng.random(size, dtype="float32") for _ in range(count)]
        grads = [keras.ops.convert_to_tensor(v) for v in values]

        def timed(make):
            variables = [keras.Variable(v) for v in values]
            step = _compiled_step(make(), variables, grads)
            return _median_seconds(step, args.repeats)

        plain = timed(lambda: keras.optimizers.SGD(0.01))
        bound = _bound_seconds(count, size, args.repeats)
        ratios = [(timed(make) - plain) / bound for make in variants.values()]
        print(f"{count:>5} x {size:<7} {plain * 1e3:8.2f} {bound * 1e3:9.3f} "
              + " ".join(f"{r:13.1f}x" for r in ratios))


if __name__ == "__main__":
    main()
