"""`soup` and `greedy_soup`: averages of the weights of saved models."""

import dataclasses
import math
import numbers
import os

import keras
import numpy as np

from keras_ema import _atomic
from keras_ema import _soup_files
from keras_ema import _validation
from keras_ema import batch_norm


def soup(files, model, *, weights=None, update_bn=None):
    """Writes the average of the weights saved in `files` into `model`.

    A model soup (Wortsman et al., 2022) is the average of the weights of
    several models of one architecture: fine-tunings of one pre-trained
    model, or the last checkpoints of one run (checkpoint averaging, LAWA).
    No training: the files that `model.save`, `model.save_weights` or
    `keras.callbacks.ModelCheckpoint` wrote are averaged, variable by
    variable, `sum_i weights[i] * file_i / sum_i weights[i]`, in float64,
    then written into `model` in its variables' dtypes.

    Only the model's variables are averaged: an optimizer in a file (also an
    `ExponentialMovingAverage` and its averages) is ignored. Non-trainable
    statistics (BatchNorm moving mean and variance) are averaged too; pass
    `update_bn` to recompute them for the soup instead. Variables that are
    not floats (counters, lookup tables) must be equal in every file, and
    are taken as they are.

    The files are read one at a time, one variable at a time: whatever
    their number, the memory needed is about two copies of the model (the
    float64 sums). Every file is checked against the model before any is
    averaged, and nothing is written into `model` until the soup is
    complete: a file that does not match, an error or a Ctrl-C leaves
    `model` as it was.

    Args:
        files: A list of paths of `.keras` and `.weights.h5` files, saved
            by models of `model`'s architecture.
        model: A built `keras.Model` of that architecture (e.g. the training
            script's, or `keras.models.load_model` of one of the files). It
            receives the soup.
        weights: Optional list of non-negative numbers, one per file (not
            all zero), in the order of `files`: the weight of each file in
            the average. Default: the same for all.
        update_bn: Optional data for `keras_ema.update_bn`, in any form it
            takes: the BatchNormalization statistics of the soup are
            recomputed on it.

    Returns:
        `model`, holding the soup.

    Example:

    ```python
    # Files that `keras.callbacks.ModelCheckpoint` wrote during training.
    keras_ema.soup(["ckpt_08.keras", "ckpt_09.keras", "ckpt_10.keras"], model)
    model.evaluate(x_val, y_val)
    ```

    The same from a shell, into a plain `.keras` file:
    `python -m keras_ema soup soup.keras ckpt_08.keras ckpt_09.keras
    ckpt_10.keras`.
    """
    _check_update_bn(update_bn, model, "soup")
    ingredients = _Ingredients(files, model, "soup")
    weights = _check_weights(weights, ingredients.files)
    total = _Sum(ingredients)
    for filepath, weight in zip(ingredients.files, weights):
        total.add(filepath, weight)
    values = total.mean()
    recorded = _record(model) if update_bn is not None else None
    _assign(ingredients.slots, values)
    if update_bn is not None:
        try:
            batch_norm.update_bn(model, update_bn)
        except BaseException:
            _put_back(recorded)
            raise
    return model


@dataclasses.dataclass
class SoupResult:
    """What `greedy_soup` measured.

    Attributes:
        metric: The metric that chose the ingredients.
        results: One dict per file, in the order they were tried (best
            alone first): `{"file": path, "score": its own score,
            "soup_score": the score of the soup with it (its own for the
            first), "kept": whether it stayed in the soup}`.
        kept: The paths of the files in the soup, in the order they were
            added.
        score: The soup's score.
    """

    metric: str
    results: list
    kept: list
    score: float

    def table(self):
        """The results as text, a line per file, in the order tried."""
        width = max(len("file"), *(len(row["file"]) for row in self.results))
        lines = [f"{'file':<{width}}  {self.metric:>10}  "
                 f"{'soup ' + self.metric:>12}  kept"]
        for row in self.results:
            lines.append(
                f"{row['file']:<{width}}  {row['score']:10.4f}  "
                f"{row['soup_score']:12.4f}  {'yes' if row['kept'] else 'no'}"
            )
        lines.append(f"{f'soup of {len(self.kept)}':<{width}}  {'':>10}  "
                     f"{self.score:12.4f}")
        return "\n".join(lines)


