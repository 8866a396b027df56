"""What `compensated=True` costs: step time and memory, as ratios.

Times, in one process and in turns, one compiled optimizer step over two
large weights (10**6 floats each) and 500 small ones (10**3 each: packed
on TensorFlow and JAX): plain SGD, SGD wrapped in `ExponentialMovingAverage`,
and the same with `compensated=True`. Prints the EMA update's time (the
step's time minus SGD's), with and without the compensation, their ratio,
the whole step's ratio, and the bytes of the optimizer's variables, whose
ratio is the memory cost. The step is the optimizer's own: on TensorFlow
`apply` in an XLA-compiled `tf.function`, as `fit` compiles it; on JAX
`stateless_apply` under `jax.jit`; on torch `apply`, eagerly.

Run:

    KERAS_BACKEND=tensorflow python benchmarks/compensation_cost.py
    KERAS_BACKEND=jax python benchmarks/compensation_cost.py
    KERAS_BACKEND=torch python benchmarks/compensation_cost.py
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402

SHAPES = [(1_000_000,)] * 2 + [(1_000,)] * 500


def _step(optimizer, weights, grads):
    """One compiled optimizer step, as a function of nothing."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step():
            optimizer.apply(grads, weights)

        return step
    if backend == "jax":
        import jax

        apply = jax.jit(optimizer.stateless_apply, donate_argnums=(0, 2))
        state = {"opt": [v.value for v in optimizer.variables],
                 "w": [w.value for w in weights]}

        def step():
            w, opt = apply(state["opt"], grads, state["w"])
            state["opt"], state["w"] = opt, w
            jax.block_until_ready(w)

        return step
    return lambda: optimizer.apply(grads, weights)


def _variant(kind):
    weights = [keras.Variable(np.ones(s, "float32")) for s in SHAPES]
    grads = [keras.ops.convert_to_tensor(np.full(s, 1e-3, "float32"))
             for s in SHAPES]
    optimizer = keras.optimizers.SGD(0.1)
    if kind != "SGD":
        optimizer = keras_ema.ExponentialMovingAverage(
            optimizer, average_decay=keras_ema.schedules.Uniform(),
            compensated=kind == "compensated",
        )
    optimizer.build(weights)
    nbytes = sum(int(np.prod(v.shape)) * 4 for v in optimizer.variables
                 if v.shape)
    return _step(optimizer, weights, grads), nbytes


def _median(step, repeats):
    for _ in range(3):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    kinds = ("SGD", "plain", "compensated")
    made = {k: _variant(k) for k in kinds}
    times = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            times[kind].append(_median(made[kind][0], args.repeats))
    t = {k: float(np.median(v)) for k, v in times.items()}
    plain, compensated = t["plain"] - t["SGD"], t["compensated"] - t["SGD"]
    weights = sum(int(np.prod(s)) for s in SHAPES) * 4
    print(f"backend: {keras.backend.backend()}, {len(SHAPES)} weights, "
          f"{weights / 2**20:.1f} MiB")
    print(f"step ms: SGD {1e3 * t['SGD']:.2f}, EMA {1e3 * t['plain']:.2f}, "
          f"compensated EMA {1e3 * t['compensated']:.2f}")
    print(f"EMA update ms: plain {1e3 * plain:.2f}, compensated "
          f"{1e3 * compensated:.2f}; ratio {compensated / plain:.2f}")
    print(f"whole step ratio (compensated / plain EMA): "
          f"{t['compensated'] / t['plain']:.2f}")
    print(f"optimizer memory: plain {made['plain'][1] / 2**20:.1f} MiB, "
          f"compensated {made['compensated'][1] / 2**20:.1f} MiB; ratio "
          f"{made['compensated'][1] / made['plain'][1]:.2f}")


if __name__ == "__main__":
    main()
