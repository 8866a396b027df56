"""keras-io's DDIM example, scaled down and ported as the migration guide
says: its hand-kept `ema_network` becomes `optimizer.call_with_averages`.

The keras-io program (examples/generative/ddim.py) trains a U-Net with
BatchNorm to predict the noise of noisy images, validates with the EMA
network (its `test_step` calls `denoise(training=False)`) and samples with
it (`reverse_diffusion`). Here the network is a one-block U-Net on 8x8
digits, the EMA decay 0.9 over 8 updates (keras-io: 0.999 over thousands),
and the noise and diffusion times are drawn once in NumPy and passed as
data, so that both runs see the same ones on every backend. The port is
checked against the hand-kept network computed in the same test with the
documented settings: the validation loss of every epoch and the images
generated at every epoch's end.
"""

import math

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import numpy
from keras import layers
from keras import ops
from test_hand_kept_ema import HandKept

import keras_ema

DECAY = 0.9
EPOCHS, BATCH = 2, 32
MIN_SIGNAL_RATE, MAX_SIGNAL_RATE = 0.02, 0.95
SAMPLING_STEPS = 5


# Registered, as in keras-io: `clone_model` rebuilds the Lambda from config.
@keras.saving.register_keras_serializable(package="keras_ema_tests")
def _sinusoidal_embedding(x):
    frequencies = ops.exp(ops.linspace(0.0, math.log(100.0), 4))
    angular_speeds = ops.cast(2.0 * math.pi * frequencies, "float32")
    return ops.concatenate(
        [ops.sin(angular_speeds * x), ops.cos(angular_speeds * x)], axis=3)


def _network():
    """keras-io's `get_network` shrunk to one block: embedding of the noise
    variance, BatchNorm (its statistics are averaged by hand too), a swish
    convolution, and the zero-initialized output."""
    noisy_images = keras.Input((8, 8, 1))
    noise_variances = keras.Input((1, 1, 1))
    e = layers.Lambda(_sinusoidal_embedding, output_shape=(1, 1, 8))(
        noise_variances)
    e = layers.UpSampling2D(size=8, interpolation="nearest")(e)
    x = layers.Conv2D(8, kernel_size=1)(noisy_images)
    x = layers.Concatenate()([x, e])
    x = layers.BatchNormalization(center=False, scale=False)(x)
    x = layers.Conv2D(8, kernel_size=3, padding="same", activation="swish")(x)
    x = layers.Conv2D(1, kernel_size=1, kernel_initializer="zeros")(x)
    return keras.Model([noisy_images, noise_variances], x, name="unet")


def _diffusion_schedule(diffusion_times):
    start_angle = math.acos(MAX_SIGNAL_RATE)
    end_angle = math.acos(MIN_SIGNAL_RATE)
    angles = start_angle + diffusion_times * (end_angle - start_angle)
    return ops.sin(angles), ops.cos(angles)  # noise rates, signal rates


class Diffusion:
    """keras-io's `DiffusionModel`: trains `self.network`, and denoises with
    `self.averaged`, the EMA network, when not training (validation and
    sampling)."""

    def denoise(self, noisy_images, noise_rates, signal_rates, training):
        inputs = [noisy_images, noise_rates**2]
        if training:
            pred_noises = self.network(inputs, training=True)
        else:
            pred_noises = self.averaged(inputs)
        pred_images = (noisy_images - noise_rates * pred_noises) / signal_rates
        return pred_noises, pred_images

    def call(self, inputs, training=False):
        # keras-io's train and test steps; `compile(loss="mae")` compares
        # the predicted noises with the true ones, the targets.
        images, noises, diffusion_times = inputs
        noise_rates, signal_rates = _diffusion_schedule(diffusion_times)
        noisy_images = signal_rates * images + noise_rates * noises
        pred_noises, _ = self.denoise(noisy_images, noise_rates, signal_rates,
                                      training)
        return pred_noises

    def generate(self, initial_noise):
        """keras-io's `reverse_diffusion`: deterministic DDIM sampling."""
        step_size = 1.0 / SAMPLING_STEPS
        ones = ops.ones((initial_noise.shape[0], 1, 1, 1))
        next_noisy_images = ops.convert_to_tensor(initial_noise)
        for step in range(SAMPLING_STEPS):
            noisy_images = next_noisy_images
            diffusion_times = ones - step * step_size
            noise_rates, signal_rates = _diffusion_schedule(diffusion_times)
            pred_noises, pred_images = self.denoise(
                noisy_images, noise_rates, signal_rates, training=False)
            next_noise_rates, next_signal_rates = _diffusion_schedule(
                diffusion_times - step_size)
            next_noisy_images = (next_signal_rates * pred_images
                                 + next_noise_rates * pred_noises)
        return numpy(pred_images)