def greedy_soup(
    files,
    model,
    validation_data,
    metric="loss",
    *,
    update_bn=None,
    batch_size=None,
    verbose=1,
):
    """Builds the greedy soup of `files`, chosen on validation data.

    The greedy soup of Wortsman et al. (2022, "Model soups", Recipe 1):
    each file's weights are evaluated alone on `validation_data`, and the
    files sorted by that score, best first. The soup starts as the best
    one; each next file is added to it, the soup being the uniform average
    of the files kept, and stays only if the soup's score does not get worse
    (it may stay equal). A file that would spoil the soup (a fine-tuning
    that went elsewhere) is left out; the soup is never worse on the
    validation data than the best file alone.

    The files are read as by `keras_ema.soup`: checked against the model
    before any work, by blocks of a variable at a time, the sum of those
    kept in float64. Memory: about three copies of the model (those sums,
    and the model's weights, kept to put back), whatever the number of
    files. `model` ends holding the soup; an error or a Ctrl-C leaves it as
    it was, bit for bit.

    Args:
        files: A list of paths of `.keras` and `.weights.h5` files, saved
            by models of `model`'s architecture.
        model: A built, compiled `keras.Model` of that architecture: its
            `evaluate` gives the scores. It receives the soup.
        validation_data: What `fit` takes as `validation_data`: `(x, y)`
            or `(x, y, sample_weight)` of arrays, a `tf.data.Dataset`, a
            `keras.utils.PyDataset`, or a function that returns a fresh
            generator (or any of these), called for each evaluation.
        metric: The score: `"loss"` (default) or a compiled metric's name.
            Higher is better for names with "acc", "auc", "precision",
            "recall", "f1", "iou" or "r2"; lower for the others.
        update_bn: Optional data for `keras_ema.update_bn`, run on every
            set of weights before it is evaluated (each file alone too, so
            that all scores are measured alike) and on the final soup.
        batch_size: Passed to `evaluate`.
        verbose: 1 prints the table, 0 prints nothing.

    Returns:
        A `SoupResult`: `results`, `kept`, `score`, `table()`.

    Example:

    ```python
    result = keras_ema.greedy_soup(
        ["finetune_1.keras", "finetune_2.keras", "finetune_3.keras"],
        model, validation_data=(x_val, y_val), metric="accuracy")
    print(result.kept)
    ```
    """
    _validation.check_validation_data(
        validation_data, "greedy_soup", "every soup tried")
    # Each evaluation makes a pass over it: no iterator.
    batch_norm.check_options(update_bn, None, "greedy_soup")
    _check_update_bn(update_bn, model, "greedy_soup")
    ingredients = _Ingredients(files, model, "greedy_soup")
    higher = _validation.higher_is_better(metric)
    recorded = _record(model)
    try:
        scores = []
        for filepath in ingredients.files:
            ingredients.assign(filepath)
            scores.append(_score(model, validation_data, metric, update_bn,
                                 batch_size))
        # Best first; a NaN score last; ties in the order of `files`.
        order = sorted(range(len(scores)), key=lambda i: (
            math.isnan(scores[i]), -scores[i] if higher else scores[i]))
        first = ingredients.files[order[0]]
        kept = _Sum(ingredients)
        kept.add(first, 1.0)
        best = scores[order[0]]
        results = [{"file": first, "score": best, "soup_score": best,
                    "kept": True}]
        for i in order[1:]:
            filepath = ingredients.files[i]
            kept.assign_mean_with(filepath)
            tried = _score(model, validation_data, metric, update_bn,
                           batch_size)
            # The paper's test, under which a NaN score is never kept.
            keep = tried >= best if higher else tried <= best
            if keep:
                # Read again rather than kept aside: a second float64 copy
                # of the model would cost as much as the sums.
                kept.add(filepath, 1.0)
                best = tried
            results.append({"file": filepath, "score": scores[i],
                            "soup_score": tried, "kept": keep})
        _assign(ingredients.slots, kept.mean())
        if update_bn is not None:
            batch_norm.update_bn(model, update_bn)
    except BaseException:
        _put_back(recorded)
        raise
    result = SoupResult(metric, results,
                        [row["file"] for row in results if row["kept"]], best)
    if verbose:
        print(result.table())
    return result


class _Ingredients:
    """The files of a soup, checked against the model's variables."""

    def __init__(self, files, model, user):
        if isinstance(files, (str, bytes, os.PathLike)):
            raise ValueError(
                f"{user} requires a list of files. Received: files={files!r}. "
                f"Instead, pass e.g. files=[{os.fspath(files)!r}, ...]."
            )
        self.files = [_soup_files.check_path(f, user) for f in files]
        if not self.files:
            raise ValueError(
                f"{user} does not support an empty list of files: there is "
                "nothing to average. Instead, pass the paths of the saved "
                "models, e.g. files=['a.keras', 'b.keras']."
            )
        self.user = user
        self.slots, known = _soup_files.model_slots(model, user)
        for filepath in self.files:
            with _soup_files.open_weights(filepath, user) as h5:
                found = _soup_files.differences(h5, self.slots, known)
            if found:
                raise ValueError(
                    f"{user} does not support files whose variables differ "
                    f"from the model's: in {filepath!r}, "
                    + "; ".join(found[:3])
                    + (f" (and {len(found) - 3} more)" if len(found) > 3
                       else "")
                    + ". Instead, pass files saved by models of the "
                    "model's architecture (the same layers, in the same "
                    "order)."
                )

    def assign(self, filepath):
        """Writes the values of `filepath` into the model, variable by
        variable."""
        with _soup_files.open_weights(filepath, self.user) as h5:
            for slot in self.slots:
                value = np.empty(slot.shape, slot.dtype)
                for rows, block in _soup_files.blocks(h5, slot):
                    value[rows] = block
                slot.variable.assign(value)


