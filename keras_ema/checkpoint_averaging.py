"""`CheckpointAveraging`: the last k raw checkpoints of a run, and their
average (LAWA, latest weight averaging)."""

import contextlib
import os
import re
import warnings

import keras

from keras_ema import _state
from keras_ema._files import atomic_path
from keras_ema.snapshots import _set_aside
from keras_ema.soup import soup

_SUFFIXES = {True: ".weights.h5", False: ".keras"}


class CheckpointAveraging(keras.callbacks.Callback):
    """Keeps the last `k` checkpoints of the raw weights, for their average.

    LAWA (latest weight averaging; Kaddour 2022, Sanyal et al. 2023) takes
    the uniform average of the last few checkpoints of one run, spaced
    evenly: like an EMA it smooths out the noise of the last steps, but it
    needs no decay, no extra copy of the weights during training, and
    forgets everything older than its window. It helps most where the
    weights wander around a minimum at a constant learning rate (before a
    decay, or with none), and at the end of training.

    During `fit`, every `every` real optimizer updates (the optimizer's
    `iterations`: with `gradient_accumulation_steps`, or an
    `ExponentialMovingAverage` around the optimizer, the updates of the
    weights), writes the weights into `directory` as
    `checkpoint-<updates>.weights.h5` (`<updates>` zero-padded to ten
    digits), or with `save_weights_only=False` the whole model as
    `checkpoint-<updates>.keras`; then removes the oldest files beyond `k`.
    With `steps_per_execution` (or anything else that makes batch ends
    skip counts), the first batch end at or past each multiple of `every`
    writes, at the count it reached. Nothing is written at the end of
    training: the files stay evenly spaced, so choose an `every` that
    divides the run's length.

    The files always hold the raw weights, whatever an averaging optimizer
    has swapped into the model. Each is written aside and renamed into
    place, and the oldest are removed only once it is: a process killed at
    any moment leaves the complete checkpoints it had, at worst one more
    than `k`, and at most a stray `.tmp-<hex>.<name>` next to them.

    A resumed `fit` (the update count restored by
    `keras.callbacks.BackupAndRestore`, in either order, or by loading a
    checkpoint), with this callback or a new one on the same `directory`,
    continues the series from the files there. Files from beyond the update
    count training resumes at (left by the abandoned run) are renamed to
    `<name>.abandoned` with a warning, never deleted, and no longer used.

    `average(model)` writes the LAWA average of the kept files into a model
    (`keras_ema.soup`); `files` lists them; `keras_ema.sweep_sigma_rel(...,
    lawa=callback)` evaluates it beside the post-hoc EMA widths.

    Args:
        directory: The folder of the checkpoints; created if missing. It
            belongs to this callback: other files named
            `checkpoint-<ten digits>` with its suffix are taken for its own.
        every: Int >= 1: real optimizer updates between checkpoints.
        k: Int >= 1: how many of the latest checkpoints to keep and average
            (default 5).
        save_weights_only: If `True` (default), each file holds the model's
            weights (`save_weights`); else the whole model, optimizer
            included (`save`).

    Example:

    ```python
    lawa = keras_ema.CheckpointAveraging("lawa", every=100, k=5)
    model.fit(x, y, epochs=10, callbacks=[lawa])
    lawa.average(model)  # the mean of the last 5 checkpoints
    ```
    """

    def __init__(self, directory, every, k=5, save_weights_only=True):
        super().__init__()
        for name, value in (("every", every), ("k", k)):
            if not (isinstance(value, int) and not isinstance(value, bool)
                    and value >= 1):
                raise ValueError(
                    f"CheckpointAveraging does not support {name}={value!r}. "
                    f"Instead, pass an int >= 1, e.g. {name}="
                    f"{'1000' if name == 'every' else '5'}."
                )
        if not isinstance(save_weights_only, bool):
            raise ValueError(
                "CheckpointAveraging does not support "
                f"save_weights_only={save_weights_only!r}. Instead, pass "
                "True or False."
            )
        self.directory = _check_directory(directory)
        self.every = every
        self.k = k
        self.save_weights_only = save_weights_only
        self._pattern = re.compile(
            r"^checkpoint-(\d{10})" + re.escape(_SUFFIXES[save_weights_only])
            + "$"
        )
        # The update count of the last write, or of the start; None until
        # the first batch, when the count is known.
        self._last = None

    @property
    def files(self):
        """The paths of the kept checkpoints, oldest first (at most `k`)."""
        return [path for _, path in self._checkpoints()[-self.k:]]

    def average(self, model=None):
        """Writes the uniform average of `files` into `model`; returns it.

        `model` (default: the model this callback trained) gets the mean of
        every weight of the kept checkpoints (`keras_ema.soup`); its own
        weights are lost: pass a clone to keep them. Its optimizer, if any,
        is left as it is.

        Args:
            model: A `keras.Model` of the architecture that was trained.

        Returns:
            `model`, holding the average.
        """
        model = self.model if model is None else model
        if model is None:
            raise ValueError(
                "CheckpointAveraging.average does not support model=None "
                "before the callback has trained a model. Instead, pass the "
                "model to write the average into: `average(model)`."
            )
        averaging = _averaging_optimizer(model)
        if averaging is not None and averaging.averages_swapped_in:
            raise ValueError(
                "CheckpointAveraging.average does not support a model whose "
                "optimizer has its averages swapped in: swapping them out "
                "afterwards would put the raw weights back over the average. "
                "Instead, swap them out first (`swap_weights()`), or pass a "
                "clone of the model."
            )
        files = self.files
        if not files:
            raise ValueError(
                "CheckpointAveraging.average does not support an empty "
                f"folder: {self.directory!r} holds no checkpoint yet. "
                f"Instead, train for at least every={self.every} updates "
                "with this callback first."
            )
        return soup(files, model)

    # -- fit ------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        os.makedirs(self.directory, exist_ok=True)
        # A `BackupAndRestore` listed after this callback restores the
        # update count in its own `on_train_begin`: it is read at the first
        # batch.
        self._last = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._last is None:
            self._start()

    def on_train_batch_end(self, batch, logs=None):
        if self._last is None:
            self._start()
        updates = self._updates()
        if updates // self.every > self._last // self.every:
            self._write(updates)

    def _updates(self):
        # `self.model` attaches a JAX trainer's state to the variables first.
        iterations = self.model.optimizer.iterations
        return int(keras.ops.convert_to_numpy(iterations))

    def _start(self):
        updates = self._updates()
        for found, path in self._checkpoints():
            if found > updates:
                aside = _set_aside(path)
                warnings.warn(
                    f"keras-ema: the checkpoint {path} is from beyond this "
                    f"run's update count ({updates}); renamed to {aside} and "
                    "no longer averaged."
                )
        self._last = updates

    def _write(self, updates):
        name = f"checkpoint-{updates:010d}{_SUFFIXES[self.save_weights_only]}"
        path = os.path.join(self.directory, name)
        with _raw_weights_in(self.model), atomic_path(path) as temporary:
            if self.save_weights_only:
                self.model.save_weights(temporary)
            else:
                self.model.save(temporary)
        self._last = updates
        # Only now that the new file is whole: a kill never leaves fewer.
        for _, old in self._checkpoints()[:-self.k]:
            os.remove(old)

    def _checkpoints(self):
        """`(updates, path)` of this callback's files in `directory`, by
        update count."""
        if not os.path.isdir(self.directory):
            return []
        found = []
        for name in os.listdir(self.directory):
            match = self._pattern.match(name)
            if match:
                found.append(
                    (int(match.group(1)), os.path.join(self.directory, name))
                )
        return sorted(found)


