"""`PostHocSnapshots`: snapshot files of `PostHocEMA`'s averages, for EDM2's
post-hoc synthesis (`synthesis.py`).

One file per snapshot, `snapshot-<step>.npz` (`step` zero-padded to ten
digits), written atomically. It holds a `meta` entry (JSON: `format` 2;
`step`, the real updates the averages had seen; `t`, those since
`start_step` that the averages reflect (the last averaging update); `run`,
the identity of the series; the `sigma_rels`; the snapshot `dtype`; and for
each averaged variable its `path`, `index` in `model.variables`, `shape` and
`dtype`), and one array per profile and variable, `"<profile>/<variable>"`.
Each array is in the snapshot dtype (bfloat16 as its raw 16 bits, `uint16`,
which numpy lacks), or in float32 where that dtype would turn a finite value
infinite: its own dtype says which. Files of format 1 (no `run`) still read.
"""

import contextlib
import json
import os
import re
import secrets
import warnings
import zipfile
import zlib

import keras
import numpy as np

from keras_ema import _binding
from keras_ema import posthoc_ema
from keras_ema._binding import find_in_model
from keras_ema._files import atomic_path

_NAME = re.compile(r"^snapshot-(\d{10})\.npz$")
_DTYPES = ("float32", "bfloat16", "float16")
_FORMAT = 2
_META_KEYS = ("step", "t", "sigma_rels", "dtype", "variables")
# What reading a file that is not a whole snapshot raises: a truncated or
# corrupt archive, another format, a missing entry, a pickle.
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, TypeError,
               IndexError, AttributeError, zipfile.BadZipFile, zlib.error)


class PostHocSnapshots(keras.callbacks.Callback):
    """Writes snapshots of `PostHocEMA`'s averages during `fit`.

    Every `every` real updates, and at the end of training, writes one file
    holding every average of every `sigma_rel` (non-trainable ones included
    where they are averaged), with the update count, into `directory`.
    After training, `keras_ema.synthesize` and `keras_ema.sweep_sigma_rel`
    build the average of any `sigma_rel` from them. EDM2 takes about 8 or
    more snapshots per tracked profile over the run, evenly spaced.

    The files hold the averages whatever is swapped into the model
    (`SwapAverageWeights` in any order). Updates are counted as the
    averages saw them: an optimizer that trained before `PostHocEMA`
    wrapped it counts from the wrapping, not from its `iterations`. With
    `steps_per_execution` (or anything else that makes the batch ends skip
    counts), the first batch end at or past each multiple of `every`
    writes, at the count it reached; no multiple is skipped.

    Files are written aside and renamed into place, so a killed run leaves
    whole files only. A resumed `fit` (the optimizer's update count restored
    from a checkpoint, by `keras.callbacks.BackupAndRestore` in either
    order, or by loading) continues the series; snapshots from beyond the
    restored count, left by the abandoned run, are renamed to
    `<name>.abandoned` (`.abandoned-1`, `-2`, ... when that name is taken:
    never deleted, never overwritten) and no longer used. Each series
    records a random identity, kept when it resumes, so that `synthesize`
    refuses to mix two runs' snapshots.

    Args:
        directory: Folder of the snapshots; created if missing.
        every: Int >= 1: real updates between snapshots.
        dtype: `"float32"` (default), `"bfloat16"` or `"float16"`: the
            snapshots' dtype. EDM2 stores them in a 16-bit dtype, which halves
            the disk space; the synthesis then carries its rounding. An array
            with values the dtype cannot hold (above 65504 for float16, e.g.
            BatchNorm variances) is stored in float32 instead, with a
            warning: the synthesis never gets infinities from the dtype.

    Example:

    ```python
    opt = keras_ema.PostHocEMA(keras.optimizers.Adam(1e-3))
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, epochs=20, callbacks=[
        keras_ema.PostHocSnapshots("snapshots", every=500)])
    ```
    """

    def __init__(self, directory, every, dtype="float32"):
        super().__init__()
        if not (isinstance(every, int) and not isinstance(every, bool)
                and every >= 1):
            raise ValueError(
                "PostHocSnapshots requires `every` to be an int >= 1. "
                f"Received: every={every!r}. Instead, pass e.g. every=500."
            )
        _check_dtype(dtype)
        self.directory = os.fspath(directory)
        self.every = every
        self.dtype = dtype
        # The update count of the last write, or of the start; None until
        # the first batch, when the count is known.
        self._last = None
        self._run = None

    def _optimizer(self):
        opt = find_in_model(self.model, "PostHocSnapshots")
        if not isinstance(opt, posthoc_ema.PostHocEMA):
            raise ValueError(
                "PostHocSnapshots does not support an optimizer that keeps "
                f"one average ({type(opt).__name__}). Instead, compile the "
                "model with `keras_ema.PostHocEMA(optimizer)`."
            )
        return opt

    def on_train_begin(self, logs=None):
        opt = self._optimizer()
        opt.shadow_copy(self.model)
        os.makedirs(self.directory, exist_ok=True)
        # A `BackupAndRestore` listed after this callback restores the
        # update count in its own `on_train_begin`: the count is read at
        # the first batch.
        self._last = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._last is None:
            self._start(self._optimizer())

    def on_train_batch_end(self, batch, logs=None):
        opt = self._optimizer()
        if self._last is None:
            self._start(opt)
        step = _updates(self.model, opt)
        if step // self.every > self._last // self.every:
            self._write(opt, step)

    def on_train_end(self, logs=None):
        opt = self._optimizer()
        if self._last is None:
            self._start(opt)
        step = _updates(self.model, opt)
        if step != self._last and step > 0:
            self._write(opt, step)

    def _start(self, opt):
        step = _updates(self.model, opt)
        for found, path in list_snapshots(self.directory):
            if found > step:
                aside = _set_aside(path)
                warnings.warn(
                    f"keras-ema: the snapshot {path} is from beyond this "
                    f"run's update count ({step}); renamed to {aside} and "
                    "no longer used."
                )
        self._run = series_run(self.directory, step)
        self._last = step

    def _write(self, opt, step):
        write_snapshot(self.directory, self.model, opt, step, self.dtype,
                       run=self._run)
        self._last = step


