"""The demo: raw against averaged weights on scikit-learn's digits.

Trains a small CNN on `sklearn.datasets.load_digits` (1,797 8x8 images that
ship with scikit-learn: nothing is downloaded) in a deliberately noisy
set-up, a high learning rate and small batches, so the last raw weights
keep jumping around the minimum (a clip of the gradient norm keeps them
from blowing up). `SwapAverageWeights(log_raw_metrics=True)`
validates both the averaged and the raw weights after every epoch. The demo
prints both, a summary, and writes a plot of both curves and the averaged
model:

    python -m keras_ema.demo          # about 20 seconds on 2 CPU cores
    python -m keras_ema.demo --help
    python -m keras_ema.demo --posthoc  # keras_ema.posthoc_demo instead
    python -m keras_ema.demo --compare  # keras_ema.compare_demo instead

Needs scikit-learn and matplotlib (`pip install -e ".[demo]"` in keras-ema's
clone), imported only when the demo runs; without them it says so in one
line before it writes anything.
"""

import argparse
import os
import sys

import keras
import numpy as np

import keras_ema
from keras_ema import _digits
from keras_ema._digits import CLIPNORM
from keras_ema._digits import backend_name
from keras_ema._digits import build_model
from keras_ema._digits import load_digits
from keras_ema._digits import positive_int as _positive_int
from keras_ema._digits import start

__all__ = [
    "CLIPNORM", "backend_name", "build_model", "format_summary", "load_digits",
    "main", "plot", "plot_title", "start", "summarize", "train",
]

# The curves, in the order the summary and the plot list them: the key in
# `History.history` of each metric, on the raw weights and on the averages.
_CURVES = {
    "accuracy": ("val_raw_accuracy", "val_accuracy"),
    "loss": ("val_raw_loss", "val_loss"),
}


def train(
    epochs=20,
    decay=0.99,
    batch_size=16,
    learning_rate=0.05,
    seed=0,
    verbose=1,
    callbacks=(),
):
    """Trains the CNN on the digits, validating raw and averaged weights.

    The optimizer is SGD with momentum 0.9 and `global_clipnorm=5` (a guard
    against the rare blow-up at this learning rate, not a smoother) wrapped
    in `ExponentialMovingAverage(average_decay=decay)` (dynamic decay on);
    `SwapAverageWeights(log_raw_metrics=True)` logs `val_<name>` on the
    averages and `val_raw_<name>` on the raw weights.

    Args:
        epochs: Int, epochs to train.
        decay: Float in [0, 1], the `average_decay`.
        batch_size: Int, samples per update.
        learning_rate: Float, SGD's learning rate.
        seed: Int, seeds the split, the initial weights and the shuffling.
        verbose: Passed to `fit`: 1 shows Keras' progress bar, 0 nothing.
        callbacks: More callbacks for `fit`, run after the progress bar.

    Returns:
        `(model, history)`: the model (raw weights in, averages in its
        optimizer) and `History.history`, a dict of per-epoch lists.
    """
    keras.utils.set_random_seed(seed)
    (x_train, y_train), validation = load_digits(seed)
    model = build_model()
    optimizer = keras_ema.ExponentialMovingAverage(
        _digits.sgd(learning_rate),
        average_decay=decay,
    )
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        validation_data=validation,
        verbose=verbose,
        callbacks=[
            keras_ema.SwapAverageWeights(log_raw_metrics=True),
            # Listed, not left to `fit`, so that it finishes each epoch's
            # line before the callbacks below print theirs.
            keras.callbacks.ProgbarLogger(),
            *callbacks,
        ],
    )
    return model, history.history


def summarize(history):
    """Final and best value of each curve, on raw and averaged weights.

    Best is the highest accuracy and the lowest loss over the epochs.

    Returns:
        A dict `{metric: {"raw" | "averaged": {"final" | "best": float}}}`.
    """
    summary = {}
    for metric, keys in _CURVES.items():
        best = max if metric == "accuracy" else min
        summary[metric] = {
            weights: {
                "final": float(history[key][-1]),
                "best": float(best(history[key])),
            }
            for weights, key in zip(("raw", "averaged"), keys)
        }
    return summary


def format_summary(summary):
    """The output of `summarize` as a small text table."""
    lines = [f"{'validation':<16}{'raw':>8}{'averaged':>10}{'difference':>12}"]
    for metric, by_weights in summary.items():
        for which in ("final", "best"):
            raw = by_weights["raw"][which]
            averaged = by_weights["averaged"][which]
            lines.append(
                f"{which + ' ' + metric:<16}{raw:>8.4f}{averaged:>10.4f}"
                f"{averaged - raw:>+12.4f}"
            )
    return "\n".join(lines)


