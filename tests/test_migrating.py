"""The equivalences of docs/migrating.md, each against the peer's numbers.

Keras' `use_ema` runs for real. Model Garden, TF Addons and timm are not
installed: their update rules are written out below from their sources and
replayed, in float32 numpy, on the raw weights recorded during a real `fit`.
"""

import keras
import numpy as np
import pytest
from conftest import bits
from conftest import numpy
from conftest import regression_data
from conftest import small_model
from conftest import sync

import keras_ema
from keras_ema import schedules

LR = 0.05
F32 = np.float32


def _fit(opt, model=None, callbacks=(), everything=False):
    """Fits 16 batches; returns the model, the watched variables and their
    values before training and after every batch (after `callbacks`)."""
    model = model or small_model(batchnorm=everything)
    model.compile(optimizer=opt, loss="mse")
    if everything:
        opt.shadow_copy(model)
    watched = model.weights if everything else model.trainable_weights
    history = [[numpy(v).copy() for v in watched]]

    def record(batch, logs):
        sync(model)
        history.append([numpy(v).copy() for v in watched])

    record = keras.callbacks.LambdaCallback(on_train_batch_end=record)
    model.fit(*regression_data(), batch_size=8, epochs=2, shuffle=False,
              verbose=0, callbacks=[*callbacks, record])
    return model, watched, history


def _close(actual, expected):
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(numpy(a), numpy(e), rtol=1e-5, atol=1e-6)


def _averages(opt, variables):
    return [numpy(opt.average(v)).copy() for v in variables]


def _ema(**settings):
    return keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(LR), **settings
    )


# -- Keras 3 `use_ema` (keras/src/optimizers/base_optimizer.py) --------------


def keras_use_ema(history, momentum, accumulation=1):
    # `_backend_apply_gradients` moves the averages on every call, after the
    # (possibly accumulated) update and before `_iterations.assign_add(1)`;
    # `_update_model_variables_moving_average`:
    #   not_first_step = ops.not_equal(self.iterations, 0)
    #   momentum = ops.cast(not_first_step, var.dtype) * self.ema_momentum
    #   average.assign(momentum * average + (1 - momentum) * var)
    # where `iterations` is `_iterations // gradient_accumulation_steps`.
    averages = [np.zeros_like(w) for w in history[0]]
    for call, weights in enumerate(history[1:]):
        m = F32(0.0 if call // accumulation == 0 else momentum)
        averages = [m * a + (F32(1) - m) * w for a, w in zip(averages, weights)]
    return averages


def _with_keras(callbacks=(), ema=None, **sgd):
    """Fits ours (0.9, start_step=1, dynamic_decay=False) and Keras'
    `use_ema=True, ema_momentum=0.9` from the same weights on the same data."""
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.SGD(LR, **sgd), average_decay=0.9, start_step=1,
        dynamic_decay=False,
    )
    model, peer = small_model(), small_model()
    peer.set_weights(model.get_weights())
    theirs = keras.optimizers.SGD(
        LR, use_ema=True, ema_momentum=0.9, **(ema or {}), **sgd
    )
    return opt, _fit(opt, model, callbacks), _fit(theirs, peer)


def test_keras_use_ema_is_start_step_1_without_dynamic_decay():
    end = keras_ema.SwapAverageWeights(end_with_averages=True)
    _, (model, _, history), (peer, _, peer_history) = _with_keras([end])
    _close(history[-1], peer_history[-1])  # the same raw training
    # Keras' `fit` ends by overwriting the weights with the averages.
    expected = keras_use_ema(peer_history, 0.9)
    _close(peer.trainable_weights, expected)
    _close(model.trainable_weights, expected)
    assert np.abs(expected[0] - history[-1][0]).max() > 1e-3


def test_keras_use_ema_averages_every_accumulation_micro_step():
    opt, (_, watched, history), (peer, _, peer_history) = _with_keras(
        gradient_accumulation_steps=2
    )
    per_call = keras_use_ema(peer_history, 0.9, accumulation=2)
    _close(peer.trainable_weights, per_call)
    # Ours: Keras' rule applied once per real update (every second call).
    per_update = keras_use_ema(history[::2], 0.9)
    _close(_averages(opt, watched), per_update)
    assert np.abs(per_call[0] - per_update[0]).max() > 1e-3


def test_keras_ema_overwrite_frequency_is_update_weights_checkpoint(tmp_path):
    checkpoint = keras_ema.AverageModelCheckpoint(
        str(tmp_path / "ema.weights.h5"), update_weights=True,
        save_weights_only=True, save_freq=4,
    )
    opt, (_, watched, history), (peer, _, peer_history) = _with_keras(
        [checkpoint], ema=dict(ema_overwrite_frequency=4)
    )
    for ours, theirs in zip(history, peer_history):  # both jump every 4
        _close(ours, theirs)
    _close(_averages(opt, watched), peer.trainable_weights)