def _check_directory(directory):
    if not isinstance(directory, (str, os.PathLike)):
        raise ValueError(
            f"CheckpointAveraging does not support directory={directory!r}. "
            "Instead, pass the path of a folder (`str` or `pathlib.Path`)."
        )
    directory = os.fspath(directory)
    if "://" in directory:
        raise ValueError(
            f"CheckpointAveraging does not support a remote directory "
            f"({directory!r}): it renames and removes files there. Instead, "
            "pass a local folder, and copy the files afterwards."
        )
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(
            f"CheckpointAveraging does not support directory={directory!r}, "
            "a file. Instead, pass the path of a folder (created if missing)."
        )
    return directory


def _averaging_optimizer(model):
    """The model's `ExponentialMovingAverage` (also within a
    `LossScaleOptimizer`), or None."""
    chain = _state.averaging_chain(getattr(model, "optimizer", None))
    return chain[0] if chain else None


@contextlib.contextmanager
def _raw_weights_in(model):
    """Within the block, the model holds its raw weights.

    An averaging optimizer with its averages in the model (put there by a
    callback earlier in the list, say) gets them swapped out for the block,
    then the same averages swapped in again: swaps are exact, so the model
    is back bit for bit.
    """
    opt = _averaging_optimizer(model)
    if opt is None or not opt.averages_swapped_in:
        yield
        return
    width = _width_in(opt)
    opt.swap_weights()
    try:
        yield
    finally:
        opt.swap_weights(**width)


def _width_in(opt):
    """What `opt.swap_weights` takes to swap in again the averages that are
    in now: with a `PostHocEMA`, the width, unless it is the first."""
    for sigma_rel in getattr(opt, "sigma_rels", ())[1:]:
        if opt.profile(sigma_rel).averages_swapped_in:
            return {"sigma_rel": sigma_rel}
    return {}
