"""`sweep_sigma_rel`: the best post-hoc EMA width, chosen on validation data."""

import dataclasses

import keras
import numpy as np

from keras_ema import _atomic
from keras_ema import _validation
from keras_ema import batch_norm
from keras_ema import synthesis

@dataclasses.dataclass
class SweepResult:
    """What `sweep_sigma_rel` measured.

    Attributes:
        metric: The metric that chose the best width.
        results: One dict per `sigma_rel`, in order: `{"sigma_rel": ...,
            <metric name>: value, ...}`, every metric of `evaluate`.
        raw: The metrics of the model's own weights before the sweep.
        best: The entry of `results` with the best `metric`.
        figure: The matplotlib figure, when a plot was made.
        lawa: With `lawa` given, the metrics of the average of its
            checkpoints, `{"checkpoints": <how many>, <metric name>: value,
            ...}`; else `None`.
    """

    metric: str
    results: list
    raw: dict
    best: dict
    figure: object = None
    lawa: dict = None

    def table(self):
        """The results as text, a line per `sigma_rel`, best marked."""
        names = [k for k in self.results[0] if k != "sigma_rel"]
        lines = ["sigma_rel  " + "  ".join(f"{n:>10}" for n in names)]
        for row in self.results:
            mark = "  <- best" if row is self.best else ""
            lines.append(f"{row['sigma_rel']:9.3f}  " + "  ".join(
                f"{row[n]:10.4f}" for n in names) + mark)
        lines.append("raw        " + "  ".join(
            f"{self.raw.get(n, float('nan')):10.4f}" for n in names))
        if self.lawa is not None:
            label = f"lawa k={self.lawa['checkpoints']}"
            lines.append(f"{label:<9}  " + "  ".join(
                f"{self.lawa.get(n, float('nan')):10.4f}" for n in names))
        return "\n".join(lines)


