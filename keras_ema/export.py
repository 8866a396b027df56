"""`export_averaged`: a plain model file holding the averaged weights."""

import contextlib
import os
import re

import keras

from keras_ema._files import atomic_path
from keras_ema._binding import find_in_model


def export_averaged(model, filepath, sigma_rel=None, custom_objects=None):
    """Saves a plain copy of `model` that holds the averaged weights.

    The copy has the model's architecture and the averages as its weights
    (non-trainable variables included when they are averaged), and no
    optimizer or compile state: `keras.models.load_model(filepath)` works
    where keras_ema is not installed. Compile the loaded model to
    `evaluate` or train it. `model`, its weights and its averages are left
    as they were, also when saving fails.

    Args:
        model: A `keras.Model` compiled with an `ExponentialMovingAverage`
            optimizer (also wrapped in a `LossScaleOptimizer`).
        filepath: Path of the `.keras` file to write. An existing file is
            replaced whole, never truncated: the copy is written aside and
            renamed over it, so a save that fails or is killed leaves it as
            it was.
        sigma_rel: With a `PostHocEMA` optimizer, the width whose averages
            to export (default: its first).
        custom_objects: Optional dict of custom functions and classes the
            model's configuration names (an activation, an initializer),
            as for `keras.models.load_model`. The classes of the model and
            of its layers need none: the copy is built with them.

    Returns:
        The plain copy, a `keras.Model` holding the averages.

    Example:

    ```python
    keras_ema.export_averaged(model, "model_ema.keras")
    # Elsewhere, without keras_ema:
    model = keras.models.load_model("model_ema.keras")
    ```
    """
    if not os.fspath(filepath).endswith(".keras"):
        raise ValueError(
            "export_averaged does not support the file type of "
            f"filepath={filepath!r}. Instead, pass a path that ends in "
            "`.keras`."
        )
    opt = find_in_model(model, "export_averaged")
    copy = plain_copy(model, opt, sigma_rel, custom_objects)
    with atomic_path(filepath) as path:
        copy.save(path)
    return copy


def plain_copy(model, opt, sigma_rel=None, custom_objects=None):
    """A copy of `model` without optimizer or compile state that holds the
    averages of `opt` (of `sigma_rel` for a `PostHocEMA`)."""
    config = keras.saving.serialize_keras_object(model)
    # Compiling the copy would bring the keras_ema optimizer into its file.
    config.pop("compile_config", None)
    with rebuilding("export_averaged"):
        copy = keras.saving.deserialize_keras_object(
            config, custom_objects=model_objects(model, custom_objects)
        )
    with _averages_of(opt, sigma_rel):
        copy.set_weights(model.get_weights())
    return copy


def model_objects(model, custom_objects=None):
    """`custom_objects` to rebuild `model` from its config: the classes of
    the model and of its layers, which `model.save` needs no registration
    for either, then `custom_objects`."""
    found = {}
    for layer in model._flatten_layers(include_self=True, recursive=True):
        cls = type(layer)
        if cls.__module__.startswith("keras."):
            continue
        name = keras.saving.get_registered_name(cls)
        if found.setdefault(name, cls) is not cls:
            raise ValueError(
                f"Rebuilding the model does not support two classes named "
                f"{name!r} ({found[name].__module__} and {cls.__module__}): "
                "its config names them alike. Instead, register them under "
                "distinct packages with "
                "`@keras.saving.register_keras_serializable(package=...)`."
            )
    return {**found, **(custom_objects or {})}


@contextlib.contextmanager
def rebuilding(user):
    """Names `custom_objects` in the error of a config that names a class
    or function that is not registered."""
    try:
        yield
    except TypeError as error:
        # Keras nests the error of the object it could not find in those of
        # the layers around it.
        missing = re.search(r"Could not locate (\w+) '([^']+)'", str(error))
        if missing is None:
            raise
        kind, name = missing.groups()
        raise ValueError(
            f"{user} could not rebuild the model from its config: it names "
            f"the {kind} {name!r}, which is not registered. Instead, pass "
            f"`custom_objects={{{name!r}: {name}}}` (with every custom class "
            "and function the config names), as for "
            "`keras.models.load_model`, or register it with "
            "`@keras.saving.register_keras_serializable()`."
        ) from error


def _averages_of(opt, sigma_rel):
    if sigma_rel is None:
        return opt.averaged_weights()
    if not hasattr(opt, "sigma_rels"):
        raise ValueError(
            "export_averaged does not support `sigma_rel` with an optimizer "
            f"that keeps one average ({type(opt).__name__}). Instead, leave "
            "`sigma_rel=None`, or train with `keras_ema.PostHocEMA`."
        )
    return opt.averaged_weights(sigma_rel=sigma_rel)
