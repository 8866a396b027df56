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
`SwapAverageWeights`), and the demo's public task (`keras_ema.demo`: the
digits, the CNN, `start`).
"""

import argparse
import sys

import keras
from keras import ops

import keras_ema

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
    from keras_ema import demo

    model = MeanTeacher(demo.build_model(), consistency=consistency)
    optimizer = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(learning_rate, momentum=0.9,
                             global_clipnorm=demo.CLIPNORM),
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
    (x, y), (x_val, y_val) = demo.load_digits()
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
