"""How far float32 averages drift from the exact average over long runs.

A weight that moves by 0.1 each update (`w_i = float32(i) * float32(0.1)`,
set exactly by `SGD(1.0)` with gradient `w - w_i`) is averaged for 10**6
updates by `ExponentialMovingAverage` with `Uniform()`, `Power(0.1)`,
`Cosine(0.9, 0.999)` over the run and a fixed decay 0.9999
(`dynamic_decay=False`), with and without `compensated=True`. The
optimizer's own step runs every update: on TensorFlow `apply` in an
XLA-compiled `tf.function` loop, on JAX `stateless_apply` in a
`jax.lax.fori_loop`, on torch `apply` in a Python loop (1 to 5 ms a step
on two cores: `--backends torch --torch-steps 100000` takes about an hour,
so torch is left out by default; `tests/test_long_runs.py` runs its road in
the regime of update 10**6). The reference is the same recurrence in float64
over the same float32 weights, with exact decays. Prints the relative
error `|average - reference| / |reference|` after 10**5 and 10**6 updates,
one table row per schedule, backend and setting.

Run (about 3 minutes on two cores):

    python benchmarks/long_run_precision.py --backends tensorflow,jax
"""

import argparse
import json
import math
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SCHEDULES = ["Uniform()", "Power(0.1)", "Cosine(0.9, 0.999)", "0.9999 fixed"]
CHECKPOINTS = (10**5, 10**6)
BACKENDS = ("tensorflow", "jax", "torch")


def weights(steps):
    """The float32 weights after updates 1..steps, as float64."""
    import numpy as np

    i = np.arange(1, steps + 1, dtype="float32")
    return (i * np.float32(0.1)).astype("float64")


def complements(name, steps):
    """The exact `1 - decay` of EMA updates n = 0 .. steps - 1."""
    import numpy as np

    from keras_ema import schedules

    n = np.arange(steps, dtype="float64")
    if name == "Uniform()":
        return 1.0 / (n + 2.0)
    if name == "Power(0.1)":
        gamma = schedules.sigma_rel_to_gamma(0.1)
        with np.errstate(divide="ignore"):  # log1p(-1): the first copies
            return -np.expm1((gamma + 1.0) * np.log1p(-1.0 / (n + 1.0)))
    if name.startswith("Cosine"):
        rise = (np.cos(np.pi * np.minimum(n, steps) / steps) + 1.0) / 2.0
        return (1.0 - 0.999) + (0.999 - 0.9) * rise
    return np.full(steps, 1.0 - 0.9999)


def reference(name, steps, checkpoints):
    """The float64 average at each checkpoint (the start weight is 0)."""
    w = weights(steps)
    c = complements(name, steps)
    average, found = 0.0, {}
    for i in range(steps):
        average -= c[i] * (average - w[i])
        if i + 1 in checkpoints:
            found[i + 1] = average
    return found


def make_decay(name, steps):
    from keras_ema import schedules

    if name == "Uniform()":
        return schedules.Uniform()
    if name == "Power(0.1)":
        return schedules.Power(sigma_rel=0.1)
    if name.startswith("Cosine"):
        return schedules.Cosine(0.9, 0.999, steps=steps)
    return 0.9999


def optimizer(name, steps, compensated):
    import keras

    import keras_ema

    w = keras.Variable(keras.ops.zeros((1,)))
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(1.0), average_decay=make_decay(name, steps),
        dynamic_decay=False, compensated=compensated,
    )
    opt.build([w])
    return opt, w


def target(i):
    """The weight of update `i` (0-based: w_{i + 1}), in float32."""
    import keras

    return keras.ops.multiply(
        keras.ops.cast(i + 1, "float32"), keras.ops.cast(0.1, "float32")
    )


def run_tensorflow(opt, w, start, stop):
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def loop(start, stop):
        for i in tf.range(start, stop):
            opt.apply([w.value - target(i)], [w])

    loop(tf.constant(start, "int64"), tf.constant(stop, "int64"))


def run_jax(opt, w, start, stop):
    import jax

    def body(i, state):
        values, w_value = state
        (w_new,), values = opt.stateless_apply(
            values, [w_value - target(i)], [w_value]
        )
        return values, w_new

    state = ([v.value for v in opt.variables], w.value)
    values, w_value = jax.jit(
        lambda s: jax.lax.fori_loop(start, stop, body, s)
    )(state)
    for variable, value in zip(opt.variables, values):
        variable.assign(value)
    w.assign(w_value)


def run_torch(opt, w, start, stop):
    for i in range(start, stop):
        opt.apply([w.value - target(i)], [w])


def measure(backend, name, compensated, checkpoints):
    import numpy as np

    # Cosine's horizon is the whole run of the reference, however far this
    # run goes (`--torch-steps`).
    opt, w = optimizer(name, max(CHECKPOINTS), compensated)
    run = globals()[f"run_{backend}"]
    done, found = 0, {}
    for point in sorted(checkpoints):
        run(opt, w, done, point)
        done = point
        found[point] = float(np.asarray(opt.average(w), "float64")[0])
    return found


def child(args):
    checkpoints = [c for c in CHECKPOINTS if c <= args.steps]
    rows = []
    for name in SCHEDULES:
        for compensated in (False, True):
            got = measure(args.backend, name, compensated, checkpoints)
            rows.append((name, compensated, got))
    print(json.dumps([(n, c, {str(k): v for k, v in g.items()})
                      for n, c, g in rows]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS)
    parser.add_argument("--steps", type=int, default=max(CHECKPOINTS))
    parser.add_argument("--backends", default="tensorflow,jax")
    parser.add_argument("--torch-steps", type=int, default=min(CHECKPOINTS))
    args = parser.parse_args()
    if args.backend:
        child(args)
        return
    refs = {name: reference(name, max(CHECKPOINTS), CHECKPOINTS)
            for name in SCHEDULES}
    print("| schedule | backend | compensated | 10**5 | 10**6 |")
    print("|---|---|---|---|---|")
    for backend in args.backends.split(","):
        steps = args.torch_steps if backend == "torch" else args.steps
        env = dict(os.environ, KERAS_BACKEND=backend)
        out = subprocess.run(
            [sys.executable, __file__, "--backend", backend,
             "--steps", str(steps)],
            env=env, check=True, capture_output=True, text=True,
        ).stdout.strip().splitlines()[-1]
        for name, compensated, got in json.loads(out):
            cells = []
            for point in CHECKPOINTS:
                if str(point) not in got:
                    cells.append("-")
                    continue
                ref = refs[name][point]
                cells.append(f"{abs(got[str(point)] - ref) / abs(ref):.1e}")
            print(f"| {name} | {backend} | {'yes' if compensated else 'no'} | "
                  f"{' | '.join(cells)} |")
    print(f"\nfloat32 rounding of the average: {2.0 ** -24:.1e} relative "
          f"(half an ulp); exact decays, float64 reference "
          f"({'reference ok' if all(math.isfinite(v) for r in refs.values() for v in r.values()) else 'bad'}).")


if __name__ == "__main__":
    main()
