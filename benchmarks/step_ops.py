"""What the compiled averaging step is made of: its operations, counted.

Timing cannot settle a difference of a few percent on a shared machine; the
compiled step itself can. For the shapes of `ema_overhead.py`, this traces
the step `ema_overhead.py` times (`opt.apply` in a `tf.function` on
TensorFlow, `opt.stateless_apply` on JAX) and prints the number of graph
operations (jaxpr equations on JAX) by type. Run it in two trees (e.g. a
worktree of main and a change) to see that a refactoring left the step as
it was: equal counts mean the same kernels per step.

Run:

    KERAS_BACKEND=tensorflow python benchmarks/step_ops.py   # or jax
"""

import collections
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402

CASES = [(2000, 1_000, 1), (400, 20_000, 1), (2000, 1_000, 4)]


def _counts(opt, variables, grads):
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda: opt.apply(grads, variables))
        graph = step.get_concrete_function().graph
        return collections.Counter(op.type for op in graph.get_operations())
    if backend == "jax":
        import jax

        def train(values, optimizer_values, grads):
            return opt.stateless_apply(optimizer_values, grads, values)

        jaxpr = jax.make_jaxpr(train)(
            [v.value for v in variables], [v.value for v in opt.variables],
            grads,
        )
        return collections.Counter(str(e.primitive) for e in jaxpr.jaxpr.eqns)
    raise SystemExit("step_ops.py: TensorFlow or JAX only (torch runs eagerly)")


def main():
    print(f"backend: {keras.backend.backend()}")
    for count, size, every in CASES:
        rng = np.random.default_rng(0)
        values = [rng.random(size, dtype="float32") for _ in range(count)]
        variables = [keras.Variable(v) for v in values]
        grads = [keras.ops.convert_to_tensor(v) for v in values]
        opt = keras_ema.ExponentialMovingAverage(
            keras.optimizers.SGD(0.01), update_every=every
        )
        opt.build(variables)
        counts = _counts(opt, variables, grads)
        top = ", ".join(f"{k} {n}" for k, n in counts.most_common(6))
        print(f"{count:>5} x {size:<6} update_every={every}: "
              f"{sum(counts.values())} ops ({top})")


if __name__ == "__main__":
    main()
