"""How many graph ops an EMA update costs on TensorFlow, in raw TensorFlow.

With thousands of small variables a TensorFlow step costs per op, not per
byte. This times, in one `tf.function` step after a plain SGD update of
`--count` variables of `--size` float32 each, four ways to move their
averages, and prints each one's extra time over the SGD step as a multiple of
the one-pass bound (numpy reading two arrays and writing one of the same total
size):

- `assign_sub`: `average.assign_sub(factor * (average - weight))`, five ops;
- `fused`: `ResourceApplyGradientDescent(average, factor, average - weight)`,
  four ops, what keras-ema does for a large weight;
- `flat`: the averages as one flat variable, moved by one fused op from the
  concatenated weights: two ops per variable (read, reshape) plus three,
  what keras-ema does for small weights (`keras_ema/_packing.py`);
- `xla`: the `assign_sub` form in a nested XLA-compiled function.

    python benchmarks/tf_update_forms.py --count 2000 --size 1000
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def _median_seconds(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    def arrays():
        return [rng.random(args.size, dtype="float32") for _ in range(args.count)]

    weights = [tf.Variable(v) for v in arrays()]
    averages = [tf.Variable(v) for v in arrays()]
    flat = tf.Variable(np.concatenate(arrays()))
    grads = [tf.constant(v) for v in arrays()]
    factor = tf.Variable(0.01)

    def sgd():
        for weight, grad in zip(weights, grads):
            weight.assign_sub(0.01 * grad)

    def assign_sub():
        sgd()
        f = factor.read_value()
        for weight, average in zip(weights, averages):
            average.assign_sub(f * (average - weight))

    def fused():
        sgd()
        f = factor.read_value()
        for weight, average in zip(weights, averages):
            tf.raw_ops.ResourceApplyGradientDescent(
                var=average.handle, alpha=f,
                delta=average.read_value() - weight.read_value(),
            )

    def flat_buffer():
        sgd()
        joined = tf.concat([tf.reshape(w.read_value(), [-1]) for w in weights], 0)
        tf.raw_ops.ResourceApplyGradientDescent(
            var=flat.handle, alpha=factor.read_value(),
            delta=flat.read_value() - joined,
        )

    @tf.function(jit_compile=True)
    def xla_averages(f):
        for weight, average in zip(weights, averages):
            average.assign_sub(f * (average - weight))

    def xla():
        sgd()
        xla_averages(factor.read_value())

    a, b, out = (np.random.rand(args.count * args.size).astype("float32")
                 for _ in range(3))
    bound = _median_seconds(lambda: np.add(a, b, out=out), args.repeats)
    plain = _median_seconds(tf.function(sgd), args.repeats)
    print(f"{args.count} x {args.size}: SGD step {plain * 1e3:.2f} ms, "
          f"bound {bound * 1e3:.3f} ms; extra time / bound:")
    for name, fn in [("assign_sub", assign_sub), ("fused", fused),
                     ("flat", flat_buffer), ("xla", xla)]:
        seconds = _median_seconds(tf.function(fn), args.repeats)
        print(f"  {name:<11} {(seconds - plain) / bound:6.1f}x")


if __name__ == "__main__":
    main()