def _updates(model, opt):
    # JAX's `fit` keeps the state outside the variables between steps.
    _binding.sync_model(model)
    return posthoc_ema.updates_seen(opt)


def _check_dtype(dtype):
    if dtype not in _DTYPES:
        raise ValueError(
            f"PostHocSnapshots does not support dtype={dtype!r}. Instead, "
            f"pass one of {_DTYPES}."
        )


def _set_aside(path):
    """Renames `path` out of the series, to a name no file has."""
    target, n = path + ".abandoned", 0
    while os.path.lexists(target):
        n += 1
        target = f"{path}.abandoned-{n}"
    os.rename(path, target)
    return target


def series_run(directory, step):
    """The identity of the series that goes on at update count `step` in
    `directory`: that of its latest snapshot at or before `step` (a resumed
    run continues its series), else a new one."""
    earlier = [p for s, p in list_snapshots(directory) if s <= step]
    run = read_meta(earlier[-1]).get("run") if earlier else None
    return run or secrets.token_hex(8)


def write_snapshot(directory, model, opt, step, dtype="float32", run=None):
    """Writes the snapshot of `opt`'s averages at update count `step`.

    `step` counts the real updates the averages saw
    (`posthoc_ema.updates_seen(opt)` during training). `run` is the series'
    identity; by default, that of `series_run(directory, step)`. Returns the
    file's path.
    """
    _check_dtype(dtype)
    os.makedirs(directory, exist_ok=True)
    run = run or series_run(directory, step)
    since = max(step - opt.start_step, 0)
    entries, arrays, wider = [], {}, []
    for index, variable in enumerate(model.variables):
        if opt.average(variable) is None:
            continue
        entries.append({
            "path": variable.path, "index": index,
            "shape": [int(d) for d in variable.shape],
            "dtype": keras.backend.standardize_dtype(variable.dtype),
        })
        values = posthoc_ema.held_averages(opt, variable)
        for j, value in enumerate(values):
            stored = _encode(value, dtype)
            if stored.dtype == np.float32 and dtype != "float32":
                wider.append(variable.path)
            arrays[f"{j}/{len(entries) - 1}"] = stored
    if wider:
        warnings.warn(
            f"keras-ema: snapshot values of {', '.join(sorted(set(wider)))} "
            f"exceed what {dtype} holds; those arrays are stored in float32."
        )
    meta = {
        "format": _FORMAT, "step": int(step),
        "t": since - since % opt.update_every, "run": run,
        "sigma_rels": list(opt.sigma_rels), "dtype": dtype,
        "variables": entries,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), "uint8")
    path = os.path.join(directory, f"snapshot-{step:010d}.npz")
    with atomic_path(path) as temporary:
        with open(temporary, "wb") as f:
            np.savez(f, **arrays)
    return path


