"""keras-ema: exponential moving averages of weights for Keras 3.

`import keras_ema` leaves the process's standard error alone; the programs
of keras-ema (`python -m keras_ema...`) hide TensorFlow's start-up notices
on a machine without a GPU (`keras_ema/_startup.py`).
"""

from keras_ema import _startup

_startup.import_keras()

from keras_ema import schedules  # noqa: E402
from keras_ema.average_checkpoint import AverageModelCheckpoint  # noqa: E402
from keras_ema.batch_norm import update_bn  # noqa: E402
from keras_ema.callbacks import SwapAverageWeights  # noqa: E402
from keras_ema.checkpoint_averaging import CheckpointAveraging  # noqa: E402
from keras_ema.export import export_averaged  # noqa: E402
from keras_ema.loading import load_averaged  # noqa: E402
from keras_ema.optimizer import ExponentialMovingAverage  # noqa: E402
from keras_ema.posthoc_ema import PostHocEMA  # noqa: E402
from keras_ema.snapshots import PostHocSnapshots  # noqa: E402
from keras_ema.soup import greedy_soup, soup  # noqa: E402
from keras_ema.sweep import sweep_sigma_rel  # noqa: E402
from keras_ema.synthesis import synthesize  # noqa: E402

__version__ = "0.4.0"

__all__ = [
    "AverageModelCheckpoint",
    "CheckpointAveraging",
    "ExponentialMovingAverage",
    "PostHocEMA",
    "PostHocSnapshots",
    "SwapAverageWeights",
    "export_averaged",
    "greedy_soup",
    "load_averaged",
    "schedules",
    "soup",
    "sweep_sigma_rel",
    "synthesize",
    "update_bn",
]