class _Sum:
    """Weighted float64 sums of the files' floats; their other variables,
    which must be equal in every file."""

    def __init__(self, ingredients):
        self.ingredients = ingredients
        self.slots = ingredients.slots
        self.sums = [np.zeros(slot.shape, np.float64) if slot.is_float
                     else None for slot in self.slots]
        self.total = 0.0
        self.first = None

    def add(self, filepath, weight):
        with _soup_files.open_weights(filepath, self.ingredients.user) as h5:
            for i, slot in enumerate(self.slots):
                if not slot.is_float:
                    self.sums[i] = self._same(h5, i, filepath)
                    continue
                # Block by block: the float64 product of a whole large
                # variable would cost twice its size.
                for rows, block in _soup_files.blocks(h5, slot):
                    self.sums[i][rows] += np.multiply(block, weight,
                                                      dtype=np.float64)
        self.total += weight
        self.first = self.first or filepath

    def mean(self):
        """The average, in the variables' dtypes."""
        values = []
        for i, slot in enumerate(self.slots):
            value = self.sums[i]
            if slot.is_float:
                # In place, and each float64 sum dropped once converted.
                self.sums[i] = None
                value /= self.total
            values.append(value.astype(slot.dtype))
        return values

    def assign_mean_with(self, filepath):
        """Writes into the model, variable by variable, the uniform average
        of the files added and `filepath`; the sums stay as they were."""
        count = self.total + 1.0
        with _soup_files.open_weights(filepath, self.ingredients.user) as h5:
            for i, slot in enumerate(self.slots):
                if not slot.is_float:
                    slot.variable.assign(self._same(h5, i, filepath))
                    continue
                value = np.empty(slot.shape, slot.dtype)
                for rows, block in _soup_files.blocks(h5, slot):
                    value[rows] = (self.sums[i][rows] + block) / count
                slot.variable.assign(value)

    def _same(self, h5, i, filepath):
        """The value of variable `i`, not a float, in `h5`: refused unless
        it is that of the files added before."""
        slot, value = self.slots[i], _soup_files.read(h5, self.slots[i])
        if self.sums[i] is not None and not np.array_equal(
            self.sums[i], value
        ):
            raise ValueError(
                f"{self.ingredients.user} does not support averaging "
                f"variables that are not floats: {slot.key} "
                f"({slot.variable.path}, {slot.dtype}) differs between "
                f"{self.first!r} and {filepath!r}. Instead, pass files whose "
                "integer variables are equal (a quantized model: soup the "
                "models before quantizing them)."
            )
        return value


def _check_weights(weights, files):
    if weights is None:
        return [1.0] * len(files)
    weights = list(weights)
    bad = [w for w in weights if isinstance(w, bool)
           or not isinstance(w, numbers.Real) or not math.isfinite(w)
           or w < 0]
    if len(weights) != len(files) or bad or not sum(weights) > 0:
        raise ValueError(
            "soup requires `weights` to be one non-negative number per file, "
            f"not all zero. Received: weights={weights!r} for {len(files)} "
            "files. Instead, pass e.g. weights=[1.0] * len(files), or leave "
            "`weights=None` for a uniform soup."
        )
    return [float(w) for w in weights]


def _check_update_bn(data, model, user):
    if data is not None:
        batch_norm.check_has_layers(model, user)


def _score(model, data, metric, update_bn, batch_size):
    if update_bn is not None:
        batch_norm.update_bn(model, update_bn)
    logs = _validation.evaluate(model, data, batch_size)
    if metric not in logs:
        raise ValueError(
            f"greedy_soup does not know metric={metric!r}: `evaluate` "
            f"returns {sorted(logs)}. Instead, pass one of them."
        )
    return logs[metric]


def _record(model):
    if keras.backend.backend() == "jax":
        model.jax_state_sync()
    return [(v, np.array(keras.ops.convert_to_numpy(v))) for v in
            model.variables]


def _put_back(recorded):
    with _atomic.deferred_signals():
        for variable, value in recorded:
            variable.assign(value)


def _assign(slots, values):
    """Writes `values` into the slots' variables, all or nothing."""
    with _atomic.deferred_signals():
        for slot, value in zip(slots, values):
            slot.variable.assign(value)
