"""The comparison demo: raw weights, EMA, BEMA, LAWA and post-hoc EMA.

Trains the CNN of `keras_ema.demo` on scikit-learn's digits in the post-hoc
demo's noisy set-up, then validates, side by side, every kind of average
keras-ema keeps:

- raw: the last weights;
- EMA: `ExponentialMovingAverage(average_decay=0.99)`, the demo's;
- BEMA: the bias-corrected EMA, `schedules.BEMA()` with TRL's defaults;
- LAWA: the mean of the last `LAWA_K` checkpoints, one every `LAWA_EVERY`
  epochs (`CheckpointAveraging`, averaged with `keras_ema.soup`);
- post-hoc: the best `sigma_rel` of `sweep_sigma_rel` over the snapshots of
  `PostHocEMA` (the post-hoc demo's run).

BEMA's point, an average without the EMA's lag, shows early in a run: the
first run is also validated after `EARLY` epochs. Two runs of the same seed: the first keeps the EMA and BEMA (one optimizer
wrapping the other) and the checkpoints, the second the post-hoc profiles.
Averaging never changes the raw weights, so both runs train the same raw
weights; the demo checks it and says so.

    python -m keras_ema.compare_demo      # about a minute on 2 CPU cores (*)
    python -m keras_ema.demo --compare    # the same

(*) With TensorFlow or JAX; PyTorch, whose Keras steps run eagerly, takes
several minutes. Needs scikit-learn (`pip install -e ".[demo]"`).
"""

import argparse
import glob
import math
import os
import sys

import keras
import numpy as np

import keras_ema
from keras_ema import _digits
from keras_ema import posthoc_demo

EMA_DECAY = 0.99
LAWA_K = 10
LAWA_EVERY = 2  # epochs
# Where the EMA's lag shows: the first run is also validated after these
# epochs, raw weights, EMA and BEMA.
EARLY = 3


def train_averages(directory, epochs, batch_size, learning_rate, seed,
                   early=EARLY):
    """The first run: EMA and BEMA of one optimizer, LAWA's checkpoints.

    Returns:
        `(model, bema, checkpoints, early_scores)`: the trained model (its
        optimizer, the EMA, wraps `bema`), the BEMA optimizer, the callback
        that kept the checkpoints, and the `(accuracy, loss)` of the raw
        weights, the EMA and BEMA after `early` epochs.
    """
    keras.utils.set_random_seed(seed)
    (x_train, y_train), validation = _digits.load_digits(seed)
    # An earlier run's checkpoints are of other weights.
    for stale in glob.glob(os.path.join(directory, "checkpoint-*")):
        os.remove(stale)
    model = _digits.build_model()
    bema = keras_ema.ExponentialMovingAverage(
        _digits.sgd(learning_rate),
        average_decay=keras_ema.schedules.BEMA(),
        name="BEMA",
    )
    ema = keras_ema.ExponentialMovingAverage(bema, average_decay=EMA_DECAY)
    model.compile(optimizer=ema, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    per_epoch = math.ceil(len(x_train) / batch_size)
    checkpoints = keras_ema.CheckpointAveraging(
        directory, every=LAWA_EVERY * per_epoch, k=LAWA_K
    )
    early = min(early, epochs)
    model.fit(x_train, y_train, batch_size=batch_size, epochs=early,
              verbose=0, callbacks=[checkpoints])
    early_scores = scores(model, bema, validation)
    model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs,
              initial_epoch=early, verbose=0, callbacks=[checkpoints])
    return model, bema, checkpoints, early_scores


def scores(model, bema, validation):
    """`(accuracy, loss)` on `validation` of the raw weights, the EMA (the
    model's optimizer) and BEMA, in that order."""
    found = [_score(model, validation)]
    for optimizer in (model.optimizer, bema):
        with optimizer.averaged_weights():
            found.append(_score(model, validation))
    return found


def _score(model, validation):
    loss, accuracy = model.evaluate(*validation, verbose=0)
    return accuracy, loss