def sweep_sigma_rel(
    directory,
    model,
    sigma_rels,
    validation_data,
    metric="loss",
    step=None,
    batch_size=None,
    update_bn_data=None,
    keep_best=False,
    plot=None,
    verbose=1,
    lawa=None,
):
    """Evaluates the post-hoc EMA of each `sigma_rel` and picks the best.

    For each width, `keras_ema.synthesize` builds the average from the
    snapshots of `directory` into `model`, which is then evaluated on
    `validation_data`; the raw weights are evaluated too, as a baseline,
    and with `lawa`, the average of the last checkpoints of the run. Prints
    a table, and plots `metric` against `sigma_rel`, the raw weights'
    score as a horizontal line, when `plot` is given and matplotlib is
    installed. `model`'s variables are restored, bit for bit, at the end,
    also when an error or a Ctrl-C interrupts the sweep, unless `keep_best`.

    Args:
        directory: The folder of the snapshots (`keras_ema.PostHocSnapshots`).
        model: The trained, compiled `keras.Model` (its weights are restored
            after the sweep).
        sigma_rels: The widths to try, floats in (0, 0.2887].
        validation_data: What `fit` takes as `validation_data`: `(x, y)`
            or `(x, y, sample_weight)` of arrays, a `tf.data.Dataset`, a
            `keras.utils.PyDataset`, or a function that returns a fresh
            generator (or any of these), called for each evaluation. A
            generator or iterator itself is refused: the first evaluation
            would use it up.
        metric: The metric that picks the best width: `"loss"` (default) or
            a compiled metric's name. Higher is better for names with
            "acc", "auc", "precision", "recall", "f1", "iou" or "r2".
        step: The snapshot step to synthesize at (default: the last).
        batch_size: Passed to `evaluate`.
        update_bn_data: Data for `keras_ema.update_bn`, run on each
            synthesized average (and on the LAWA average) before it is
            evaluated (for BatchNorm statistics that were not averaged), in
            any form it takes but an iterator, which the first pass would
            use up.
        keep_best: If `True`, `model` ends holding the best average.
        plot: A file path for the plot (e.g. `"sweep.png"`), or `True` to
            only return the figure. Needs matplotlib.
        verbose: 1 prints the table, 0 prints nothing.
        lawa: The `keras_ema.CheckpointAveraging` callback of the same
            run: the uniform average of its last checkpoints (LAWA,
            `lawa.average(model)`) is evaluated too, as a row of the table
            and `SweepResult.lawa`. It does not compete for `best`.

    Returns:
        A `SweepResult`: `results`, `raw`, `best`, `lawa`, `figure`,
        `table()`.

    Example:

    ```python
    result = keras_ema.sweep_sigma_rel(
        "snapshots", model, [0.03, 0.05, 0.07, 0.10, 0.15],
        validation_data=(x_val, y_val), metric="accuracy", plot="sweep.png")
    print(result.best["sigma_rel"])
    ```
    """
    sigma_rels = [float(s) for s in sigma_rels]
    if not sigma_rels:
        raise ValueError(
            "sweep_sigma_rel requires at least one `sigma_rel`. Instead, "
            "pass e.g. sigma_rels=[0.05, 0.07, 0.10, 0.15]."
        )
    _validation.check_validation_data(validation_data, "sweep_sigma_rel")
    if lawa is not None:
        _check_lawa(lawa)
    # Each width makes a pass over it.
    batch_norm.check_options(update_bn_data, None, "sweep_sigma_rel")
    if plot is not None and plot is not False:
        _pyplot()  # a missing matplotlib fails before any work
    if keras.backend.backend() == "jax":
        model.jax_state_sync()
    saved = [np.array(keras.ops.convert_to_numpy(v)) for v in model.variables]
    kept = False
    try:
        raw = _validation.evaluate(model, validation_data, batch_size)
        if metric not in raw:
            raise ValueError(
                f"sweep_sigma_rel does not know metric={metric!r}: `evaluate` "
                f"returns {sorted(raw)}. Instead, pass one of them."
            )
        results = []
        for sigma_rel in sigma_rels:
            synthesis.synthesize(directory, model, sigma_rel, step=step)
            if update_bn_data is not None:
                batch_norm.update_bn(model, update_bn_data)
            results.append({"sigma_rel": sigma_rel, **_validation.evaluate(
                model, validation_data, batch_size)})
        lawa_logs = None
        if lawa is not None:
            checkpoints = len(lawa.files)
            lawa.average(model)
            if update_bn_data is not None:
                batch_norm.update_bn(model, update_bn_data)
            lawa_logs = {"checkpoints": checkpoints, **_validation.evaluate(
                model, validation_data, batch_size)}
        higher = _validation.higher_is_better(metric)
        pick = max if higher else min
        best = pick(results, key=lambda row: row[metric])
        if keep_best:
            synthesis.synthesize(directory, model, best["sigma_rel"], step=step)
            if update_bn_data is not None:
                batch_norm.update_bn(model, update_bn_data)
            kept = True
    finally:
        if not kept:
            with _atomic.deferred_signals():
                for variable, value in zip(model.variables, saved):
                    variable.assign(value)
    result = SweepResult(metric, results, raw, best, lawa=lawa_logs)
    if plot is not None and plot is not False:
        result.figure = _plot(result, None if plot is True else plot)
    if verbose:
        print(result.table())
    return result


def _check_lawa(lawa):
    """Refuses, before any work, a `lawa` with nothing to average."""
    # By its methods: any object with `files` and `average(model)` will do.
    if not (callable(getattr(lawa, "average", None))
            and isinstance(getattr(lawa, "files", None), list)):
        raise ValueError(
            f"sweep_sigma_rel does not support lawa={lawa!r}. Instead, pass "
            "the run's `keras_ema.CheckpointAveraging` callback; for other "
            "files, evaluate `keras_ema.soup(files, model)` yourself."
        )
    if not lawa.files:
        raise ValueError(
            "sweep_sigma_rel does not support a `lawa` without checkpoints: "
            "there is nothing to average. Instead, train with that callback "
            "for at least `every` updates, or leave lawa=None."
        )


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "sweep_sigma_rel needs matplotlib for `plot`. Instead, install it "
            '(`pip install -e ".[demo]"`) or leave `plot=None`.'
        ) from None
    return plt


def _plot(result, path):
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 3.5))
    xs = [row["sigma_rel"] for row in result.results]
    axes.plot(xs, [row[result.metric] for row in result.results], "o-",
              label="post-hoc EMA")
    axes.axhline(result.raw[result.metric], color="gray", linestyle="--",
                 label="raw weights")
    if result.lawa is not None:
        axes.axhline(result.lawa[result.metric], color="orange",
                     linestyle=":",
                     label=f"LAWA (k={result.lawa['checkpoints']})")
    axes.axvline(result.best["sigma_rel"], color="green", alpha=0.3)
    axes.set_xlabel("sigma_rel")
    axes.set_ylabel(f"validation {result.metric}")
    axes.set_title(f"Post-hoc EMA sweep ({keras.backend.backend()})")
    axes.legend()
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
    plt.close(figure)
    return figure