# -- Model Garden and TF Addons: one rule, `iterations` read after / before --


def tf_decay(iterations, average_decay, start_step, dynamic_decay):
    # Model Garden, official/modeling/optimization/ema_optimizer.py,
    # `update_average`; TF Addons, tensorflow_addons/optimizers/
    # moving_average.py, `_get_decay` (the same code):
    #   step = tf.cast(iterations, tf.float32)
    #   if step < self._start_step: return 0.
    #   elif self._dynamic_decay:
    #     step_count = step - self._start_step
    #     return tf.minimum(average_decay, (1. + step_count) / (10. + step_count))
    #   else: return average_decay
    step = F32(iterations)
    if step < start_step:
        return F32(0)
    if dynamic_decay:
        count = step - F32(start_step)
        return min(F32(average_decay), (F32(1) + count) / (F32(10) + count))
    return F32(average_decay)


def model_garden(history, average_decay, start_step, dynamic_decay=True):
    # `shadow_copy` adds the averages with initializer='zeros';
    # `apply_gradients` runs the inner optimizer, which increments
    # `iterations`, then `update_average` reads it and does
    #   average.assign_sub(tf.cast(1.0 - decay, average.dtype) * (average - normal))
    averages = [np.zeros_like(w) for w in history[0]]
    for iterations, weights in enumerate(history[1:], start=1):
        d = tf_decay(iterations, average_decay, start_step, dynamic_decay)
        averages = [a - (F32(1) - d) * (a - w) for a, w in zip(averages, weights)]
    return averages


def tf_addons(history, average_decay, start_step, dynamic_decay):
    # `_create_slots`: add_slot(var, "average", var.read_value()), the
    # weights before the first update; `_prepare_local` reads
    # `self._optimizer.iterations` before `apply_gradients` increments it;
    # `average_op` is `tf.keras.backend.moving_average_update`:
    #   x.assign_sub((x - value) * (1 - momentum))
    averages = [w.copy() for w in history[0]]
    for iterations, weights in enumerate(history[1:]):
        d = tf_decay(iterations, average_decay, start_step, dynamic_decay)
        averages = [a - (a - w) * (F32(1) - d) for a, w in zip(averages, weights)]
    return averages


def test_model_garden_decays_of_start_step_2_are_ours_of_start_step_1():
    theirs = [tf_decay(i, 0.99, 2, True) for i in range(1, 6)]
    np.testing.assert_allclose(theirs, [0, 0.1, 2 / 11, 3 / 12, 4 / 13])
    ours = [numpy(schedules.Dynamic(0.99)(n)) for n in range(4)]
    np.testing.assert_allclose(theirs[1:], ours)  # after one copy, as ours


@pytest.mark.parametrize("k, dynamic_decay", [(1, True), (2, False)])
def test_model_garden_start_step_k_plus_1_is_start_step_k(k, dynamic_decay):
    opt = _ema(average_decay=0.6, start_step=k, dynamic_decay=dynamic_decay)
    _, watched, history = _fit(opt)
    expected = model_garden(history, 0.6, k + 1, dynamic_decay)
    _close(_averages(opt, watched), expected)


def test_model_garden_zero_start_lags_by_decay_power_times_initial_weights():
    opt = _ema(average_decay=0.9, dynamic_decay=False)
    _, watched, history = _fit(opt)
    theirs = model_garden(history, 0.9, 0, dynamic_decay=False)
    # The same linear recursion from w0 and from zeros: after 16 updates
    # they differ by 0.9 ** 16 * w0, 19% of the initial weights.
    gap = [a - t for a, t in zip(_averages(opt, watched), theirs)]
    _close(gap, [F32(0.9) ** 16 * w for w in history[0]])
    assert np.abs(gap[0]).max() > 1e-2


@pytest.mark.parametrize("decay, start, dynamic", [(0.9, 0, False), (0.6, 2, True)])
def test_tf_addons_moving_average_is_the_same_settings(
    tmp_path, decay, start, dynamic
):
    opt = _ema(average_decay=decay, start_step=start, dynamic_decay=dynamic)
    path = str(tmp_path / "ema.weights.h5")
    checkpoint = keras_ema.AverageModelCheckpoint(path, save_weights_only=True)
    model, watched, history = _fit(opt, callbacks=[checkpoint])
    expected = tf_addons(history, decay, start, dynamic)
    _close(_averages(opt, watched), expected)
    # AverageModelCheckpoint(update_weights=False): the file holds the
    # averages, the model trains on with its raw weights.
    _close(model.trainable_weights, history[-1])
    saved = small_model()
    saved.load_weights(path)
    _close(saved.trainable_weights, expected)


