"""The model weights of `.keras` and `.weights.h5` files, for `soup`.

Keras writes a model's variables into an HDF5 file as `<path>/vars/<i>`,
`<path>` being where its saving walk (`keras.src.saving.saving_lib.
_save_state`) found the layer: `layers/dense_1` in a functional model, an
attribute's name in a subclassed one. The same walk, run over the model with
a store that records instead of writing, tells which dataset of a file holds
which of the model's variables: the way `load_weights` reads them, with no
copy of Keras' rules here. A `.keras` file is a zip archive that holds that
HDF5 file as `model.weights.h5`.
"""

import contextlib
import os
import tempfile
import zipfile

import h5py
import keras
import ml_dtypes
import numpy as np
from keras.src.saving import saving_lib

# Where a `.keras` archive keeps the weights (`saving_lib._VARS_FNAME_H5`).
_WEIGHTS = "model.weights.h5"

# The most numbers `blocks` reads at once: 512 KiB in float64.
_BLOCK = 2**16

# What `model.save` / `save_weights` write, beside the model's variables.
_OPTIMIZER = "optimizer"

_KINDS = (
    "`.keras` files (`model.save`, `ModelCheckpoint`) or `.weights.h5` files "
    "(`model.save_weights`, `ModelCheckpoint(save_weights_only=True)`)"
)


class Slot:
    """One variable of the model and the dataset of a file that holds it."""

    def __init__(self, key, variable):
        self.key = key
        self.variable = variable
        self.shape = tuple(variable.shape)
        self.dtype = keras.backend.standardize_dtype(variable.dtype)
        self.is_float = keras.backend.is_float_dtype(self.dtype)


class _Recorder(saving_lib.H5IOStore):
    """A store for Keras' saving walk that records what it is given."""

    def __init__(self):  # no file: nothing is written
        self.path = None
        self.entries = []

    def __bool__(self):
        return True

    def make(self, path, metadata=None):
        self.path = path
        return self

    def __setitem__(self, key, value):
        name = f"{self.path}/vars/{key}" if self.path else f"vars/{key}"
        self.entries.append((name, value))


def model_slots(model, user):
    """Returns `(slots, known)`: the model's variables that files hold, in
    the order Keras writes them, and the name of every dataset a file of
    this model holds outside its optimizer."""
    if not isinstance(model, keras.Model) or not model.built:
        raise ValueError(
            f"{user} does not support a model that is not a built "
            f"`keras.Model` (received: {type(model).__name__}). Instead, pass "
            "a model of the files' architecture, built, e.g. by calling it on "
            "a batch or by `keras.models.load_model` of one of the files."
        )
    recorder = _Recorder()
    # The model's optimizer (if compiled) is not averaged, and the files'
    # optimizers, if any, are skipped alike.
    optimizer = getattr(model, "optimizer", None)
    skip = set() if optimizer is None else {id(optimizer)}
    saving_lib._save_state(
        model, weights_store=recorder, assets_store=None, inner_path="",
        visited_saveables=skip,
    )
    own = {id(v) for v in model.variables}
    slots = []
    for name, value in recorder.entries:
        if id(value) in own:
            slots.append(Slot(name, value))
        elif not isinstance(value, keras.Variable):
            raise ValueError(
                f"{user} does not support layers that save a computed value "
                f"instead of a variable ({name}: a LoRA-enabled or quantized "
                "layer). Instead, merge or remove the LoRA weights, or soup "
                "the models before quantizing them."
            )
    return slots, {name for name, _ in recorder.entries}


