"""`load_averaged`: the averages out of a training file, as a plain model."""

import json
import os
import zipfile

import keras
from keras import ops

from keras_ema._files import atomic_path
from keras_ema.export import model_objects
from keras_ema.export import plain_copy
from keras_ema.export import rebuilding
from keras_ema.optimizer import ExponentialMovingAverage
from keras_ema._binding import find_in_model

# Where a `.keras` archive keeps the model's and the compile arguments'
# configuration (`keras.src.saving.saving_lib`).
_CONFIG = "config.json"

_KINDS = (
    "a `.keras` file (`model.save`), a `.weights.h5` file "
    "(`model.save_weights`) or a TensorFlow checkpoint (its prefix, such as "
    "`ckpt/ckpt-3`, or its folder)"
)


def load_averaged(filepath, model=None, sigma_rel=None, custom_objects=None):
    """Loads the averaged weights of a training file into a plain model.

    A file saved during training with an `ExponentialMovingAverage` (or
    `PostHocEMA`) optimizer, also one that Keras wrapped in a
    `LossScaleOptimizer` under mixed precision, holds the raw weights in the
    model and the averages in the optimizer, or the other way round when it
    was saved with the averages swapped in (inside `averaged_weights()`);
    the file records which. This returns a copy of the model holding the
    averages either way (non-trainable ones such as BatchNorm statistics
    included when they were averaged, `trainable_weights_only=False`), with
    no optimizer or compile state: `copy.save(path)` writes a file that
    loads where keras_ema is not installed. Compile the copy to `evaluate`
    or train it. The file is only read.

    A `.keras` file holds the architecture and the optimizer's settings, and
    loads by itself (its loss and metrics are not needed and not loaded, so
    custom ones need no `custom_objects`). A `.weights.h5` file or a
    TensorFlow checkpoint (`tf.train.Checkpoint(model=model,
    optimizer=opt).save(prefix)`, TensorFlow backend only) holds values
    only: pass `model`, a built model
    of the same architecture compiled with an optimizer of the same settings
    (the same class, `trainable_weights_only`, `exclude`, `average_dtype`,
    `sigma_rels`; the inner optimizer of the same class), e.g. the one
    rebuilt by the training script. The file is loaded into a fresh copy of
    `model` and of its optimizer: `model`, its weights and its optimizer are
    left as they were. `model` can also be given with a `.keras` file.

    Args:
        filepath: `str` or `os.PathLike`: a `.keras` file, a `.weights.h5`
            file, or a TensorFlow checkpoint's prefix or folder (its latest
            checkpoint).
        model: Optional `keras.Model`, built and compiled with an
            `ExponentialMovingAverage` optimizer: the architecture and the
            optimizer settings to load a `.weights.h5` file or a checkpoint
            with. Required for those; optional for a `.keras` file.
        sigma_rel: With a `PostHocEMA` optimizer, the width whose averages
            to load (default: its first).
        custom_objects: Optional dict of the custom classes and functions
            that the model (its class, its layers) and the optimizer (a
            custom inner optimizer or schedule) need to deserialize, as for
            `keras.models.load_model`. With `model`, the classes of `model`
            and of its layers need none.

    Returns:
        A `keras.Model` of the same architecture, not compiled, whose weights
        are the averages.

    Example:

    ```python
    # The training script saved `model.save("training.keras")` with
    # `opt = keras_ema.ExponentialMovingAverage(...)`.
    plain = keras_ema.load_averaged("training.keras")
    plain.save("model_ema.keras")  # loads without keras_ema

    # Weights only: the training script's model supplies the rest.
    plain = keras_ema.load_averaged("last.weights.h5", model=model)
    ```

    The same from a shell: `python -m keras_ema export training.keras
    model_ema.keras`.
    """
    filepath = os.fspath(filepath)
    kind, source = _kind(filepath, model)
    if model is None:
        trained, opt = _from_keras_file(source, custom_objects)
    else:
        trained, opt = _twin(model, custom_objects)
    if kind == "checkpoint":
        _restore_checkpoint(trained, opt, source)
    else:
        trained.load_weights(source)
    profile = _profile(opt, sigma_rel)
    updates = int(ops.convert_to_numpy(profile._ema_state.step)) if opt.built else 0
    if not opt.has_shadow_copy or updates == 0:
        raise ValueError(
            "load_averaged does not support files saved before training: "
            f"filepath={filepath!r} holds no averages (its optimizer never "
            "updated them). Instead, pass a file saved after training, or "
            "load this one with `keras.models.load_model`: its weights are "
            "where the averages would have started."
        )
    if opt.averages_swapped_in:
        # Saved inside `averaged_weights()`; for `PostHocEMA` maybe those of
        # another width. Swaps are exact both ways.
        opt.swap_weights()
    return plain_copy(trained, opt, sigma_rel, custom_objects)


