"""Time per `model.fit` train step of a small CNN, with and without averages.

Trains the same small CNN (same initial weights) on generated 32x32 RGB
images with plain `SGD(0.05, momentum=0.9)`, Keras' built-in
`SGD(..., use_ema=True)`, and keras-ema's wrapper around the same SGD
(default settings, and `update_every=4`). A callback reads the clock at the
end of every train batch; the time of a step is the difference between two
consecutive batch ends. Only training steps are timed: no validation, no
`SwapAverageWeights` callback.

The variants take turns: each round fits every variant for `--steps` steps
(one epoch), starting with a different variant each round, after one
warm-up epoch per variant that compiles the step. A round yields each
variant's median step time and its overhead over plain SGD in the same
round; the script prints the medians of those over the rounds.

    KERAS_BACKEND=tensorflow python benchmarks/fit_overhead.py
    KERAS_BACKEND=jax python benchmarks/fit_overhead.py --rounds 9

On a busy machine the rounds differ by more than the overheads: compare
the range over rounds with the overheads before trusting them.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_ema  # noqa: E402

CLASSES = 10


def _sgd(**kwargs):
    return keras.optimizers.SGD(0.05, momentum=0.9, **kwargs)


VARIANTS = {
    "SGD": _sgd,
    "SGD use_ema": lambda: _sgd(use_ema=True),
    "keras-ema": lambda: keras_ema.ExponentialMovingAverage(_sgd()),
    "keras-ema k=4": lambda: keras_ema.ExponentialMovingAverage(
        _sgd(), update_every=4
    ),
}


def build_model():
    layers = keras.layers
    model = keras.Sequential([keras.Input((32, 32, 3))])
    for filters in (16, 32, 64):
        for _ in range(2):
            model.add(layers.Conv2D(filters, 3, padding="same", use_bias=False))
            model.add(layers.BatchNormalization())
            model.add(layers.ReLU())
        model.add(layers.MaxPooling2D())
    model.add(layers.Flatten())
    model.add(layers.Dense(128, activation="relu"))
    model.add(layers.Dense(CLASSES, activation="softmax"))
    return model


def make_data(samples, seed):
    """Noise images whose class is a fixed linear function of their mean
    colour: something to learn, so that the weights move but stay finite."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 32, 32, 3)).astype("float32")
    projection = rng.standard_normal((3, CLASSES)).astype("float32")
    y = np.argmax(x.mean(axis=(1, 2)) @ projection, axis=1).astype("int32")
    return x, y


class StepTimer(keras.callbacks.Callback):
    """Records `time.perf_counter()` at the end of every train batch."""

    def on_train_begin(self, logs=None):
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        # JAX dispatches asynchronously: wait for the step's new state.
        state = getattr(self.model, "_jax_state", None)
        if state is not None:
            import jax

            jax.block_until_ready(state)
        self.times.append(time.perf_counter())

    def step_seconds(self, skip):
        return np.diff(self.times)[skip:]


def _unshare_weights(model):
    """Gives each weight its own buffer again after a `use_ema` fit.

    At the end of `fit`, Keras' `use_ema` assigns each average to its weight;
    on JAX both variables then hold the same array, and the next `fit`
    fails, donating that buffer twice.
    """
    for variable in model.trainable_variables:
        variable.assign(keras.ops.copy(variable.value))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100,
                        help="train steps per variant and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip", type=int, default=5,
                        help="step times dropped at the start of each epoch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.steps < args.skip + 2:
        parser.error("--steps must exceed --skip by at least 2")

    x, y = make_data(args.steps * args.batch_size, args.seed)
    keras.utils.set_random_seed(args.seed)
    initial = build_model().get_weights()
    models = {}
    for name, make in VARIANTS.items():
        model = build_model()
        model.set_weights(initial)
        model.compile(optimizer=make(), loss="sparse_categorical_crossentropy")
        models[name] = model

    timer = StepTimer()

    def fit(model):
        model.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False,
                  verbose=0, callbacks=[timer])
        if model.optimizer.use_ema:
            _unshare_weights(model)
        return timer.step_seconds(args.skip)

    for model in models.values():
        fit(model)

    names = list(VARIANTS)
    medians = {name: [] for name in names}
    overheads = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        this_round = {name: float(np.median(fit(models[name])))
                      for name in order}
        for name in names:
            medians[name].append(this_round[name])
            overheads[name].append(this_round[name] / this_round["SGD"] - 1)

    model = models["SGD"]
    print(f"backend: {keras.backend.backend()}, jit_compile: "
          f"{model.jit_compile}, {model.count_params():,} parameters, batch "
          f"size {args.batch_size}, {args.rounds} rounds of {args.steps} "
          f"steps per variant (first {args.skip} of each dropped)")
    print(f"{'variant':<14} {'ms/step':>8} {'range over rounds':>18} "
          f"{'overhead':>9}")
    for name in names:
        ms = np.array(medians[name]) * 1e3
        print(f"{name:<14} {np.median(ms):8.2f} "
              f"{f'{ms.min():.2f}-{ms.max():.2f}':>18} "
              f"{np.median(overheads[name]) * 100:+8.1f}%")


if __name__ == "__main__":
    main()
