"""Worked examples of keras-ema, each runnable as `python -m keras_ema.examples.<name>`."""
