"""Extra step time of two power-function EMAs (`PostHocEMA`) over one.

Times a compiled optimizer step over many variables (the shapes of
`ema_overhead.py`) with plain SGD, one `ExponentialMovingAverage` with
`schedules.Power(sigma_rel=0.05)`, and `PostHocEMA` with
`sigma_rels=(0.05, 0.10)`, and prints each one's extra time over SGD and
their ratio (two averages / one). Target: at most 1.6. Samples, rounds and
medians as in `ema_overhead.py`; a last row of 20 x 1k (a small model)
shows the regime where the step's fixed costs decide.

An average costs reading it and the weight and writing it, three arrays per
weight; a second average adds its own read and write, so even fused into
one pass two averages cost at least 5/3 of one where memory bandwidth
limits (large weights). Kept, as here, in one array per average (each
profile a whole `ExponentialMovingAverage`), no backend's compiler reads the
weight once for both on CPU (XLA makes one loop per output), and the floor
is 2: the table shows where the implementation stands against both. Where
per-step costs dominate (the counters, the decay, the dispatch), the
profiles share them and the ratio falls towards 1.

Run:

    KERAS_BACKEND=jax python benchmarks/posthoc_overhead.py
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402
from ema_overhead import SHAPES, STEPS_PER_SAMPLE, _keras_step, _median_seconds  # noqa: E402


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    power = keras_ema.schedules.Power
    builds = {
        "SGD": _keras_step(lambda: keras.optimizers.SGD(0.01)),
        "one": _keras_step(lambda: keras_ema.ExponentialMovingAverage(
            keras.optimizers.SGD(0.01), average_decay=power(sigma_rel=0.05))),
        "two": _keras_step(lambda: keras_ema.PostHocEMA(
            keras.optimizers.SGD(0.01), sigma_rels=(0.05, 0.10))),
    }
    print(f"backend: {keras.backend.backend()}")
    print(f"{'shape':>14} {'SGD ms':>8} {'+one ms':>8} {'+two ms':>8} "
          f"{'two/one':>8}")
    for count, size in [*SHAPES, (20, 1_000)]:
        rng = np.random.default_rng(0)
        values = [rng.random(size, dtype="float32") for _ in range(count)]
        grads = [keras.ops.convert_to_tensor(v) for v in values]
        steps = {name: build(values, grads) for name, build in builds.items()}
        times = {name: [] for name in steps}
        for r in range(args.rounds):
            names = list(steps)[r % 3:] + list(steps)[:r % 3]
            for name in names:
                times[name].append(_median_seconds(
                    steps[name], args.repeats, calls=STEPS_PER_SAMPLE))
        del steps
        one = [o - s for o, s in zip(times["one"], times["SGD"])]
        two = [t - s for t, s in zip(times["two"], times["SGD"])]
        ratio = float(np.median([t / o for t, o in zip(two, one)]))
        print(f"{count:>5} x {size:<7} {np.median(times['SGD']) * 1e3:8.2f} "
              f"{np.median(one) * 1e3:8.2f} {np.median(two) * 1e3:8.2f} "
              f"{ratio:7.2f}x")
    print("floors where memory bandwidth limits: 1.67x in one pass over both "
          "averages, 2.00x with one array per average")


if __name__ == "__main__":
    main()
