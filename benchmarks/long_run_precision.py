"""How far float32 averages drift from the exact average over long runs.

A weight that moves by 0.1 each update (`w_i = float32(i) * float32(0.1)`,
set exactly by `SGD(1.0)` with gradient `w - w_i`) is averaged for 10**6
updates by `ExponentialMovingAverage` with `Uniform()`, `Power(0.1)`,
`Cosine(0.9, 0.999)` over the run and a fixed decay 0.9999
(`dynamic_decay=False`), with and without `compensated=True`. The reference
is the same recurrence in float64 over the same float32 weights, with exact
decays. Prints the relative error `|average - reference| / |reference|`
after 10**5 and 10**6 updates, one table row per schedule, backend and
setting.

TensorFlow and JAX run the optimizer's own step every update: `apply` in an
XLA-compiled `tf.function` loop, `stateless_apply` in a `jax.lax.fori_loop`.

On torch, `apply` runs eagerly, 1.5 to 3 ms a step on two cores (10**6
updates: about 40 minutes a row), nearly all of it around the averages'
arithmetic: the swap guard, SGD's update and counter, the step counter, and
the decay computed from the step through `keras.ops` every update. So the
torch rows (`--torch-path road`, the default) measure the averages'
arithmetic of that step without the rest: the `1 - decay` of all updates
from one vectorized call (`torch.vmap`) of the function `apply` calls with
the step, `_decay_variables.complement_at`, over `n = 0 .. steps - 1`; the
weight written as SGD(1.0) writes it; and each update's move by the torch
road's own code, `TorchRoad.for_each` with `_update.move` (one
`torch._foreach_lerp_`, or its three kernels from factor 0.5 on) or
`_update.move_compensated` (its 14 multi-tensor kernels), on the
optimizer's own averages and buffers. Left out: `apply`'s Python overhead,
SGD and the step counter (set at each check). A self-check proves the two
the same and aborts otherwise: before anything is measured, every row runs
its first 2000 updates both ways from the same state, and every average,
compensation buffer, decay variable and weight must agree bit for bit (all
but the iteration counters, which only `apply` moves); each row does so
again for the 500 updates before each checkpoint; and the vectorized
`1 - decay` must equal bit for bit what `complement_at` computes for one
step, at about 7000 steps spread over the run, once a schedule
(`--check-all-complements`: at every step, about 6 minutes a schedule;
`--self-check-only`: only the self-check). `--torch-path apply` runs
`apply` itself (with `--torch-steps 100000`, about 40 minutes on two
cores).

Run (TensorFlow and JAX: 1 to 3 minutes on two cores; torch: 15 minutes):

    python benchmarks/long_run_precision.py --backends tensorflow,jax
    python benchmarks/long_run_precision.py --backends torch
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SCHEDULES = ["Uniform()", "Power(0.1)", "Cosine(0.9, 0.999)", "0.9999 fixed"]
CHECKPOINTS = (10**5, 10**6)
BACKENDS = ("tensorflow", "jax", "torch")
# Updates the torch self-check runs both ways: first, and before each
# checkpoint.
PREFIX = 2000
WINDOW = 500


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


def road_factors(opt, steps):
    """The `1 - decay` of updates 0 .. steps - 1, by the optimizer's rule.

    `apply`'s update `i` (0-based; `start_step=0`) calls `complement_at`
    with `n = i`, a 0-d integer of the step counter's dtype, and moves with
    `1.0 * complement`, the same float32. `torch.vmap` makes the call once
    for every `n` while each `n` stays 0-d: torch promotes the dtypes of
    0-d and 1-d operands differently (`Cosine`'s `pi * n / steps` is
    float64 for a 0-d float32 `pi * n`, float32 for a 1-d one).
    """
    import keras
    import torch

    from keras_ema import _decay_variables

    state = opt._ema_state
    n = keras.ops.arange(steps, dtype=state.step.dtype)
    return torch.vmap(lambda k: _decay_variables.complement_at(state, k))(n)


def run_road(opt, w, start, stop, factors):
    """Updates `start .. stop - 1` by the torch road, without `apply`."""
    import keras
    import torch

    from keras_ema import _torch
    from keras_ema import _update

    state = opt._ema_state
    if not isinstance(state.road, _torch.TorchRoad):
        raise SystemExit(f"not the torch road: {state.road!r}")
    fn, entries = _update.move, state.entries
    if state.compensated:
        fn = _update.move_compensated
        entries = _update.move_entries(state, state.entries)
    i = keras.ops.arange(start + 1, stop + 1)
    targets = keras.ops.multiply(keras.ops.cast(i, "float32"),
                                 keras.ops.cast(0.1, "float32"))
    value = w._value
    with torch.no_grad():
        for i in range(start, stop):
            value.copy_(targets[i - start])
            state.road.for_each(state, entries, [], fn, (factors[i],),
                                None, None)
    state.step.assign(stop)


def snapshot(opt, w):
    """The bits of the optimizer's variables but its iteration counters
    (only `apply` moves them), and of the weight."""
    import keras

    return {v.path: keras.ops.convert_to_numpy(v).tobytes()
            for v in [*opt.variables, w]
            if not v.path.endswith("/iteration")}


def check_window(opt, w, start, stop, factors, label):
    """Runs updates `start .. stop - 1` by `apply` and by the road from the
    same state; aborts unless they end in the same bits."""
    import keras

    saved = [(v, keras.ops.copy(v.value)) for v in [*opt.variables, w]]
    run_torch(opt, w, start, stop)
    by_apply = snapshot(opt, w)
    for variable, value in saved:
        variable.assign(value)
    run_road(opt, w, start, stop, factors)
    by_road = snapshot(opt, w)
    differ = [k for k in by_apply if by_apply[k] != by_road[k]]
    if differ:
        raise SystemExit(f"self-check failed: {label}, updates {start} to "
                         f"{stop - 1}: the road differs from apply in "
                         f"{differ}")
    print(f"self-check: {label}: updates {start}..{stop - 1} by the road "
          f"= by apply, bit for bit ({len(by_road)} variables)")


def check_factors(opt, factors, label, every_step):
    """Aborts unless `factors` are, bit for bit, what `complement_at`
    computes for one step, at every step or at about 7000 steps spread
    over the run (the first, the last before each checkpoint, and random
    ones)."""
    import keras
    import numpy as np

    from keras_ema import _decay_variables

    state = opt._ema_state
    steps = factors.shape[0]
    if every_step:
        chosen = np.arange(steps)
    else:
        rng = np.random.default_rng(0)
        chosen = np.unique(np.concatenate(
            [np.arange(1000), rng.integers(0, steps, 4000)]
            + [np.arange(p - 1000, p) for p in CHECKPOINTS if p <= steps]
        ))
    vector = keras.ops.convert_to_numpy(factors)
    for n in chosen:
        one = _decay_variables.complement_at(
            state, keras.ops.convert_to_tensor(int(n), state.step.dtype)
        )
        one = keras.ops.convert_to_numpy(one)
        if one.dtype != vector.dtype or one.tobytes() != vector[n].tobytes():
            raise SystemExit(f"self-check failed: {label}: the vectorized "
                             f"1 - decay of update {n} is {vector[n]!r}, "
                             f"one step's is {one!r}")
    print(f"self-check: {label}: vectorized 1 - decay = one step's, bit "
          f"for bit, at {len(chosen)} of {steps} updates")


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


def self_checked_rows(steps, every_step):
    """Each row's optimizer and factors, after its self-check (which leaves
    it at update `PREFIX`)."""
    import keras

    rows, checked = [], {}
    for name in SCHEDULES:
        for compensated in (False, True):
            label = f"{name}, compensated={compensated}"
            opt, w = optimizer(name, max(CHECKPOINTS), compensated)
            factors = road_factors(opt, steps)
            bits = keras.ops.convert_to_numpy(factors).tobytes()
            # The setting leaves the decay as it is: one check a schedule.
            if name not in checked:
                check_factors(opt, factors, label, every_step)
                checked[name] = bits
            elif bits != checked[name]:
                raise SystemExit(f"self-check failed: {label}: other "
                                 "decays than without compensation")
            check_window(opt, w, 0, PREFIX, factors, label)
            rows.append((name, compensated, opt, w, factors))
    return rows


def measure_road(row, checkpoints):
    import numpy as np

    name, compensated, opt, w, factors = row
    label = f"{name}, compensated={compensated}"
    done, found = PREFIX, {}
    for point in sorted(checkpoints):
        began = time.perf_counter()
        run_road(opt, w, done, point - WINDOW, factors)
        check_window(opt, w, point - WINDOW, point, factors, label)
        print(f"timing: {label}: updates {done}..{point - 1} in "
              f"{time.perf_counter() - began:.0f} s")
        done = point
        found[point] = float(np.asarray(opt.average(w), "float64")[0])
    return found


def child(args):
    checkpoints = [c for c in CHECKPOINTS if c <= args.steps]
    rows = []
    if args.backend == "torch" and args.torch_path == "road":
        checked = self_checked_rows(args.steps, args.check_all_complements)
        for row in [] if args.self_check_only else checked:
            rows.append((row[0], row[1], measure_road(row, checkpoints)))
    else:
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
    parser.add_argument("--torch-path", choices=("road", "apply"),
                        default="road")
    parser.add_argument("--torch-steps", type=int)
    parser.add_argument("--check-all-complements", action="store_true")
    parser.add_argument("--self-check-only", action="store_true")
    args = parser.parse_args()
    if args.backend:
        child(args)
        return
    if args.torch_steps is None:
        args.torch_steps = (min(CHECKPOINTS) if args.torch_path == "apply"
                            else args.steps)
    refs = {name: reference(name, max(CHECKPOINTS), CHECKPOINTS)
            for name in SCHEDULES}
    notes = []
    print("| schedule | backend | compensated | 10**5 | 10**6 |")
    print("|---|---|---|---|---|")
    for backend in args.backends.split(","):
        steps = args.torch_steps if backend == "torch" else args.steps
        env = dict(os.environ, KERAS_BACKEND=backend)
        flags = ["--torch-path", args.torch_path]
        flags += ["--check-all-complements"] * args.check_all_complements
        flags += ["--self-check-only"] * args.self_check_only
        began = time.perf_counter()
        lines = subprocess.run(
            [sys.executable, __file__, "--backend", backend,
             "--steps", str(steps), *flags],
            env=env, check=True, stdout=subprocess.PIPE, text=True,
        ).stdout.strip().splitlines()
        notes.append(f"{backend}: {time.perf_counter() - began:.0f} s")
        notes.extend(lines[:-1])
        for name, compensated, got in json.loads(lines[-1]):
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
    print("\n".join(notes))


if __name__ == "__main__":
    main()
