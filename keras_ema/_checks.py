"""Argument checks of `ExponentialMovingAverage`, with errors in Keras' style."""

import numbers
import re

import keras
import numpy as np

FLOATS = ("float16", "bfloat16", "float32", "float64")


def get_optimizer(optimizer):
    try:
        inner = keras.optimizers.get(optimizer)
    except (ValueError, TypeError):
        inner = None
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise ValueError(
            "ExponentialMovingAverage expects `optimizer` to be a Keras 3 "
            "optimizer: a `keras.optimizers.Optimizer` instance, a name such "
            f"as 'adam', or a config dict. Received: optimizer={optimizer!r} "
            f"of type {type(optimizer).__name__}. Legacy Keras 2 "
            "(`tf.keras`, `tf_keras`) optimizers are not supported; use the "
            "matching `keras.optimizers` class instead."
        )
    if inner.use_ema:
        raise ValueError(
            "ExponentialMovingAverage does not support an inner optimizer "
            "with `use_ema=True`: the weights would be averaged twice. "
            "Instead, create the inner optimizer with `use_ema=False`."
        )
    return inner


def check_bool(value, name):
    if not isinstance(value, bool):
        raise ValueError(
            f"ExponentialMovingAverage requires `{name}` to be True or False. "
            f"Received: {name}={value!r}."
        )
    return value


def check_int(value, name, minimum):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        raise ValueError(
            f"ExponentialMovingAverage requires `{name}` to be an integer "
            f">= {minimum}. Received: {name}={value!r}. Instead, pass e.g. "
            f"{name}={minimum}."
        )
    return int(value)


def check_float_dtype(dtype, road):
    try:
        standard = keras.backend.standardize_dtype(dtype)
    except ValueError:
        standard = None
    if standard not in FLOATS:
        raise ValueError(
            "ExponentialMovingAverage requires `average_dtype` to be a float "
            f"dtype, one of {FLOATS}, or None. Received: "
            f"average_dtype={dtype!r}."
        )
    road.check_float_dtype(standard)
    return standard


def check_step_count(value, name, minimum, limit):
    """`check_int`, for an int that the train step compares with its step
    counter; `limit` is the largest the backend's counter holds, or None."""
    value = check_int(value, name, minimum)
    if limit is not None and value > limit:
        raise ValueError(
            f"ExponentialMovingAverage does not support `{name}` above "
            f"{limit} on JAX: the step counter is "
            f"{keras.backend.standardize_dtype('int')}, and a larger "
            "value breaks the compiled train step (an OverflowError, or "
            "with `jax_enable_x64` a silent wrap-around). Received: "
            f"{name}={value!r}. Instead, pass {name} <= {limit}."
        )
    return value


def compile_patterns(exclude):
    """`exclude` as a list of compiled regular expressions over str paths."""
    if exclude is None:
        return []
    if isinstance(exclude, (str, re.Pattern)):
        exclude = [exclude]
    elif isinstance(exclude, bytes) or not _is_collection(exclude):
        raise ValueError(
            "ExponentialMovingAverage does not support `exclude` of type "
            f"{_type_name(exclude)}. Received: exclude={exclude!r}. "
            "Instead, pass a regular expression or a list of them, matched "
            "against variable paths, e.g. exclude=['bias$']."
        )
    patterns = []
    for pattern in exclude:
        if isinstance(pattern, re.Pattern):
            text = pattern.pattern
        else:
            text = pattern
        if not isinstance(text, str):
            hint = (
                repr(text.decode("utf-8", "replace"))
                if isinstance(text, bytes) else "'bias$'"
            )
            raise ValueError(
                "ExponentialMovingAverage does not support `exclude` patterns "
                f"of type {type(text).__name__}: they are regular expressions "
                f"matched against variable paths, which are str. Received: "
                f"exclude={exclude!r}. Instead, pass str patterns, e.g. "
                f"exclude=[{hint}]."
            )
        try:
            patterns.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(
                "ExponentialMovingAverage requires `exclude` to hold regular "
                f"expressions. Received: {pattern!r}, which does not compile "
                f"({error}). Instead, pass e.g. exclude=['bias$']."
            ) from None
    return patterns


def _type_name(value):
    # Keras' attribute tracking may have wrapped a dict or list already.
    cls = type(value)
    if cls.__module__.startswith("keras."):
        for base in cls.__mro__[1:]:
            if base.__module__ == "builtins" and base is not object:
                return base.__name__
    return cls.__name__


def _is_collection(value):
    # A dict would give its keys; a tensor or array its rows.
    if isinstance(value, (str, bytes, dict)) or hasattr(value, "shape"):
        return False
    return hasattr(value, "__iter__")


# Where a schedule is probed: the start, the ramp, and a long run.
PROBES = (0, 1, 10, 10**3, 10**6)


