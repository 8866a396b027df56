"""Mean teacher: self-distillation from the average of the student's weights.

The teacher is the student's exponential moving average (Tarvainen and
Valpola 2017), called inside the student's own train step with
`optimizer.call_with_averages`: no second model, no swap, one compiled step.
The loss is the supervised cross-entropy plus `consistency` times the mean
squared distance between the student's and the teacher's class
probabilities; the teacher's decay rises along BYOL's cosine schedule (`schedules.Cosine`).
Trains on scikit-learn's digits (nothing is downloaded):

    python -m keras_ema.examples.mean_teacher    # about 15 s on 2 CPU cores

Uses keras-ema's public API only (`ExponentialMovingAverage`, `schedules`,
`SwapAverageWeights`), and `keras_ema.demo.start` to start as keras-ema's
other programs do.
"""

import argparse
import sys

import keras
from keras import ops

import keras_ema

# SGD's `global_clipnorm`, as in keras-ema's demo: at this learning rate an
# occasional seed blows up without it.
CLIPNORM = 5.0


def load_digits(seed=0):
    """scikit-learn's digits as 8x8x1 float32 images in [0, 1]: a stratified
    split, three quarters to train, `(x, y), (x_val, y_val)`."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    x, y = datasets.load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32").reshape(-1, 8, 8, 1)
    x, x_val, y, y_val = train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=seed)
    return (x, y), (x_val, y_val)


def build_student():
    """The student: a small CNN for 8x8 grey images, 10 class probabilities."""
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


@keras.saving.register_keras_serializable(package="keras_ema_examples")
class MeanTeacher(keras.Model):
    """A classifier trained with a consistency loss to its own average.

    Args:
        student: The `keras.Model` to train (probabilities out).
        consistency: Weight of the consistency term.
    """

    def __init__(self, student, consistency=1.0, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.consistency = consistency
        self.consistency_loss = keras.metrics.Mean(name="consistency")
        # How many times the training `compute_loss` ran as Python: once per
        # trace of a compiled step (TensorFlow, JAX), once per step on torch.
        self.traces = 0

    def call(self, x, training=False):
        return self.student(x, training=training)

    def teacher(self, x):
        """The teacher's probabilities: the student with its averages."""
        optimizer = self.optimizer
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            # Under mixed_float16, `compile` wraps the optimizer.
            optimizer = optimizer.inner_optimizer
        return optimizer.call_with_averages(self, x, training=False)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        if training:
            self.traces += 1
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        distance = ops.mean(ops.square(y_pred - self.teacher(x)))
        self.consistency_loss.update_state(distance)
        return loss + self.consistency * distance

    @property
    def metrics(self):
        return [*super().metrics, self.consistency_loss]

    def get_config(self):
        return {
            **super().get_config(),
            "student": keras.saving.serialize_keras_object(self.student),
            "consistency": self.consistency,
        }

    @classmethod
    def from_config(cls, config):
        student = keras.saving.deserialize_keras_object(config.pop("student"))
        return cls(student, **config)


def build(steps, learning_rate=0.05, consistency=1.0, jit_compile="auto"):
    """A compiled `MeanTeacher` on the digits' CNN, teacher decay from 0.9
    to 0.999 over `steps` updates (BYOL rises from 0.996 to 1 over runs a
    hundred times longer)."""
    model = MeanTeacher(build_student(), consistency=consistency)
    optimizer = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(learning_rate, momentum=0.9,
                             global_clipnorm=CLIPNORM),
        average_decay=keras_ema.schedules.Cosine(0.9, 0.999, steps=steps),
    )
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=jit_compile)
    model.build((None, 8, 8, 1))
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_ema.examples.mean_teacher",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    from keras_ema import demo

    # One line if scikit-learn is missing; TensorFlow's notices hidden.
    demo.start(parser.prog)
    keras.utils.set_random_seed(0)
    (x, y), (x_val, y_val) = load_digits()
    steps = args.epochs * -(-len(x) // args.batch_size)
    model = build(steps)
    model.fit(x, y, batch_size=args.batch_size, epochs=args.epochs,
              validation_data=(x_val, y_val), verbose=2,
              callbacks=[keras_ema.SwapAverageWeights(log_raw_metrics=True)])
    teacher = ops.convert_to_numpy(model.teacher(x_val))
    accuracy = float((teacher.argmax(-1) == y_val).mean())
    print(f"teacher (the average) validation accuracy: {accuracy:.4f}; "
          f"compute_loss traced {model.traces} time(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
