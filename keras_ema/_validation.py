"""Scoring a model on validation data, for `sweep_sigma_rel` and the soups.

What `fit` takes as `validation_data`, evaluated as `fit` would, and which
metrics are better higher.
"""

import collections.abc

import keras

_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou", "r2")


def higher_is_better(metric):
    """Whether a larger `metric` is better (accuracy, AUC, R2...)."""
    return any(h in metric for h in _HIGHER_IS_BETTER)


def check_validation_data(data, user, what="every width"):
    """Refuses, before any work, data that the first evaluation uses up;
    `user` names the caller, `what` what is evaluated on it."""
    if isinstance(data, collections.abc.Iterator):
        raise ValueError(
            f"{user} does not support a generator or iterator as "
            f"`validation_data`: {what} is evaluated on it, and the "
            "first evaluation uses it up. Instead, pass a function that "
            "returns a fresh one (`validation_data=lambda: batches()`), "
            "which is called for each evaluation, or arrays `(x, y)`, a "
            "`tf.data.Dataset` or a `keras.utils.PyDataset`."
        )


def evaluate(model, data, batch_size):
    """`model.evaluate` on `data` as `fit` reads `validation_data`: `(x, y)`
    or `(x, y, sample_weight)`, or a dataset; a function is called for a
    fresh one."""
    if callable(data):
        data = data()
    kwargs = dict(batch_size=batch_size, verbose=0, return_dict=True)
    if isinstance(data, (tuple, list)):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        logs = model.evaluate(x, y, sample_weight=sample_weight, **kwargs)
    else:
        logs = model.evaluate(data, **kwargs)
    return {k: float(v) for k, v in logs.items()}
