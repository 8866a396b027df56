"""The hand-kept EMA network of keras-io's diffusion examples, and the
keras-ema settings that reproduce it (docs/guides/migrating.md, "A hand-kept
EMA network").

The hand-kept network is a clone of the network with its weights copied in,
moved at the end of every train step by
`ema_weight.assign(ema * ema_weight + (1 - ema) * weight)` over
`network.weights`, BatchNorm statistics included (keras-io's DDPM and DDIM).
"""

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import bits
from conftest import numpy
from conftest import regression_data
from conftest import small_model

import keras_ema

DECAY = 0.95
EPOCHS, BATCH = 5, 8
UPDATES = EPOCHS * 64 // BATCH  # on `regression_data()`'s 64 samples


class HandKept(keras.Model):
    """keras-io's pattern: the network, and an EMA network kept by hand."""

    def __init__(self, network, ema, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.ema_network = keras.models.clone_model(network)
        self.ema_network.set_weights(network.get_weights())
        # Never trained: on JAX its weights then travel in the step's
        # non-trainable state, where the step below moves them.
        self.ema_network.trainable = False
        self.ema = ema

    def call(self, x, training=False):
        return self.network(x, training=training)

    def train_step(self, *args):
        if BACKEND == "jax":
            return self._stateless_train_step(*args)
        logs = super().train_step(*args)
        for weight, ema_weight in zip(self.network.weights,
                                      self.ema_network.weights):
            ema_weight.assign(self.ema * ema_weight + (1 - self.ema) * weight)
        return logs

    def _stateless_train_step(self, state, data):
        # The same update on JAX, where the step returns the new state.
        logs, (trainable, non_trainable, optimizer_values, metric_values) = (
            super().train_step(state, data))
        value = {id(v): x for v, x in zip(self.trainable_variables, trainable)}
        value.update({id(v): x for v, x in
                      zip(self.non_trainable_variables, non_trainable)})
        position = {id(v): i for i, v in
                    enumerate(self.non_trainable_variables)}
        non_trainable = list(non_trainable)
        for weight, ema_weight in zip(self.network.weights,
                                      self.ema_network.weights):
            non_trainable[position[id(ema_weight)]] = (
                self.ema * value[id(ema_weight)]
                + (1 - self.ema) * value[id(weight)])
        return logs, (trainable, non_trainable, optimizer_values,
                      metric_values)


def _train(model):
    x, y = regression_data()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)


@pytest.fixture(scope="module")
def hand_kept():
    """The hand-kept run: its raw weights, its EMA network's weights, and
    the EMA network's output on held-out inputs."""
    keras.utils.set_random_seed(0)
    model = HandKept(small_model(batchnorm=True), ema=DECAY)
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    _train(model)
    x, _ = regression_data(16, seed=1)
    result = {
        "raw": [numpy(w) for w in model.network.weights],
        "ema": [numpy(w) for w in model.ema_network.weights],
        "output": numpy(model.ema_network(x, training=False)),
    }
    keras.backend.clear_session()
    return result


def _keras_ema(**settings):
    """The same network and data, trained with keras-ema."""
    keras.utils.set_random_seed(0)
    model = small_model(batchnorm=True)
    opt = keras_ema.ExponentialMovingAverage(keras.optimizers.Adam(0.01),
                                             average_decay=DECAY, **settings)
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    _train(model)
    return model, opt


def _averages(model, opt):
    """Each weight's average, or the weight where it has none."""
    return [numpy(opt.average(w) if opt.average(w) is not None else w)
            for w in model.weights]


# Both runs make the same raw updates: bit for bit on TensorFlow and PyTorch;
# on JAX, XLA compiles the two train steps into differently fused kernels,
# whose float32 roundings leave the raw weights a few ulp apart. The
# averaging arithmetic differs too: `ema * e + (1 - ema) * w` against
# keras-ema's `a - (1 - ema) * (a - w)`, each within a few float32 roundings
# of the exact update. The difference of two such recursions grows by at
# most ~4 ulp of the largest weight per update, plus the raw weights'
# difference (the decay only shrinks what is already there), so after 40
# updates it stays below 40 * 4 * 2**-24 * max|w| + max|raw difference|.
RAW_ULPS = 0 if BACKEND != "jax" else 8


