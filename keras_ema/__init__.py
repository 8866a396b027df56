"""keras-ema: exponential moving averages of weights for Keras 3.

Importing keras_ema before TensorFlow hides TensorFlow's start-up notices on
a machine without a GPU (`keras_ema/_startup.py`); nothing else is hidden.
"""

import contextlib
import sys

from keras_ema import _startup

with (
    contextlib.nullcontext() if "tensorflow" in sys.modules
    else _startup.notices_hidden()
):
    try:
        import keras
    except ModuleNotFoundError as error:
        _startup.refuse_missing_backend(error)
    from keras_ema import schedules
    from keras_ema.average_checkpoint import AverageModelCheckpoint
    from keras_ema.batch_norm import update_bn
    from keras_ema.callbacks import SwapAverageWeights
    from keras_ema.export import export_averaged
    from keras_ema.loading import load_averaged
    from keras_ema.optimizer import ExponentialMovingAverage
    from keras_ema.posthoc_ema import PostHocEMA
    from keras_ema.snapshots import PostHocSnapshots
    from keras_ema.sweep import sweep_sigma_rel
    from keras_ema.synthesis import synthesize

__version__ = "0.2.0"

__all__ = [
    "AverageModelCheckpoint",
    "ExponentialMovingAverage",
    "PostHocEMA",
    "PostHocSnapshots",
    "SwapAverageWeights",
    "export_averaged",
    "load_averaged",
    "schedules",
    "sweep_sigma_rel",
    "synthesize",
    "update_bn",
]
