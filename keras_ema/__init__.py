"""keras-ema: exponential moving averages of weights for Keras 3."""

from keras_ema import schedules
from keras_ema.average_checkpoint import AverageModelCheckpoint
from keras_ema.callbacks import SwapAverageWeights
from keras_ema.export import export_averaged
from keras_ema.optimizer import ExponentialMovingAverage

__version__ = "0.1.0"

__all__ = [
    "AverageModelCheckpoint",
    "ExponentialMovingAverage",
    "SwapAverageWeights",
    "export_averaged",
    "schedules",
]