class HandKeptDDIM(Diffusion, HandKept):
    """keras-io's program: the EMA network a clone moved by hand."""

    def averaged(self, inputs):
        return self.ema_network(inputs, training=False)


class PortedDDIM(Diffusion, keras.Model):
    """The port: no second network; the averages through the teacher."""

    def __init__(self, network, **kwargs):
        super().__init__(**kwargs)
        self.network = network

    def averaged(self, inputs):
        return self.optimizer.call_with_averages(self.network, inputs,
                                                 training=False)


def _data():
    from sklearn import datasets

    images = datasets.load_digits().images[:160].astype("float32") / 16.0
    # keras-io normalizes with an adapted `Normalization` layer.
    images = ((images - images.mean()) / images.std())[..., None]
    rng = np.random.default_rng(0)
    noises = rng.normal(size=images.shape).astype("float32")
    times = rng.uniform(size=(len(images), 1, 1, 1)).astype("float32")
    x = (images, noises, times)
    train = tuple(a[:128] for a in x), noises[:128]
    validation = tuple(a[128:] for a in x), noises[128:]
    initial_noise = rng.normal(size=(8, 8, 8, 1)).astype("float32")
    return train, validation, initial_noise


def _run(model, optimizer):
    """Trains `model` as keras-io does. Returns each epoch's validation
    loss and the images generated at each epoch's end (keras-io plots
    them there), and, after training, those the raw weights generate and
    their validation loss."""
    train, validation, initial_noise = _data()
    model.compile(optimizer=optimizer, loss="mae")
    if isinstance(optimizer, keras_ema.ExponentialMovingAverage):
        optimizer.shadow_copy(model)  # for trainable_weights_only=False
    generated = []
    history = model.fit(
        *train, validation_data=validation, batch_size=BATCH, epochs=EPOCHS,
        shuffle=False, verbose=0, callbacks=[keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: generated.append(
                model.generate(initial_noise)))],
    )
    result = {"val_loss": history.history["val_loss"], "generated": generated}
    # The raw weights, eagerly: what the EMA network is not.
    model.averaged = lambda inputs: model.network(inputs, training=False)
    result["raw_generated"] = model.generate(initial_noise)
    result["raw_val_loss"] = float(np.mean(np.abs(
        numpy(model(validation[0])) - validation[1])))
    return result


@pytest.fixture(scope="module")
def runs():
    """The keras-io program and its port, same seed, same data."""
    keras.utils.set_random_seed(0)
    hand_kept = _run(HandKeptDDIM(_network(), ema=DECAY),
                     keras.optimizers.Adam(0.01))
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.Adam(0.01), average_decay=DECAY, dynamic_decay=False,
        trainable_weights_only=False)
    ported = _run(PortedDDIM(_network()), opt)
    keras.backend.clear_session()
    return hand_kept, ported


# How close: the averages of the two runs are a few float32 roundings apart
# (tests/test_hand_kept_ema.py bounds them: ~1e-7 of the weights' scale
# here); the sampler divides by signal rates down to 0.02, so the images
# agree to ~1e-6 of their scale, the validation losses (means over 32 images)
# to ~1e-7. Both tolerances leave a factor of 10; what they must tell apart
# (one epoch's averages from the next's, the raw weights) differs by 1e-3
# of the losses and 1e-2 of the images, or more.
def test_generation_from_the_averages_is_the_hand_kept_networks(runs):
    hand_kept, ported = runs
    assert len(ported["generated"]) == EPOCHS
    for epoch in range(EPOCHS):
        expected = hand_kept["generated"][epoch]
        off = np.abs(ported["generated"][epoch] - expected).max()
        scale = np.abs(expected).max()
        print(f"epoch {epoch + 1}: generated images {off:.3g} apart, "
              f"{off / scale:.3g} of their scale")
        assert off <= 1e-5 * scale
    # What the sampler sees changes every epoch, and is not the raw weights.
    for a, b in zip(ported["generated"], ported["generated"][1:]):
        assert np.abs(a - b).max() > 1e-2
    raw_off = np.abs(ported["generated"][-1] - ported["raw_generated"]).max()
    assert raw_off > 1e-2


def test_validation_through_the_teacher_is_the_hand_kept_networks(runs):
    # Keras' own test step calls `model(x, training=False)`: the teacher in
    # the port, the EMA network in keras-io's program.
    hand_kept, ported = runs
    print("val_loss", hand_kept["val_loss"], ported["val_loss"])
    np.testing.assert_allclose(ported["val_loss"], hand_kept["val_loss"],
                               rtol=1e-6)
    # Each epoch validates other averages, and not the raw weights.
    assert min(np.abs(np.diff(hand_kept["val_loss"]))) > 1e-3
    assert abs(ported["raw_val_loss"] - ported["val_loss"][-1]) > 1e-3