def plot(history, path, title=None):
    """Writes a PNG of the validation curves, raw against averaged weights.

    Two panels, validation accuracy and validation loss per epoch; each
    legend gives the final value of each curve. Draws on matplotlib's Agg
    canvas directly, so it needs no display and leaves pyplot's backend
    alone.

    Args:
        history: `History.history` of a `fit` with
            `SwapAverageWeights(log_raw_metrics=True)`.
        path: Where to write the PNG.
        title: Optional title above both panels.

    Returns:
        The matplotlib `Figure`.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    epochs = np.arange(1, len(history["val_accuracy"]) + 1)
    for ax, (metric, keys) in zip(axes, _CURVES.items()):
        for key, label, color in zip(
            keys, ("raw weights", "averaged weights"), ("tab:gray", "tab:blue")
        ):
            ax.plot(epochs, history[key], "o-", color=color, markersize=3,
                    label=f"{label} (final {history[key][-1]:.3f})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {metric}")
        # The first and the last epoch always have a tick.
        last = len(epochs)
        ticks = MaxNLocator(integer=True).tick_values(1, last)
        ax.set_xticks(sorted({1, last, *(int(t) for t in ticks
                                         if 1 <= t <= last)}))
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    axes[1].set_ylim(bottom=0)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=100)
    return figure


def plot_title(args):
    """The plot's title: the set-up of `args` and the backend."""
    return (
        f"digits on {backend_name()}: SGD lr {args.learning_rate}, "
        f"momentum 0.9, clipnorm {CLIPNORM:g}, batch {args.batch_size}, "
        f"EMA decay {args.decay}, seed {args.seed}"
    )


class _EpochReport(keras.callbacks.Callback):
    """Prints, after each epoch, the raw and averaged validation metrics."""

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [
            f"{metric} raw {logs[raw]:.4f} averaged {logs[averaged]:.4f}"
            for metric, (raw, averaged) in _CURVES.items()
        ]
        print(f"epoch {epoch + 1:>3}  validation  " + "  |  ".join(parts),
              flush=True)


def _decay(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a decay in [0, 1] such as 0.99, got {text}"
        )
    return value


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_ema.demo",
        description=(
            "Train a small CNN on scikit-learn's digits with a noisy set-up "
            "(high learning rate, small batches) and compare the validation "
            "accuracy and loss of the raw weights with those of their "
            "exponential moving average. Writes a plot and the averaged "
            "model to --output-dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--epochs", type=_positive_int, default=20,
                        help="epochs to train")
    parser.add_argument("--decay", type=_decay, default=0.99,
                        help="average_decay of the EMA, in [0, 1]: the "
                             "average spans about 1 / (1 - decay) updates; "
                             "the dynamic warm-up min(decay, (1 + n) / "
                             "(10 + n)) caps it early on")
    parser.add_argument("--batch-size", type=_positive_int, default=16,
                        help="samples per update")
    parser.add_argument("--learning-rate", type=float, default=0.05,
                        help="learning rate of SGD (momentum 0.9, "
                             "global_clipnorm 5)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the split, the weights and the shuffling")
    parser.add_argument("--output-dir", default="keras_ema_demo",
                        help="folder for digits_ema.png and "
                             "digits_ema.keras")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar and no per-epoch lines, only "
                             "the summary")
    parser.add_argument("--posthoc", action="store_true",
                        help="run the post-hoc EMA demo instead (python -m "
                             "keras_ema.posthoc_demo), passing it the other "
                             "arguments: --posthoc --help lists its own")
    parser.add_argument("--compare", action="store_true",
                        help="run the comparison demo instead (python -m "
                             "keras_ema.compare_demo: raw, EMA, BEMA, LAWA "
                             "and post-hoc EMA side by side), passing it the "
                             "other arguments")
    return parser


def main(argv=None):
    """Runs the demo; `argv` defaults to the command line's arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--posthoc" in argv:
        # Before parsing: the post-hoc demo has its own flags and defaults.
        from keras_ema import posthoc_demo

        argv.remove("--posthoc")
        return posthoc_demo.main(argv)
    if "--compare" in argv:
        from keras_ema import compare_demo

        argv.remove("--compare")
        return compare_demo.main(argv)
    args = _parser().parse_args(argv)
    start("python -m keras_ema.demo")
    os.makedirs(args.output_dir, exist_ok=True)
    print(
        f"Training a CNN on scikit-learn's digits for {args.epochs} epochs: "
        f"SGD(learning_rate={args.learning_rate}, momentum=0.9, "
        f"global_clipnorm={CLIPNORM}), "
        f"batch size {args.batch_size}, EMA with average_decay={args.decay}.",
        flush=True,
    )
    model, history = train(
        epochs=args.epochs,
        decay=args.decay,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        verbose=0 if args.quiet else 1,
        callbacks=() if args.quiet else (_EpochReport(),),
    )
    print()
    print(format_summary(summarize(history)))
    png = os.path.join(args.output_dir, "digits_ema.png")
    plot(history, png, title=plot_title(args))
    print(f"\nWrote the plot to {png}")
    exported = os.path.join(args.output_dir, "digits_ema.keras")
    keras_ema.export_averaged(model, exported)
    print(f"Wrote the averaged model to {exported} "
          "(keras.models.load_model reads it without keras_ema)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
