"""`update_bn`: BatchNormalization statistics recomputed for the weights."""

import contextlib
import itertools
import numbers
import sys

import keras
import numpy as np
from keras import ops

from keras_ema import _atomic


def update_bn(model, data, steps=None, batch_size=32):
    """Recomputes the BatchNormalization statistics for the current weights.

    A `BatchNormalization` layer's moving statistics estimate the mean and
    variance of its input under the weights they were collected with. The
    averaged weights (inside `averaged_weights()`) feed each layer other
    inputs: neither the raw statistics nor their averages are the right
    ones, and stochastic weight averaging (SWA) recomputes them. Like
    `torch.optim.swa_utils.update_bn`, this runs the model once over `data`,
    in training mode, and sets in every `BatchNormalization` layer, nested
    layers and models included, the mean over the `B` batches of what the
    layer computes for the batch, each batch counting the same whatever its
    size: `moving_mean = sum_b mean_b / B` and
    `moving_variance = sum_b variance_b / B`, `variance_b` being the biased
    variance of the batch, as the layer computes it in training.

    Nothing else changes: no weight, no other non-trainable state (the seed
    of a `Dropout`, which moves from batch to batch during the pass, is back
    as it was; an unseeded one on torch draws from torch's global
    generator), no metric, no optimizer variable. The statistics are
    assigned at the end, all at once: an error or a Ctrl-C during the pass
    leaves the model as it was. A layer that does not update its statistics
    in training (frozen with `trainable=False`, or called with
    `training=False`) keeps them; a layer called more than once per batch
    gets the statistics of its last call.

    Args:
        model: A built `keras.Model` (or layer) with `BatchNormalization`
            layers.
        data: The inputs, in any form the model's `fit` takes: arrays
            (a dict or list of them for several inputs), cut into batches
            of `batch_size`, or `(x,)`, `(x, y)`, `(x, y, sample_weight)` of
            those (only `x` is used); or a `tf.data.Dataset`, a
            `keras.utils.PyDataset` or another iterable of batches (a
            generator, a `torch.utils.data.DataLoader`, a list), each
            batch read as `fit` reads one. A list of arrays is one per
            input for a functional model with several inputs, else a list
            of batches: for a subclassed model, pass `(x,)` or a dict.
        steps: The most batches to use, or `None` (default) for all of
            `data`. Required for an infinite dataset.
        batch_size: Int, the batch size when `data` holds arrays. Ignored
            for datasets and iterables, which are batched already.

    Returns:
        The number of batches used.

    Example:

    ```python
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), average_decay=0.999
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, epochs=5)
    with opt.averaged_weights():
        keras_ema.update_bn(model, x)
        model.evaluate(x_val, y_val)
    ```

    After the block the raw weights are back, and the recomputed statistics
    stay in the model, over the raw ones, or, with
    `trainable_weights_only=False`, in the optimizer, over the averages of
    the statistics. To validate with recomputed statistics and keep both,
    pass `update_bn_data` to `keras_ema.SwapAverageWeights`.
    """
    steps = check_count(steps, "steps", "update_bn", optional=True)
    batch_size = check_count(batch_size, "batch_size", "update_bn")
    layers = _updated_layers(model)
    if steps is None and _is_infinite(data):
        raise ValueError(
            "update_bn does not support an infinite `data` without `steps`: "
            "the pass would never end. Instead, pass `steps`, the number of "
            "batches to use."
        )
    batches = _batches(data, batch_size, _input_count(model))
    if steps is not None:
        batches = itertools.islice(batches, steps)
    statistics = [v for layer in layers for v in _statistics_of(layer)]
    momenta = [layer.momentum for layer in layers]
    try:
        # With momentum 0 a layer's update in training mode sets its moving
        # statistics to those of the batch: `moving * 0 + batch * 1`.
        for layer in layers:
            layer.momentum = 0.0
        sums, counts, n = _run(model, statistics, batches)
    finally:
        with _atomic.deferred_signals():
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum
    if n == 0:
        raise ValueError(
            "update_bn does not support an empty `data`: there is no batch "
            "to compute statistics from. Instead, pass at least one batch "
            "of inputs."
        )
    if not counts.any():
        raise ValueError(
            "update_bn found no BatchNormalization layer that updates its "
            "statistics when the model runs in training mode: each is "
            "called with `training=False`. Instead, call the layers without "
            "fixing `training`, so that `model(x, training=True)` updates "
            "them."
        )
    # Converted first, so that the assignments alone are all or nothing.
    means = [
        (v, ops.convert_to_tensor(total / count, dtype=v.dtype))
        for v, total, count in zip(statistics, sums, counts)
        if count
    ]
    with _atomic.deferred_signals():
        for variable, value in means:
            variable.assign(value)
    return n


