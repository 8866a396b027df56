"""The post-hoc EMA demo: one training run, every average width afterwards.

Trains the CNN of `keras_ema.demo` on scikit-learn's digits once, in the
same noisy set-up (SGD with a high learning rate, small batches), with
`keras_ema.PostHocEMA`, which keeps two power-function averages of the
weights (`sigma_rel` 0.05 and 0.10), and `keras_ema.PostHocSnapshots`,
which saves them about twenty times over the run. After training,
`keras_ema.sweep_sigma_rel` synthesizes from the snapshots the average of
each of eight widths, from 0.02 to 0.25, validates it, and picks the best,
without training again (EDM2, Karras et al. 2024). The demo prints the
sweep's table, raw weights included, plots it, and exports the best average
as a plain `.keras` file:

    python -m keras_ema.posthoc_demo        # about 30 s on 2 CPU cores (*)
    python -m keras_ema.demo --posthoc      # the same
    python -m keras_ema.posthoc_demo --help

(*) With TensorFlow or JAX; PyTorch, whose Keras steps run eagerly, takes
a few minutes.

Needs scikit-learn and matplotlib (`pip install -e ".[demo]"`), imported
only when the demo runs.
"""

import argparse
import glob
import math
import os
import sys

import keras

import keras_ema
from keras_ema import _digits

# The widths kept during training: EDM2's.
TRACKED = (0.05, 0.10)
# The widths tried after training, up to nearly the widest (0.2887, the
# plain mean of the whole run).
SWEPT = (0.02, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20, 0.25)
# Snapshots over the run: EDM2 asks for about 8 or more per tracked width.
SNAPSHOTS = 20


def train(directory, epochs=40, batch_size=16, learning_rate=0.05, seed=0,
          verbose=1):
    """Trains the CNN on the digits once, writing snapshots of the averages.

    The optimizer is `demo.train`'s SGD (momentum 0.9, `global_clipnorm`)
    wrapped in `PostHocEMA(sigma_rels=TRACKED)`;
    `PostHocSnapshots(directory)` saves its averages `SNAPSHOTS` times, at
    evenly spaced updates, and at the end.

    Args:
        directory: The folder of the snapshots. Snapshots left there by an
            earlier run are removed: they belong to other weights.
        epochs: Int, epochs to train.
        batch_size: Int, samples per update.
        learning_rate: Float, SGD's learning rate.
        seed: Int, seeds the split, the initial weights and the shuffling.
        verbose: Passed to `fit`: 2 prints a line per epoch, 1 shows
            Keras' progress bar, 0 nothing.

    Returns:
        `(model, validation, every)`: the trained model (raw weights in),
        the held-out digits `(x_val, y_val)` and the updates between
        snapshots.
    """
    keras.utils.set_random_seed(seed)
    (x_train, y_train), validation = _digits.load_digits(seed)
    for stale in glob.glob(os.path.join(directory, "snapshot-*.npz*")):
        os.remove(stale)
    model = _digits.build_model()
    model.compile(
        optimizer=keras_ema.PostHocEMA(
            _digits.sgd(learning_rate),
            sigma_rels=TRACKED,
        ),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    updates = epochs * math.ceil(len(x_train) / batch_size)
    every = max(1, round(updates / SNAPSHOTS))
    model.fit(
        x_train,
        y_train,
        batch_size=batch_size,
        epochs=epochs,
        verbose=verbose,
        callbacks=[keras_ema.PostHocSnapshots(directory, every=every)],
    )
    return model, validation, every


def export_synthesized(directory, model, sigma_rel, filepath):
    """Saves a plain copy of `model` holding the average of `sigma_rel`.

    The copy is rebuilt from `model`'s config without its compile state, as
    `keras_ema.export_averaged` does, so that `keras.models.load_model`
    reads the file where keras_ema is not installed; the synthesis goes into
    the copy, and `model` keeps its raw weights.

    Returns:
        The copy, a `keras.Model`.
    """
    config = keras.saving.serialize_keras_object(model)
    # Compiling the copy would bring the keras_ema optimizer into the file.
    config.pop("compile_config", None)
    copy = keras.saving.deserialize_keras_object(
        config, custom_objects={type(model).__name__: type(model)}
    )
    # The variables that are not averaged, if any, keep the raw weights.
    copy.set_weights(model.get_weights())
    keras_ema.synthesize(directory, copy, sigma_rel)
    copy.save(filepath)
    return copy


def conclusion(result):
    """One line: the best width and its score against the raw weights'."""
    best, raw = result.best[result.metric], result.raw[result.metric]
    return (
        f"Best: sigma_rel {result.best['sigma_rel']:g}, validation "
        f"{result.metric} {best:.4f} against {raw:.4f} for the raw weights "
        f"({best - raw:+.4f})."
    )


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_ema.posthoc_demo",
        description=(
            "Train a small CNN on scikit-learn's digits once with "
            "PostHocEMA and PostHocSnapshots, then synthesize, validate and "
            "plot the post-hoc EMA of several widths sigma_rel, and export "
            "the best one. Writes the snapshots, the plot and the model to "
            "--output-dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _digits.add_run_arguments(
        parser, 40, "keras_ema_posthoc_demo",
        "folder for snapshots/, posthoc_sweep.png and "
        "digits_posthoc_ema.keras",
    )
    parser.add_argument("--quiet", action="store_true",
                        help="no line per epoch, only the table and the "
                             "conclusion")
    return parser


def main(argv=None):
    """Runs the demo; `argv` defaults to the command line's arguments."""
    args = _parser().parse_args(argv)
    _digits.start("python -m keras_ema.posthoc_demo")
    os.makedirs(args.output_dir, exist_ok=True)
    directory = os.path.join(args.output_dir, "snapshots")
    print(
        f"Training a CNN on scikit-learn's digits for {args.epochs} epochs: "
        f"SGD(learning_rate={args.learning_rate}, momentum=0.9, "
        f"global_clipnorm={_digits.CLIPNORM}), batch size {args.batch_size}, "
        f"PostHocEMA(sigma_rels={TRACKED}).",
        flush=True,
    )
    model, validation, every = train(
        directory,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        verbose=0 if args.quiet else 2,
    )
    print(f"\nWrote a snapshot every {every} updates to {directory}. "
          "Post-hoc EMA on the validation digits:\n", flush=True)
    png = os.path.join(args.output_dir, "posthoc_sweep.png")
    result = keras_ema.sweep_sigma_rel(
        directory, model, SWEPT, validation_data=validation,
        metric="accuracy", plot=png, verbose=0,
    )
    print(result.table())
    print(f"\n{conclusion(result)}")
    print(f"\nWrote the plot to {png}")
    exported = os.path.join(args.output_dir, "digits_posthoc_ema.keras")
    export_synthesized(directory, model, result.best["sigma_rel"], exported)
    print(f"Wrote the average of sigma_rel {result.best['sigma_rel']:g} to "
          f"{exported} (keras.models.load_model reads it without keras_ema)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