@contextlib.contextmanager
def open_weights(filepath, user):
    """The `h5py.File` that holds the weights of `filepath`, read-only."""
    if filepath.endswith(".weights.h5"):
        with _h5(filepath, filepath, user) as h5:
            yield h5
        return
    try:
        archive = zipfile.ZipFile(filepath)
    except zipfile.BadZipFile as error:
        raise ValueError(
            f"{user} does not support files that are not Keras archives: "
            f"{filepath!r} cannot be read as one ({error}). Instead, pass "
            f"{_KINDS}."
        ) from None
    with archive:
        if _WEIGHTS not in archive.namelist():
            raise ValueError(
                f"{user} does not support a `.keras` file without "
                f"{_WEIGHTS} ({filepath!r}; one saved with "
                "`weights_format='npz'`, or not by Keras). Instead, save it "
                "with `model.save(path)`."
            )
        # Extracted by chunks to a file: h5py reads a file at random
        # offsets, which a zip member does only by reading it again from
        # its start, and a copy in memory would cost a model per file.
        with tempfile.TemporaryDirectory() as folder:
            path = archive.extract(_WEIGHTS, folder)
            with _h5(path, filepath, user) as h5:
                yield h5


@contextlib.contextmanager
def _h5(path, filepath, user):
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(
            f"{user} does not support files that are not HDF5 weights: "
            f"{filepath!r} cannot be read as such ({error}). Instead, pass "
            f"{_KINDS}."
        ) from None
    with h5:
        yield h5


def differences(h5, slots, known):
    """What keeps the weights of `h5` from matching the model's variables:
    a list of lines, empty when they match."""
    found = []
    for slot in slots:
        if slot.key not in h5:
            found.append(f"{slot.key} ({slot.variable.path}) is missing")
            continue
        dataset = h5[slot.key]
        if not isinstance(dataset, h5py.Dataset):
            found.append(f"{slot.key} ({slot.variable.path}) is missing")
        elif tuple(dataset.shape) != slot.shape:
            found.append(
                f"{slot.key} has shape {tuple(dataset.shape)} where the "
                f"model's {slot.variable.path} has {slot.shape}"
            )
        elif slot.is_float != _is_float(dataset):
            found.append(
                f"{slot.key} has dtype {_dtype(dataset)} where the "
                f"model's {slot.variable.path} has {slot.dtype}"
            )
    extra = []
    for name in h5:
        if name == _OPTIMIZER:
            continue
        item = h5[name]
        if isinstance(item, h5py.Dataset):
            extra.append(name)
        else:
            item.visititems(
                lambda inner, obj: extra.append(f"{name}/{inner}")
                if isinstance(obj, h5py.Dataset) else None
            )
    found += [f"{name} is not in the model" for name in extra
              if name not in known]
    return found


def read(h5, slot):
    """The value of `slot` in `h5`, as a numpy array."""
    return _read(h5[slot.key], ())


def blocks(h5, slot):
    """The value of `slot` in `h5` by blocks of rows: `(rows, array)`, each
    of at most about `_BLOCK` numbers (a row may be longer), so that what is
    read is never a copy of a large variable."""
    dataset = h5[slot.key]
    if dataset.ndim == 0 or dataset.size <= _BLOCK:
        yield (), _read(dataset, ())
        return
    step = max(1, _BLOCK * dataset.shape[0] // dataset.size)
    for start in range(0, dataset.shape[0], step):
        rows = slice(start, start + step)
        yield rows, _read(dataset, rows)


def _read(dataset, index):
    value = dataset[index]
    if _dtype(dataset) == "bfloat16":
        return value.view(ml_dtypes.bfloat16)
    return value


def _dtype(dataset):
    # Keras writes bfloat16 as raw 2-byte values, marked by an attribute.
    if dataset.attrs.get("dtype") == "bfloat16":
        return "bfloat16"
    return str(dataset.dtype)


def _is_float(dataset):
    return _dtype(dataset) == "bfloat16" or np.issubdtype(
        dataset.dtype, np.floating
    )


def check_path(filepath, user):
    """`filepath` as a `str`, refused if it is not a file of a known kind."""
    filepath = os.fspath(filepath)
    if not filepath.endswith((".keras", ".weights.h5")):
        raise ValueError(
            f"{user} does not support the file type of {filepath!r}. "
            f"Instead, pass {_KINDS}."
        )
    if not os.path.isfile(filepath):
        raise FileNotFoundError(
            f"{user} found no file at {filepath!r}. Instead, pass the path "
            "of a file that exists."
        )
    return filepath