def list_snapshots(directory):
    """`(step, path)` of the snapshots in `directory`, by step."""
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


@contextlib.contextmanager
def reading(path):
    """Turns a failure to read the snapshot `path` into a clear error."""
    try:
        yield
    except _UNREADABLE as error:
        raise ValueError(
            f"keras-ema cannot read the snapshot {path} ({type(error).__name__}"
            f": {error}): it is corrupt, truncated, or not written by "
            "`keras_ema.PostHocSnapshots`. Instead, move it out of that "
            "folder, or delete it: only snapshots may be named "
            "snapshot-<step>.npz there."
        ) from error


def read_meta(path):
    """The `meta` of the snapshot `path`; a clear error for a file that is
    not a whole snapshot."""
    with reading(path):
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("not an .npz archive")
        with data:
            meta = json.loads(bytes(data["meta"]).decode())
            if not isinstance(meta, dict):
                raise ValueError("its meta is not a JSON object")
            missing = [key for key in _META_KEYS if key not in meta]
            if missing:
                raise KeyError(f"its meta lacks {missing}")
    if meta.get("format", 1) > _FORMAT:
        raise ValueError(
            f"keras-ema cannot read the snapshot {path}: its format "
            f"{meta['format']} is newer than this version's ({_FORMAT}). "
            "Instead, upgrade keras-ema."
        )
    return meta


def read_average(data, meta, profile, variable):
    """Average `variable` (index into `meta["variables"]`) of `profile`, as
    float64, from the open `np.load` of a snapshot."""
    array = _decode(data[f"{profile}/{variable}"])
    if list(array.shape) != meta["variables"][variable]["shape"]:
        raise ValueError(
            f"array {profile}/{variable} has shape {list(array.shape)}, its "
            f"meta says {meta['variables'][variable]['shape']}"
        )
    return array


def check_series(used, directory):
    """Refuses snapshots `(step, path, meta)` that are not of one series:
    another model, other widths, another run (its identity)."""
    _, last_path, last = used[-1]
    layout = [(e["shape"], e["dtype"]) for e in last["variables"]]
    for _, path, meta in used[:-1]:
        if [(e["shape"], e["dtype"]) for e in meta["variables"]] != layout:
            what = "another model: it holds other variables"
        elif meta["sigma_rels"] != last["sigma_rels"]:
            what = f"other widths: it tracks sigma_rels={meta['sigma_rels']}"
        elif None not in (meta.get("run"), last.get("run")) and (
                meta["run"] != last["run"]):
            what = f"another training run: its series is {meta['run']!r}"
        else:
            continue
        raise ValueError(
            f"synthesize does not support mixed snapshots: {path} is of "
            f"{what}, unlike {last_path} (sigma_rels={last['sigma_rels']}, "
            f"series {last.get('run')!r}). Instead, keep one training run's "
            f"snapshots per folder: move the other files out of {directory}."
        )


def _encode(value, dtype):
    """The array stored for `value`: in `dtype`, or in float32 where `dtype`
    would turn a finite value infinite."""
    value = np.asarray(value, "float32")
    if dtype == "float32":
        return value
    if dtype == "float16":
        with np.errstate(over="ignore"):
            stored = value.astype("float16")
    else:
        # bfloat16: the upper 16 bits, rounded to nearest even.
        bits = value.view("uint32").astype("uint64")
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        stored = rounded.astype("uint16")
    if np.array_equal(np.isfinite(_decode(stored)), np.isfinite(value)):
        return stored
    return value


def _decode(array):
    # Each array's dtype says how it is stored; `uint16` is bfloat16's bits.
    if array.dtype == np.uint16:
        return (array.astype("uint32") << 16).view("float32").astype("float64")
    return array.astype("float64")
