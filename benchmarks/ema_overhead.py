"""Extra time of one EMA update per train step, against a memory bound.

An EMA update reads the average and the weight and writes the average. This
times a compiled optimizer step over many variables with plain SGD, Keras'
built-in `use_ema`, and keras-ema's wrapper (`update_every` 1 and 4), and
prints each one's extra time over plain SGD as a multiple of the one-pass
bound: numpy reading two arrays and writing one of the same total size, in
the same process. Each sample runs four steps and counts a quarter of their
time, so that `update_every=4` pays for its one averaging step in every
sample; each variant is timed as the median of `--repeats` samples after
warm-up, in `--rounds` rounds that take the variants in turn, and each ratio
is the median over the rounds.

On TensorFlow, with `tf-keras` and `tf-models-official` installed, a "Model
Garden" column adds TensorFlow Model Garden's `ExponentialMovingAverage`
(same decay 0.99, dynamic decay, start step 0) around a legacy
`tf_keras.optimizers.legacy.SGD`, the only kind it wraps. Its extra time is
over that legacy SGD step, timed alike (the "tf_keras SGD ms" column), so
that it counts the averaging, not the older optimizer. To install it beside
Keras 3 without touching TensorFlow (its declared dependencies pin other
versions; importing the EMA needs only gin-config besides):

    pip install tf-keras==2.21.0
    pip install --no-deps tf-models-official==2.20.0 gin-config==0.5.0

Run:

    KERAS_BACKEND=tensorflow python benchmarks/ema_overhead.py
"""

import argparse
import functools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402

SHAPES = [(8, 1_000_000), (400, 20_000), (2000, 1_000)]
# One sample spans a whole cycle of `update_every=4`: timed one step at a
# time, the median would land on a step that skips the averaging.
STEPS_PER_SAMPLE = 4


def _median_seconds(fn, repeats, calls=1):
    """Median time of one call of `fn`, with `calls` calls per sample."""
    for _ in range(3 * calls):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
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

        # As Keras' trainer does: the state goes in and comes out in the
        # same order, so each donated buffer is updated in place. (Donated in
        # another order than returned, a weight's buffer would be matched to
        # an average's output, and XLA would copy both every step.)
        def train(values, optimizer_values, grads):
            return opt.stateless_apply(optimizer_values, grads, values)

        jitted = jax.jit(train, donate_argnums=(0, 1))
        state = {
            "vars": [v.value for v in variables],
            "opt": [v.value for v in opt.variables],
        }

        def run():
            state["vars"], state["opt"] = jitted(state["vars"], state["opt"], grads)
            jax.block_until_ready(state["vars"])

        return run
    return lambda: opt.apply(grads, variables)


def _keras_step(make_optimizer):
    """A step builder `(values, grads) -> step` for a Keras 3 optimizer."""

    def build(values, grads):
        variables = [keras.Variable(v) for v in values]
        return _compiled_step(make_optimizer(), variables, grads)

    return build


def _model_garden_steps():
    """Step builders for legacy tf_keras SGD without and with Model Garden's EMA.

    Returns `None`, after printing a one-line note, where they cannot run.
    """
    if keras.backend.backend() != "tensorflow":
        print("Model Garden column skipped: TensorFlow backend only.")
        return None
    try:
        import tensorflow as tf
        import tf_keras
        from official.modeling.optimization import ema_optimizer
    except ImportError as error:
        print(f"Model Garden column skipped: {error} (install: see --help).")
        return None

    def build(values, grads, average):
        # Legacy optimizers take `tf.Variable`s, not Keras 3 variables.
        variables = [tf.Variable(v) for v in values]
        opt = tf_keras.optimizers.legacy.SGD(0.01)
        if average:
            opt = ema_optimizer.ExponentialMovingAverage(
                opt, average_decay=0.99, dynamic_decay=True, start_step=0
            )
            # `shadow_copy` reads the `trainable_variables` of a model;
            # a bare layer that holds the variables is enough.
            holder = tf_keras.layers.Layer()
            holder.held = variables
            opt.shadow_copy(holder)

        @tf.function
        def step():
            # Legacy `apply_gradients` returns an Operation, which a
            # `tf.function` may not return.
            opt.apply_gradients(zip(grads, variables))

        return step

    return functools.partial(build, average=False), functools.partial(
        build, average=True
    )


def _bound_seconds(count, size, repeats):
    a, b, out = (np.random.rand(count * size).astype("float32") for _ in range(3))
    return _median_seconds(lambda: np.add(a, b, out=out), repeats)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20,
                        help="samples per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    # Each column: (the baseline its extra time is over, its step builder).
    baselines = {"SGD": _keras_step(lambda: keras.optimizers.SGD(0.01))}
    columns = {
        "use_ema": ("SGD", _keras_step(
            lambda: keras.optimizers.SGD(0.01, use_ema=True)
        )),
        "keras-ema": ("SGD", _keras_step(
            lambda: keras_ema.ExponentialMovingAverage(keras.optimizers.SGD(0.01))
        )),
        "keras-ema k=4": ("SGD", _keras_step(
            lambda: keras_ema.ExponentialMovingAverage(
                keras.optimizers.SGD(0.01), update_every=4
            )
        )),
    }
    model_garden = _model_garden_steps()
    if model_garden is not None:
        baselines["tf_keras SGD"], averaged = model_garden
        columns["Model Garden"] = ("tf_keras SGD", averaged)

    widths = {name: max(8, len(name) + 3) for name in baselines}
    print(f"backend: {keras.backend.backend()}; extra time / one-pass bound")
    print(f"{'shape':>14} "
          + " ".join(f"{name + ' ms':>{widths[name]}}" for name in baselines)
          + f" {'bound ms':>9} "
          + " ".join(f"{name:>14}" for name in columns))
    for count, size in SHAPES:
        rng = np.random.default_rng(0)
        values = [rng.random(size, dtype="float32") for _ in range(count)]
        grads = [keras.ops.convert_to_tensor(v) for v in values]

        # Every step is built once, then timed in rounds that take the
        # variants in turn: the state of the process drifts over minutes
        # (a whole row moved 2x between runs timed one variant after the
        # other), so each ratio is the median over rounds of that round's
        # ratio.
        builds = {**baselines, **{n: b for n, (_, b) in columns.items()}}
        steps = {name: build(values, grads) for name, build in builds.items()}
        times = {name: [] for name in steps}
        bounds = []
        for r in range(args.rounds):
            names = list(steps)[r % len(steps):] + list(steps)[:r % len(steps)]
            for name in names:
                times[name].append(_median_seconds(
                    steps[name], args.repeats, calls=STEPS_PER_SAMPLE
                ))
            bounds.append(_bound_seconds(count, size, args.repeats))
        del steps
        plain = {name: float(np.median(times[name])) for name in baselines}
        bound = float(np.median(bounds))
        ratios = [
            float(np.median([
                (t - b) / bound_r for t, b, bound_r in
                zip(times[name], times[baseline], bounds)
            ]))
            for name, (baseline, _) in columns.items()
        ]
        print(f"{count:>5} x {size:<7} "
              + " ".join(f"{plain[name] * 1e3:{widths[name]}.2f}" for name in baselines)
              + f" {bound * 1e3:9.3f} "
              + " ".join(f"{r:13.1f}x" for r in ratios))


if __name__ == "__main__":
    main()
