"""Averaged against raw weights over several seeds: the README's table.

Runs the demo's training (`keras_ema.demo.train`: a small CNN on
scikit-learn's digits, SGD with momentum 0.9 and global_clipnorm 5, batch
size 16, EMA decay 0.99, 20 epochs) once per seed and learning rate, and
reads the validation accuracy of the raw and of the averaged weights after
every epoch. Prints one line per run, then a Markdown table: the mean and
the standard deviation over the seeds (sample standard deviation, ddof=1) of
the final and of the best validation accuracy, for the raw weights, the
averaged ones, and their difference within each seed, plus the medians of
the final ones. Every seed from 0 to `--seeds - 1` is reported;
the seed also draws the train/validation split.

    nice python benchmarks/seeds.py --seeds 10              # about 5 minutes
    nice python benchmarks/seeds.py --seeds 3 --learning-rates 0.05
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_ema import demo  # noqa: E402


def run(seeds, learning_rate, epochs, decay, batch_size):
    """Trains once per seed, printing one line per run.

    Returns:
        `{"raw" | "averaged": {"final" | "best": array}}`, the validation
        accuracies, one per seed.
    """
    results = {w: {"final": [], "best": []} for w in ("raw", "averaged")}
    for seed in seeds:
        keras.backend.clear_session()
        start = time.perf_counter()
        _, history = demo.train(
            epochs=epochs, decay=decay, batch_size=batch_size,
            learning_rate=learning_rate, seed=seed, verbose=0,
        )
        accuracy = demo.summarize(history)["accuracy"]
        for weights, values in accuracy.items():
            for which, value in values.items():
                results[weights][which].append(value)
        print(
            f"learning rate {learning_rate} seed {seed}: validation accuracy "
            f"final raw {accuracy['raw']['final']:.4f} averaged "
            f"{accuracy['averaged']['final']:.4f}, best raw "
            f"{accuracy['raw']['best']:.4f} averaged "
            f"{accuracy['averaged']['best']:.4f} "
            f"({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return {
        weights: {which: np.array(v) for which, v in values.items()}
        for weights, values in results.items()
    }


def _mean_std(values):
    return f"{values.mean():.4f} ± {values.std(ddof=1):.4f}"


def _difference(raw, averaged):
    """Mean ± std of averaged - raw, and in how many seeds it is >0/=0/<0."""
    difference = averaged - raw
    counts = "/".join(
        str(int(c.sum()))
        for c in (difference > 0, difference == 0, difference < 0)
    )
    return (
        f"{difference.mean():+.4f} ± {difference.std(ddof=1):.4f} ({counts})"
    )


def table(results_by_rate):
    """The Markdown table of `run`'s results, one block per learning rate."""
    lines = [
        "| SGD learning rate | weights | final val accuracy | final, median "
        "| best val accuracy |",
        "|---|---|---|---|---|",
    ]
    for rate, results in results_by_rate.items():
        raw, averaged = results["raw"], results["averaged"]
        for label, values in ((rate, raw), ("", averaged)):
            name = "raw" if values is raw else "averaged"
            lines.append(
                f"| {label} | {name} | {_mean_std(values['final'])} "
                f"| {np.median(values['final']):.4f} "
                f"| {_mean_std(values['best'])} |"
            )
        final = _difference(raw["final"], averaged["final"])
        median = np.median(averaged["final"] - raw["final"])
        best = _difference(raw["best"], averaged["best"])
        lines.append(
            f"| | averaged − raw | {final} | {median:+.4f} | {best} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Validation accuracy of raw and averaged weights on the "
                    "digits over several seeds (the demo's set-up).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--seeds", type=int, default=10,
                        help="runs seeds 0 .. SEEDS-1")
    parser.add_argument("--learning-rates", type=float, nargs="+",
                        default=[0.05, 0.02],
                        help="SGD learning rates; 0.05 is the demo's noisy "
                             "set-up, 0.02 a calm one for comparison")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--decay", type=float, default=0.99)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = {
        rate: run(range(args.seeds), rate, args.epochs, args.decay,
                  args.batch_size)
        for rate in args.learning_rates
    }
    print()
    print(f"Digits, small CNN, {args.epochs} epochs, batch size "
          f"{args.batch_size}, SGD momentum 0.9 global_clipnorm "
          f"{demo.CLIPNORM}, EMA average_decay={args.decay}; "
          "mean ± standard deviation over seeds 0 to "
          f"{args.seeds - 1}; (a/b/c): averaged higher/equal/lower in a/b/c "
          "seeds.")
    print()
    print(table(results))
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