def batch_norm_statistics(model):
    """The `moving_mean` and `moving_variance` variables of a model's
    `BatchNormalization` layers (nested ones too), in layer order."""
    return [
        v for layer in batch_norm_layers(model) for v in _statistics_of(layer)
    ]


def record_statistics(model):
    """`(variable, copy of its value)` for `batch_norm_statistics(model)`."""
    return [
        (v, np.array(ops.convert_to_numpy(v.value)))
        for v in batch_norm_statistics(model)
    ]


def put_back(recorded):
    """Assigns what `record_statistics` recorded, all or nothing."""
    with _atomic.deferred_signals():
        for variable, value in recorded:
            variable.assign(value)


def check_options(data, steps, owner):
    """Checks `update_bn_data` and `update_bn_steps`; returns the steps.

    Refuses, before any pass, a `data` that cannot serve every pass.
    """
    if data is None:
        if steps is not None:
            raise ValueError(
                f"{owner} does not support `update_bn_steps` without "
                "`update_bn_data`: there is nothing to take the steps from. "
                f"Received: update_bn_steps={steps!r}. Instead, also pass "
                "`update_bn_data`, e.g. the training inputs."
            )
        return None
    if _batches(data, 1) is data or (
        isinstance(data, (list, tuple)) and not data
    ):
        raise ValueError(
            f"{owner} does not support an iterator or an empty sequence as "
            "`update_bn_data`: every validation makes a pass over it, and "
            "an iterator is used up by the first. Instead, pass an array of "
            "inputs, a `tf.data.Dataset`, a `keras.utils.PyDataset` or a "
            "list of batches."
        )
    return check_count(steps, "update_bn_steps", owner, optional=True)


def check_has_layers(model, owner):
    if not batch_norm_layers(model):
        raise ValueError(
            f"{owner} does not support `update_bn_data` for a model without "
            "BatchNormalization layers: there are no statistics to "
            "recompute. Instead, leave `update_bn_data` out."
        )


def check_count(value, name, owner, optional=False):
    """`value` must be an int >= 1, or `None` when `optional`."""
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < 1
    ):
        also = " or None" if optional else ""
        raise ValueError(
            f"{owner} requires `{name}` to be an integer >= 1{also}. "
            f"Received: {name}={value!r}. Instead, pass e.g. {name}=10."
        )
    return int(value)


def _run(model, statistics, batches):
    """The pass: per-variable float64 sums of the batch statistics, the
    number of batches each variable was updated in, the number of batches.
    """
    ids = {id(v) for v in statistics}
    sums = [np.zeros(v.shape, np.float64) for v in statistics]
    counts = np.zeros(len(statistics), np.int64)
    # Other state a call moves (a Dropout's seed) goes on to the next batch
    # (or every batch would get the same dropout mask), never to the model.
    carried = {}
    n = 0
    # A non-finite statistic would stay one: 0 * inf is NaN.
    mapping = [(v, _finite(v)) for v in statistics]
    with _no_grad():
        for batch in batches:
            x = _inputs(batch)
            with keras.StatelessScope(
                state_mapping=mapping + list(carried.values())
            ) as scope:
                given = [scope.get_current_value(v) for v in statistics]
                model(x, training=True)
            for i, v in enumerate(statistics):
                value = scope.get_current_value(v)
                if value is not given[i]:
                    sums[i] += ops.convert_to_numpy(value)
                    counts[i] += 1
            for v in model.non_trainable_variables:
                value = scope.get_current_value(v)
                if value is not None and id(v) not in ids:
                    carried[id(v)] = (v, value)
            n += 1
    return sums, counts, n


def _finite(variable):
    value = variable.value
    return ops.where(ops.isfinite(value), value, ops.zeros_like(value))


def _no_grad():
    # Eager torch would record an autograd graph of the whole pass.
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def batch_norm_layers(model):
    """The model's `BatchNormalization` layers, nested ones too."""
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _statistics_of(layer):
    if layer.moving_mean is None:
        return []
    return [layer.moving_mean, layer.moving_variance]