# -- timm ModelEmaV3 (timm/utils/model_ema.py) --------------------------------


def timm_decay(step, decay=0.9999, min_decay=0.0, update_after_step=0,
               use_warmup=False, warmup_gamma=1.0, warmup_power=2 / 3):
    # `ModelEmaV3.get_decay` (its defaults), which train.py calls through
    # `model_ema.update(model, step=num_updates)` after `num_updates += 1`:
    #   step = max(0, step - self.update_after_step - 1)
    #   if step <= 0: return 0.0
    #   if self.use_warmup:
    #     decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
    #     decay = max(min(decay, self.decay), self.min_decay)
    #   else: decay = self.decay
    # `update(model)` without `step` skips all this: the decay is `self.decay`.
    if step is None:
        return decay
    step = max(0, step - update_after_step - 1)
    if step <= 0:
        return 0.0
    if use_warmup:
        warm = 1 - (1 + step / warmup_gamma) ** -warmup_power
        return max(min(warm, decay), min_decay)
    return decay


def timm(history, settings, with_step, buffers):
    # `deepcopy(model)` at creation; `apply_update_` lerps every float
    # entry of the state dict, buffers included:
    #   torch._foreach_lerp_(ema_lerp_values, model_lerp_values, weight=1. - decay)
    # `apply_update_no_buffers_` (exclude_buffers=True) lerps the parameters
    # and copies the buffers: ema_b.copy_(model_b).
    settings = dict(settings)
    exclude = settings.pop("exclude_buffers", False)
    averages = [w.copy() for w in history[0]]
    for step, weights in enumerate(history[1:], start=1):
        t = F32(1 - timm_decay(step if with_step else None, **settings))
        averages = [w if exclude and buffer else a + t * (w - a)
                    for a, w, buffer in zip(averages, weights, buffers)]
    return averages


class ShiftedWarmup(schedules.Warmup):
    """timm's warm-up with `min_decay > 0`: it copies before clamping."""

    def __call__(self, step):
        return super().__call__(step + 1)


WARM = dict(use_warmup=True, warmup_power=3 / 4)
ALL = dict(trainable_weights_only=False)


@pytest.mark.parametrize("theirs, with_step, ours", [
    (dict(decay=0.9), False,
     dict(average_decay=0.9, dynamic_decay=False, **ALL)),
    (dict(decay=0.9, update_after_step=1), True,
     dict(average_decay=0.9, start_step=2, dynamic_decay=False, **ALL)),
    (dict(decay=0.9, exclude_buffers=True), True,
     dict(average_decay=0.9, start_step=1, dynamic_decay=False)),
    (dict(decay=0.999, update_after_step=2, warmup_gamma=2.0, **WARM), True,
     dict(average_decay=schedules.Warmup(0.999, 2.0, 3 / 4), start_step=2,
          **ALL)),
    (dict(decay=0.999, min_decay=0.3, update_after_step=1, **WARM), True,
     dict(average_decay=ShiftedWarmup(0.999, 1.0, 3 / 4, 0.3), start_step=2,
          **ALL)),
])
def test_timm_model_ema_v3_is_the_swapped_in_model(theirs, with_step, ours):
    opt = _ema(**ours)
    _, watched, history = _fit(opt, everything=True)
    assert len(watched) == 8  # 2 Dense x (kernel, bias), BatchNorm x 4
    with opt.averaged_weights():  # the model now holds what ema.module would
        swapped = [numpy(v).copy() for v in watched]
    buffers = [not v.trainable for v in watched]
    _close(swapped, timm(history, theirs, with_step, buffers))


# -- swaps ---------------------------------------------------------------------


def _flat(arrays):
    return np.concatenate([np.ravel(numpy(a)) for a in arrays])


def test_arithmetic_swap_of_the_peers_loses_bits_ours_does_not():
    opt = _ema(average_decay=0.9)
    _, watched, _ = _fit(opt)
    w, m = _flat(watched), _flat(_averages(opt, watched))
    opt.swap_weights()
    opt.swap_weights()
    np.testing.assert_array_equal(bits(_flat(watched)), bits(w))
    np.testing.assert_array_equal(bits(_flat(_averages(opt, watched))), bits(m))
    # Model Garden, TF Addons, Keras' SwapEMAWeights on TensorFlow, twice:
    # a += b; b = a - b; a -= b.
    a, b = w, m
    for _ in range(2):
        a = a + b
        b = a - b
        a = a - b
    assert np.any(bits(a) != bits(w)) or np.any(bits(b) != bits(m))