def _kind(filepath, model):
    """What `filepath` is ("keras", "weights", "checkpoint") and the path to
    read; raises if it is none of these or needs a `model`."""
    if filepath.endswith((".keras", ".weights.h5")):
        if not os.path.isfile(filepath):
            raise FileNotFoundError(
                f"load_averaged found no file at filepath={filepath!r}. "
                "Instead, pass the path of a training file that exists."
            )
        kind = "keras" if filepath.endswith(".keras") else "weights"
        source = filepath
    elif os.path.isdir(filepath) or os.path.isfile(filepath + ".index"):
        kind, source = "checkpoint", _checkpoint_prefix(filepath)
    else:
        raise ValueError(
            "load_averaged does not support the file type of "
            f"filepath={filepath!r}. Instead, pass {_KINDS}."
        )
    if kind != "keras" and model is None:
        what = {"weights": "`.weights.h5` files",
                "checkpoint": "TensorFlow checkpoints"}[kind]
        raise ValueError(
            f"load_averaged does not support {what} without `model`: they "
            "hold values, not the architecture and optimizer. Instead, pass "
            "`model=`, a built model of the architecture compiled with an "
            "ExponentialMovingAverage of the same settings, or save a "
            "`.keras` file with `model.save`."
        )
    return kind, source


def _checkpoint_prefix(filepath):
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "load_averaged does not support TensorFlow checkpoints on the "
            f"{keras.backend.backend()} backend. Instead, load them with "
            "KERAS_BACKEND=tensorflow, or save with `model.save_weights` "
            "(`.weights.h5`), which every backend reads."
        )
    if not os.path.isdir(filepath):
        return filepath
    import tensorflow as tf

    prefix = tf.train.latest_checkpoint(filepath)
    if prefix is None:
        raise FileNotFoundError(
            f"load_averaged found no TensorFlow checkpoint in the folder "
            f"filepath={filepath!r}. Instead, pass a checkpoint's prefix "
            "(such as `ckpt/ckpt-3`) or the folder that `tf.train."
            "CheckpointManager` writes."
        )
    return prefix


def _from_keras_file(filepath, custom_objects):
    """The model of a `.keras` file, compiled with its optimizer alone, its
    averages created: what `keras.models.load_model` builds, less the loss
    and metrics, which are not needed and, when custom, would not
    deserialize without `custom_objects`."""
    try:
        with zipfile.ZipFile(filepath) as archive:
            config = json.loads(archive.read(_CONFIG))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as error:
        raise ValueError(
            "load_averaged does not support files that are not Keras "
            f"archives: filepath={filepath!r} cannot be read as one "
            f"({error}). Instead, pass a file written by `model.save`."
        ) from None
    compile_config = config.get("compile_config") or {}
    optimizer = compile_config.get("optimizer")
    if optimizer is not None:
        with rebuilding("load_averaged"):
            optimizer = keras.saving.deserialize_keras_object(
                optimizer, custom_objects=custom_objects
            )
    chain = list(_chain(optimizer))
    if not any(isinstance(o, ExponentialMovingAverage) for o in chain):
        name = None if optimizer is None else type(optimizer).__name__
        raise ValueError(
            "load_averaged does not support files saved without averages: "
            f"filepath={filepath!r} was saved by a model whose optimizer "
            f"keeps none (optimizer={name}). Instead, pass a file saved by a "
            "model compiled with `keras_ema.ExponentialMovingAverage(...)`, "
            "or load this one with `keras.models.load_model`."
        )
    with rebuilding("load_averaged"):
        model = keras.models.load_model(
            filepath, custom_objects=custom_objects, compile=False
        )
    # Wrapped in a LossScaleOptimizer under mixed_float16, as by
    # `keras.models.load_model`.
    model.compile(optimizer=optimizer)
    return model, _averages_created(model)