def compare(output_dir, epochs=40, batch_size=16, learning_rate=0.05, seed=0):
    """Trains both runs and validates each average.

    Returns:
        `(rows, same)`: a list of `(name, accuracy, loss, early)`, raw
        weights first (`early`: the accuracy after `EARLY` epochs, or None),
        and whether the two runs trained the same raw weights.
    """
    model, bema, checkpoints, early = train_averages(
        os.path.join(output_dir, "checkpoints"), epochs, batch_size,
        learning_rate, seed,
    )
    _, validation = _digits.load_digits(seed)
    names = ["raw", f"EMA (decay {EMA_DECAY})", "BEMA (TRL's defaults)"]
    rows = [(name, *score, first[0]) for name, score, first
            in zip(names, scores(model, bema, validation), early)]
    lawa = checkpoints.average(_digits.build_model())
    lawa.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    rows.append((f"LAWA (last {LAWA_K}, every {LAWA_EVERY} epochs)",
                 *_score(lawa, validation), None))
    posthoc, _, _ = posthoc_demo.train(
        os.path.join(output_dir, "snapshots"), epochs=epochs,
        batch_size=batch_size, learning_rate=learning_rate, seed=seed,
        verbose=0,
    )
    same = all(
        np.array_equal(keras.ops.convert_to_numpy(a),
                       keras.ops.convert_to_numpy(b))
        for a, b in zip(model.trainable_variables,
                        posthoc.trainable_variables)
    )
    result = keras_ema.sweep_sigma_rel(
        os.path.join(output_dir, "snapshots"), posthoc, posthoc_demo.SWEPT,
        validation_data=validation, metric="accuracy", verbose=0,
    )
    best = result.best
    rows.append((f"post-hoc (best sigma_rel {best['sigma_rel']:g})",
                 best["accuracy"], best["loss"], None))
    return rows, same


def table(rows, early=EARLY):
    """The rows as text, with each average's gain over the raw weights."""
    raw = rows[0][1]
    lines = [f"{'weights':<36}{'accuracy':>10}{'loss':>10}{'vs raw':>9}"
             f"{f'epoch {early}':>10}"]
    for name, accuracy, loss, first in rows:
        first = "-" if first is None else f"{first:.4f}"
        lines.append(f"{name:<36}{accuracy:10.4f}{loss:10.4f}"
                     f"{accuracy - raw:+9.4f}{first:>10}")
    return "\n".join(lines)


def _parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_ema.compare_demo",
        description=(
            "Train a small CNN on scikit-learn's digits and validate its "
            "raw weights, EMA, BEMA, LAWA and best post-hoc EMA side by "
            "side. Writes the checkpoints and snapshots to --output-dir."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _digits.add_run_arguments(parser, 40, "keras_ema_compare_demo",
                              "folder for checkpoints/ and snapshots/")
    return parser


def main(argv=None):
    """Runs the demo; `argv` defaults to the command line's arguments."""
    args = _parser().parse_args(argv)
    _digits.start("python -m keras_ema.compare_demo")
    os.makedirs(args.output_dir, exist_ok=True)
    print(
        f"Training a CNN on scikit-learn's digits for {args.epochs} epochs, "
        f"twice with seed {args.seed}: SGD(learning_rate="
        f"{args.learning_rate}, momentum=0.9, global_clipnorm="
        f"{_digits.CLIPNORM}), batch size {args.batch_size}.",
        flush=True,
    )
    rows, same = compare(args.output_dir, epochs=args.epochs,
                         batch_size=args.batch_size,
                         learning_rate=args.learning_rate, seed=args.seed)
    print("\nOn the validation digits, after the last epoch (and, where "
          f"the run keeps them, the accuracy after epoch {EARLY}):\n")
    print(table(rows))
    print("\nBoth runs trained the same raw weights." if same else
          "\nThe two runs' raw weights differ (the backend is not "
          "deterministic here): the post-hoc row is from the second run.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
