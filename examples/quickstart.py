"""Train a small classifier on scikit-learn's digits with keras-ema.

Prints the validation accuracy of the raw weights and of their average, and
saves the averaged model. Nothing is downloaded: the digits ship with
scikit-learn.

    python examples/quickstart.py
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_ema  # noqa: E402


def main():
    keras.utils.set_random_seed(0)
    x, y = load_digits(return_X_y=True)
    x_train, x_val, y_train, y_val = train_test_split(
        (x / 16.0).astype("float32"), y, test_size=0.3, random_state=0
    )
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    # A deliberately noisy set-up: a high learning rate and small batches.
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.3, momentum=0.9), average_decay=0.99
    )
    model.compile(
        optimizer=opt,
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train, y_train, batch_size=16, epochs=10, verbose=2,
        validation_data=(x_val, y_val),
        # val_* on the averages, val_raw_* on the raw weights.
        callbacks=[keras_ema.SwapAverageWeights(log_raw_metrics=True)],
    ).history
    print(f"validation accuracy, raw weights:      "
          f"{history['val_raw_accuracy'][-1]:.4f}")
    print(f"validation accuracy, averaged weights: "
          f"{history['val_accuracy'][-1]:.4f}")
    keras_ema.export_averaged(model, "digits_ema.keras")
    print("saved the averaged model to digits_ema.keras "
          "(loads without keras_ema)")

if __name__ == "__main__":
    main()