def _twin(model, custom_objects):
    """A fresh copy of `model`, compiled with a fresh copy of its optimizer,
    averages created: `model` itself is left alone."""
    find_in_model(model, "load_averaged")
    if not model.built:
        raise ValueError(
            "load_averaged does not support a `model` that is not built: "
            "its weights do not exist yet. Instead, build it first, e.g. "
            "with `model.build(input_shape)` or by calling it on a batch."
        )
    config = keras.saving.serialize_keras_object(model)
    # Its loss and metrics are not needed, and may not deserialize.
    config.pop("compile_config", None)
    objects = model_objects(model, custom_objects)
    with rebuilding("load_averaged"):
        twin = keras.saving.deserialize_keras_object(
            config, custom_objects=objects
        )
        optimizer = keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(model.optimizer),
            custom_objects=objects,
        )
    # `model.optimizer` is already wrapped if `compile` wrapped it.
    twin.compile(optimizer=optimizer, auto_scale_loss=False)
    return twin, _averages_created(twin)


def _averages_created(model):
    """The model's `ExponentialMovingAverage`, built with all its averages
    (non-trainable ones too), ready for the file's values."""
    opt = find_in_model(model, "load_averaged")
    opt.shadow_copy(model)
    if not model.optimizer.built:
        # A LossScaleOptimizer around it: its loss scale is in the file too,
        # and Keras skips loading an optimizer that is not built.
        model.optimizer.build(model.trainable_variables)
    return opt


def _chain(optimizer):
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


def _restore_checkpoint(model, opt, prefix):
    import tensorflow as tf

    names = {name for name, _ in tf.train.list_variables(prefix)}
    # Under mixed precision the checkpoint's `optimizer` may be the
    # LossScaleOptimizer that `compile` wrapped around `opt`; the model
    # refers to its own optimizer either way.
    wrapped = "optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE" in names
    root = model.optimizer if wrapped else opt
    # Parts of the checkpoint that this copy lacks (a `save_counter`, the
    # state of a user's own objects) are fine to leave.
    tf.train.Checkpoint(model=model, optimizer=root).restore(
        prefix
    ).expect_partial()


def _profile(opt, sigma_rel):
    """The `ExponentialMovingAverage` whose averages `sigma_rel` selects."""
    if sigma_rel is None:
        return opt
    if not hasattr(opt, "sigma_rels"):
        raise ValueError(
            "load_averaged does not support `sigma_rel` with a file saved by "
            f"an optimizer that keeps one average ({type(opt).__name__}). "
            "Instead, leave `sigma_rel=None`, or train with "
            "`keras_ema.PostHocEMA`."
        )
    return opt.profile(sigma_rel)


def _export_file(training_file, plain_file, sigma_rel=None):
    """`python -m keras_ema export`: writes the plain copy of the averages of
    `training_file` (a `.keras` file) to `plain_file`, atomically."""
    training_file, plain_file = os.fspath(training_file), os.fspath(plain_file)
    if not training_file.endswith(".keras"):
        raise ValueError(
            "keras_ema export does not support the file type of "
            f"TRAINING_FILE={training_file!r}. Instead, pass the `.keras` "
            "file of a training run (`model.save`); for `.weights.h5` files "
            "and TensorFlow checkpoints, call "
            "`keras_ema.load_averaged(path, model=...)` from Python."
        )
    if not os.path.isfile(training_file):
        raise FileNotFoundError(
            "keras_ema export found no file at "
            f"TRAINING_FILE={training_file!r}. Instead, pass the path of a "
            "training file that exists."
        )
    if not plain_file.endswith(".keras"):
        raise ValueError(
            "keras_ema export does not support the file type of "
            f"PLAIN_FILE={plain_file!r}. Instead, pass a path that ends in "
            "`.keras`."
        )
    folder = os.path.dirname(plain_file) or os.curdir
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"keras_ema export found no folder {folder!r} for "
            f"PLAIN_FILE={plain_file!r}. Instead, create it first."
        )
    if os.path.exists(plain_file) and os.path.samefile(
        training_file, plain_file
    ):
        raise ValueError(
            "keras_ema export does not support writing over TRAINING_FILE. "
            "Instead, pass another PLAIN_FILE."
        )
    plain = load_averaged(training_file, sigma_rel=sigma_rel)
    with atomic_path(plain_file) as path:
        plain.save(path)
    return plain