def _check_raw(hand_kept, model):
    for raw, weight in zip(hand_kept["raw"], model.weights):
        ulps = np.abs(bits(raw).astype("int64") - bits(weight).astype("int64"))
        assert ulps.max() <= RAW_ULPS, (weight.path, ulps.max())
    return max(np.abs(raw - numpy(w)).max()
               for raw, w in zip(hand_kept["raw"], model.weights))


def _bound(ema, raw, raw_difference=0.0):
    largest = max(np.abs(ema).max(), np.abs(raw).max())
    return UPDATES * 4 * 2.0**-24 * largest + raw_difference


def test_fixed_decay_and_all_weights_reproduce_the_hand_kept_ema_network(
        hand_kept):
    model, opt = _keras_ema(dynamic_decay=False, trainable_weights_only=False)
    raw_difference = _check_raw(hand_kept, model)
    averages = _averages(model, opt)
    for ema, raw, average, weight in zip(hand_kept["ema"], hand_kept["raw"],
                                         averages, model.weights):
        bound = _bound(ema, raw, raw_difference)
        off = np.abs(average - ema).max()
        print(f"{weight.path}: {off:.3g} off the hand-kept network "
              f"(bound {bound:.3g})")
        assert off <= bound, weight.path
        # A real average: it left the weights it averages.
        assert np.abs(average - raw).max() > 100 * bound
    # `ema_network(x, training=False)` is `call_with_averages`: from
    # averages within the bound above, outputs within a few times it.
    x, _ = regression_data(16, seed=1)
    teacher = numpy(opt.call_with_averages(model, x, training=False))
    np.testing.assert_allclose(teacher, hand_kept["output"], rtol=1e-5,
                               atol=1e-5)
    # And so is the exported network.
    with opt.averaged_weights():
        swapped = numpy(model(x, training=False))
    np.testing.assert_allclose(swapped, teacher, rtol=1e-6, atol=1e-6)


def test_keras_ema_defaults_differ_from_the_hand_kept_ema_network(hand_kept):
    # The migration guide's warnings. The default `dynamic_decay=True` caps
    # the decay at (1 + n) / (10 + n), below 0.95 for the first 170 updates;
    # the default `trainable_weights_only=True` leaves BatchNorm's moving
    # statistics without averages, so the teacher uses the raw ones.
    model, opt = _keras_ema()
    trainable = [i for i, w in enumerate(model.weights) if w.trainable]
    averages = _averages(model, opt)
    off = max(np.abs(averages[i] - hand_kept["ema"][i]).max()
              for i in trainable)
    assert off > 1000 * max(_bound(hand_kept["ema"][i], hand_kept["raw"][i])
                            for i in trainable)
    print(f"dynamic_decay=True: {off:.3g} off the hand-kept network")
    statistics = [w for w in model.weights if not w.trainable]
    assert statistics and all(opt.average(w) is None for w in statistics)
    x, _ = regression_data(16, seed=1)
    teacher = numpy(opt.call_with_averages(model, x, training=False))
    assert np.abs(teacher - hand_kept["output"]).max() > 1e-3


class TeacherAfterTheUpdate(keras.Model):
    """Logs, from inside its train step, the teacher's output once the
    optimizer has run: where a hand-kept EMA network would still hold the
    previous step's averages."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(1)

    def call(self, x, training=False):
        return self.dense(x)

    def train_step(self, *args):
        data = args[-1]
        result = super().train_step(*args)
        logs = result[0] if BACKEND == "jax" else result
        teacher = self.optimizer.call_with_averages(self, data[0][:4])
        logs = {**logs, "teacher": keras.ops.sum(teacher)}
        return (logs, result[1]) if BACKEND == "jax" else logs


def test_averages_move_inside_apply_gradients_before_the_rest_of_the_step():
    # docs/semantics.md: code after `apply_gradients` in the same step sees
    # the averages of this step's update.
    model = TeacherAfterTheUpdate()
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(0.1), average_decay=0.5, dynamic_decay=False)
    model.compile(optimizer=opt, loss="mse")
    x, y = regression_data(16)
    model(x)  # builds the Dense
    for _ in range(3):
        before = numpy(opt.call_with_averages(model, x[:4])).sum()
        logs = model.train_on_batch(x, y, return_dict=True)
        after = numpy(opt.call_with_averages(model, x[:4])).sum()
        assert abs(after - before) > 1e-2  # the step moved the averages
        assert logs["teacher"] == pytest.approx(after, rel=1e-6, abs=1e-6)
