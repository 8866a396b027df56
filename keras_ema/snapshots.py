"""`PostHocSnapshots`: snapshot files of `PostHocEMA`'s averages, for EDM2's
post-hoc synthesis (`synthesis.py`).

One file per snapshot, `snapshot-<step>.npz` (`step` zero-padded to ten
digits), written atomically. It holds a `meta` entry (JSON: the optimizer's
`step` (real updates), `t` (the real updates since `start_step` that the
averages reflect: the last averaging update), the `sigma_rels`, and for each
averaged variable its `path`, `index` in `model.variables`, `shape` and
`dtype`), and one array per profile and variable, `"<profile>/<variable>"`,
in the snapshot dtype (bfloat16 as its raw 16 bits, which numpy lacks).
"""

import json
import os
import re
import warnings

import keras
import numpy as np

from keras_ema import _binding
from keras_ema._binding import find_in_model
from keras_ema._files import atomic_path

_NAME = re.compile(r"^snapshot-(\d{10})\.npz$")
_DTYPES = ("float32", "bfloat16", "float16")


class PostHocSnapshots(keras.callbacks.Callback):
    """Writes snapshots of `PostHocEMA`'s averages during `fit`.

    Every `every` real updates, and at the end of training, writes one file
    holding every average of every `sigma_rel` (non-trainable ones included
    where they are averaged), with the update count, into `directory`.
    After training, `keras_ema.synthesize` and `keras_ema.sweep_sigma_rel`
    build the average of any `sigma_rel` from them. EDM2 takes about 8 or
    more snapshots per tracked profile over the run, evenly spaced.

    Files are written aside and renamed into place, so a killed run leaves
    whole files only. A resumed `fit` (the optimizer's update count restored
    from a checkpoint) continues the series; snapshots from beyond the
    restored count, left by the abandoned run, are renamed to
    `<name>.abandoned` (never deleted) and no longer used.

    Args:
        directory: Folder of the snapshots; created if missing.
        every: Int >= 1: real updates between snapshots.
        dtype: `"float32"` (default), `"bfloat16"` or `"float16"`: the
            snapshots' dtype. EDM2 stores them in a 16-bit dtype, which halves
            the disk space; the synthesis then carries its rounding.

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
        if dtype not in _DTYPES:
            raise ValueError(
                f"PostHocSnapshots does not support dtype={dtype!r}. Instead, "
                f"pass one of {_DTYPES}."
            )
        self.directory = os.fspath(directory)
        self.every = every
        self.dtype = dtype
        self._last = None

    def _optimizer(self):
        from keras_ema.posthoc_ema import PostHocEMA

        opt = find_in_model(self.model, "PostHocSnapshots")
        if not isinstance(opt, PostHocEMA):
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
        step = _step(self.model, opt)
        for found, path in list_snapshots(self.directory):
            if found > step:
                os.replace(path, path + ".abandoned")
                warnings.warn(
                    f"keras-ema: the snapshot {path} is from beyond this "
                    f"run's update count ({step}); renamed to "
                    f"{path}.abandoned and no longer used."
                )
        self._last = step

    def on_train_batch_end(self, batch, logs=None):
        opt = self._optimizer()
        step = _step(self.model, opt)
        if step != self._last and step % self.every == 0:
            self._write(opt, step)

    def on_train_end(self, logs=None):
        opt = self._optimizer()
        step = _step(self.model, opt)
        if step != self._last and step > 0:
            self._write(opt, step)

    def _write(self, opt, step):
        write_snapshot(self.directory, self.model, opt, step, self.dtype)
        self._last = step


def _step(model, opt):
    # JAX's `fit` keeps the state outside the variables between steps.
    _binding.sync_model(model)
    return int(keras.ops.convert_to_numpy(opt.iterations))


def write_snapshot(directory, model, opt, step, dtype="float32"):
    """Writes the snapshot of `opt`'s averages at update count `step`."""
    since = max(step - opt.start_step, 0)
    entries, arrays = [], {}
    for index, variable in enumerate(model.variables):
        if opt.average(variable) is None:
            continue
        entries.append({
            "path": variable.path, "index": index,
            "shape": [int(d) for d in variable.shape],
            "dtype": keras.backend.standardize_dtype(variable.dtype),
        })
        for j, sigma_rel in enumerate(opt.sigma_rels):
            value = np.asarray(opt.average(variable, sigma_rel=sigma_rel))
            arrays[f"{j}/{len(entries) - 1}"] = _encode(value, dtype)
    meta = {
        "format": 1, "step": int(step),
        "t": since - since % opt.update_every,
        "sigma_rels": list(opt.sigma_rels), "dtype": dtype,
        "variables": entries,
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), "uint8")
    os.makedirs(directory, exist_ok=True)
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


def read_meta(path):
    with np.load(path, allow_pickle=False) as data:
        return json.loads(bytes(data["meta"]).decode())


def read_average(data, meta, profile, variable):
    """Average `variable` (index into `meta["variables"]`) of `profile`, as
    float64, from the open `np.load` of a snapshot."""
    return _decode(data[f"{profile}/{variable}"], meta["dtype"])


def _encode(value, dtype):
    value = np.asarray(value, "float32")
    if dtype == "float32":
        return value
    if dtype == "float16":
        return value.astype("float16")
    # bfloat16: the upper 16 bits, rounded to nearest even.
    bits = value.view("uint32").astype("uint64")
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("uint16")


def _decode(array, dtype):
    if dtype == "bfloat16":
        return (array.astype("uint32") << 16).view("float32").astype("float64")
    return array.astype("float64")