def check_schedule(schedule, eager_scope):
    """Evaluates `schedule` at `PROBES`; its decay must lie in [0, 1].

    Probed once, eagerly (in `eager_scope()`, the road's), as the train
    step calls it: with an integer tensor `n` of the step counter's dtype,
    the result cast to float32. A decay outside [0, 1] (or NaN) makes the
    averages diverge silently.
    """
    if not callable(schedule) or isinstance(schedule, type):
        raise ValueError(
            "ExponentialMovingAverage does not support an `average_decay` "
            "that is neither a number, a schedule, nor a schedule's config. "
            f"Received: average_decay={schedule!r}. Instead, pass a number "
            "in [0, 1] such as 0.999, "
            "a `keras_ema.schedules.DecaySchedule` (e.g. "
            "`keras_ema.schedules.Warmup(0.9999)`), its "
            "`keras_ema.schedules.serialize(...)` dict, or a function "
            "`n -> decay`."
        )
    dtype = keras.backend.standardize_dtype("int")
    with eager_scope():
        for n in PROBES:
            try:
                decay = keras.ops.cast(
                    schedule(keras.ops.convert_to_tensor(n, dtype)), "float32"
                )
                decay = np.asarray(keras.ops.convert_to_numpy(decay))
            except Exception as error:  # noqa: BLE001 - re-raised with context
                raise ValueError(
                    "ExponentialMovingAverage does not support a decay "
                    f"schedule that fails on an integer tensor: at n={n} it "
                    f"raised {type(error).__name__} ({_first_line(error)}). "
                    "Received: "
                    f"average_decay={schedule!r}. Instead, pass a function "
                    "that takes an integer tensor `n` and returns the decay "
                    "computed with `keras.ops` (no Python `if` on `n`)."
                ) from error
            if decay.shape != ():
                raise ValueError(
                    "ExponentialMovingAverage does not support a decay "
                    "schedule that returns a non-scalar: at n="
                    f"{n} it returned shape {decay.shape}. Received: "
                    f"average_decay={schedule!r}. Instead, return one number "
                    "per step, e.g. with `keras.ops.squeeze`."
                )
            if not 0.0 <= float(decay) <= 1.0:  # NaN fails too
                raise ValueError(
                    "ExponentialMovingAverage does not support a decay "
                    "outside [0, 1]: the averages would diverge. Received: "
                    f"average_decay={schedule!r}, whose decay at n={n} is "
                    f"{float(decay)!r}. Instead, return a decay in [0, 1] "
                    "for every n, e.g. with `keras.ops.clip(decay, 0.0, 1.0)`."
                )
    return schedule


def check_model(model, what):
    """`model` must be a Keras 3 model or layer."""
    if isinstance(model, keras.layers.Layer):
        return model
    if _looks_like_a_variable(model) or (
        isinstance(model, (list, tuple)) and model
        and _looks_like_a_variable(model[0])
    ):
        instead = (
            "pass the model itself, not its variables, e.g. "
            "`optimizer.shadow_copy(model)`"
        )
    elif type(model).__module__.startswith(("tf_keras", "tensorflow")):
        instead = (
            "build the model with Keras 3 (`import keras`); legacy Keras 2 "
            "(`tf.keras`, `tf_keras`) models are not supported"
        )
    else:
        instead = "pass the `keras.Model` compiled with this optimizer"
    raise ValueError(
        f"`{what}` does not support a model that is not a Keras model or "
        f"layer. Received: model={_describe(model)} of type "
        f"{type(model).__name__}. Instead, {instead}."
    )


def check_variables(var_list, what, is_variable):
    """`var_list` as a list, each item a variable (`is_variable`, the
    road's: Keras', or TF's on TF)."""
    if var_list is None or is_variable(var_list) or not _is_collection(
        var_list
    ):
        instead = (
            "pass a list, e.g. `[variable]`" if is_variable(var_list)
            else "pass a list of the model's variables, e.g. "
            "`model.trainable_variables`"
        )
        raise ValueError(
            f"`{what}` does not support a `var_list` that is not a list of "
            f"variables. Received: var_list={_describe(var_list)} of type "
            f"{type(var_list).__name__}. Instead, {instead}."
        )
    var_list = list(var_list)
    for i, variable in enumerate(var_list):
        if not is_variable(variable):
            raise ValueError(
                f"`{what}` does not support items of `var_list` that are not "
                f"variables. Received: var_list[{i}]={_describe(variable)} of "
                f"type {type(variable).__name__}. Instead, pass the model's "
                "variables themselves, e.g. `model.trainable_variables`, "
                "not their values."
            )
    return var_list


def _looks_like_a_variable(value):
    """A variable of any backend: what `check_model` names as a mistake."""
    return hasattr(value, "assign") and hasattr(value, "shape")


def _describe(value):
    """A short repr: arrays, tensors and variables without their values."""
    shape = getattr(value, "shape", None)
    if shape is not None:
        path = getattr(value, "path", None)
        where = f" path={path}" if isinstance(path, str) else ""
        dtype = getattr(value, "dtype", None)
        return (
            f"<{type(value).__name__}{where} shape={tuple(shape)} "
            f"dtype={dtype}>"
        )
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _first_line(error):
    lines = str(error).strip().splitlines() or [""]
    return lines[0] if len(lines[0]) <= 200 else lines[0][:197] + "..."
