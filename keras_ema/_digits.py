"""The demos' task: scikit-learn's digits and a small CNN.

Shared by the demo (which makes it public), the post-hoc demo, the
mean-teacher example and the notebooks. `start` begins such a program:
one line if its extra is missing, then the backend's devices started with
TensorFlow's notices hidden.
"""

import argparse

import keras

from keras_ema import _startup

# SGD's `global_clipnorm`. Without it, at the default learning rate, one
# seed in ten (seed 9) diverged in its last epochs, raw and averaged weights
# alike; with it, the noise stays and the blow-ups go.
CLIPNORM = 5.0


def backend_name():
    """The Keras backend as its project spells it: "TensorFlow", "JAX"..."""
    backend = keras.backend.backend()
    return {"tensorflow": "TensorFlow", "jax": "JAX",
            "torch": "PyTorch"}.get(backend, backend)


def load_digits(seed=0, validation_fraction=0.25):
    """The digits as 8x8x1 float32 images in [0, 1], split in two.

    Args:
        seed: Int, seeds the stratified split.
        validation_fraction: Float in (0, 1), the share held out.

    Returns:
        `(x_train, y_train), (x_val, y_val)`, NumPy arrays.
    """
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    x, y = datasets.load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    x_train, x_val, y_train, y_val = train_test_split(
        x, y, test_size=validation_fraction, stratify=y, random_state=seed
    )
    return (x_train, y_train), (x_val, y_val)


def build_model():
    """A small CNN for 8x8 grey images and 10 classes."""
    return keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, activation="softmax"),
        ],
        name="digits_cnn",
    )


def start(program):
    """Exits with one line if the demo extra is missing, then starts quietly.

    Args:
        program: The command, named in the message.
    """
    _startup.require(
        program, {"sklearn": "scikit-learn", "matplotlib": "matplotlib"},
        extra="demo",
    )
    _startup.start_quietly()


def sgd(learning_rate):
    """The demos' optimizer: SGD with momentum 0.9 and `CLIPNORM`."""
    return keras.optimizers.SGD(
        learning_rate, momentum=0.9, global_clipnorm=CLIPNORM
    )


def add_run_arguments(parser, epochs, output_dir, output_help):
    """The arguments of one training run of the post-hoc and comparison
    demos: epochs, batch size, learning rate, seed, output folder."""
    parser.add_argument("--epochs", type=positive_int, default=epochs,
                        help="epochs to train")
    parser.add_argument("--batch-size", type=positive_int, default=16,
                        help="samples per update")
    parser.add_argument("--learning-rate", type=float, default=0.05,
                        help="learning rate of SGD (momentum 0.9, "
                             f"global_clipnorm {CLIPNORM:g})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the split, the weights and the shuffling")
    parser.add_argument("--output-dir", default=output_dir, help=output_help)


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text}")
    return value