def _updated_layers(model):
    """The BatchNormalization layers whose statistics to recompute."""
    if not isinstance(model, keras.layers.Layer):
        raise ValueError(
            "update_bn does not support a model that is not a Keras model or "
            f"layer. Received: model of type {type(model).__name__}. "
            "Instead, pass the `keras.Model` itself."
        )
    layers = batch_norm_layers(model)
    if not layers:
        raise ValueError(
            "update_bn does not support a model without "
            "BatchNormalization layers: it has no statistics to recompute. "
            f"Received: model={model.name!r}. Instead, call it on a model "
            "that has `keras.layers.BatchNormalization` layers."
        )
    if not model.built or any(layer.moving_mean is None for layer in layers):
        raise ValueError(
            "update_bn does not support a model that is not built: its "
            "BatchNormalization layers have no statistics yet. Instead, "
            "build it first, e.g. with `model.build(input_shape)` or by "
            "calling it on a batch."
        )
    # `renorm` exists from Keras 3.14 on.
    renorm = [layer.name for layer in layers
              if getattr(layer, "renorm", False)]
    if renorm:
        raise ValueError(
            "update_bn does not support BatchNormalization layers with "
            f"`renorm=True`. Received: {renorm}. Instead, use layers "
            "without batch renormalization."
        )
    layers = [layer for layer in layers if layer.trainable]
    if not layers:
        raise ValueError(
            "update_bn does not support a model whose BatchNormalization "
            "layers are all frozen (`trainable=False`): they keep their "
            "statistics in training mode too. Instead, unfreeze the layers "
            "to recompute (`layer.trainable = True`)."
        )
    return layers


# -- data ---------------------------------------------------------------------


def _batches(data, batch_size, inputs=None):
    """An iterator over the batches of `data`, each as `fit` reads one: `x`,
    or a tuple `(x, y)` or `(x, y, sample_weight)`. `inputs` is the number
    of inputs of the model, when known."""
    if _is_array(data) or _is_arrays(data, dict) or (
        # As `fit` reads them: a list of arrays is one array per input. For
        # a model of one input, or when the count is not known (a subclassed
        # model), a list holds batches.
        inputs is not None and inputs > 1 and isinstance(data, list)
        and len(data) == inputs and all(_is_array(item) for item in data)
    ):
        return _slices(data, batch_size)
    if isinstance(data, tuple):
        x = keras.utils.unpack_x_y_sample_weight(data)[0]
        if _is_array(x) or _is_arrays(x, (dict, list, tuple)):
            return _slices(x, batch_size)
        raise ValueError(
            "update_bn does not support a tuple `data` whose first item is "
            f"not an array. Received: x of type {type(x).__name__}. Instead, "
            "pass `(x, y)` with `x` an array or tensor of inputs (or a list "
            "or dict of them), or a list of batches."
        )
    if _is_tf_dataset(data) and keras.backend.backend() != "tensorflow":
        return data.as_numpy_iterator()
    try:
        return iter(data)
    except TypeError:
        raise ValueError(
            f"update_bn does not support `data` of type {type(data).__name__}. "
            "Instead, pass a NumPy array or tensor of inputs (or a list or "
            "dict of them), a tuple `(x, y)`, a `tf.data.Dataset`, a "
            "`keras.utils.PyDataset` or an iterable of batches."
        ) from None


def _input_count(model):
    """How many inputs a functional model takes, or None if unknown."""
    try:
        return len(model.inputs)
    except (AttributeError, TypeError, ValueError):
        return None


def _inputs(batch):
    # Keras' rule for a batch, as `fit` unpacks one: a list is a tuple.
    return keras.utils.unpack_x_y_sample_weight(batch)[0]


def _slices(x, batch_size):
    size = int(keras.tree.flatten(x)[0].shape[0])
    for start in range(0, size, batch_size):
        # `(x,)`: a list of inputs must not be read as `(x, y)`.
        yield (keras.tree.map_structure(
            lambda a: a[start:start + batch_size], x
        ),)


def _is_array(value):
    # NumPy arrays and the tensors of every backend (TF, JAX, torch).
    return hasattr(value, "__array__") and bool(getattr(value, "shape", ()))


def _is_arrays(value, kinds):
    if not isinstance(value, kinds) or not value:
        return False
    return all(_is_array(leaf) for leaf in keras.tree.flatten(value))


def _is_tf_dataset(data):
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(data, tf.data.Dataset)


def _is_infinite(data):
    if isinstance(data, keras.utils.PyDataset):
        try:
            return data.num_batches is None
        except NotImplementedError:
            return True
    if _is_tf_dataset(data):
        import tensorflow as tf

        return int(data.cardinality()) == int(tf.data.INFINITE_CARDINALITY)
    return False
