"""Argument checks of `ExponentialMovingAverage`, with errors in Keras' style."""

import numbers
import re

import keras

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


def check_float_dtype(dtype):
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
    if standard == "float64" and keras.backend.backend() == "jax":
        import jax

        if not jax.config.jax_enable_x64:
            raise ValueError(
                "ExponentialMovingAverage does not support "
                "`average_dtype='float64'` while JAX runs without 64-bit "
                "floats: it would silently use float32. Instead, call "
                "`jax.config.update('jax_enable_x64', True)` first."
            )
    return standard


def compile_patterns(exclude):
    if exclude is None:
        return []
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = []
    for pattern in exclude:
        try:
            patterns.append(re.compile(pattern))
        except (re.error, TypeError) as error:
            raise ValueError(
                "ExponentialMovingAverage requires `exclude` to hold regular "
                f"expressions. Received: {pattern!r}, which does not compile "
                f"({error}). Instead, pass e.g. exclude=['bias$']."
            ) from None
    return patterns


def check_model(model, what):
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            f"`{what}` requires a Keras model or layer. Received: "
            f"model={model!r} of type {type(model).__name__}. Instead, pass "
            "the `keras.Model` compiled with this optimizer."
        )


def check_variables(var_list, what):
    var_list = list(var_list)
    bad = [v for v in var_list if not hasattr(v, "assign")]
    if bad:
        raise ValueError(
            f"`{what}` requires variables (`keras.Variable` or "
            f"`tf.Variable`). Received: {bad[0]!r} of type "
            f"{type(bad[0]).__name__}. Instead, pass e.g. `model.variables`."
        )
    return var_list
