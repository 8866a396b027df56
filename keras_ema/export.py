"""`export_averaged`: a plain model file holding the averaged weights."""

import os

import keras

from keras_ema._files import atomic_path
from keras_ema._binding import find_in_model


def export_averaged(model, filepath, sigma_rel=None):
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
    copy = plain_copy(model, opt, sigma_rel)
    with atomic_path(filepath) as path:
        copy.save(path)
    return copy


def plain_copy(model, opt, sigma_rel=None, custom_objects=None):
    """A copy of `model` without optimizer or compile state that holds the
    averages of `opt` (of `sigma_rel` for a `PostHocEMA`)."""
    config = keras.saving.serialize_keras_object(model)
    # Compiling the copy would bring the keras_ema optimizer into its file.
    config.pop("compile_config", None)
    copy = keras.saving.deserialize_keras_object(
        config,
        custom_objects={type(model).__name__: type(model),
                        **(custom_objects or {})},
    )
    with _averages_of(opt, sigma_rel):
        copy.set_weights(model.get_weights())
    return copy


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
