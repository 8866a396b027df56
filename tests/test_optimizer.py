"""The contract of `ExponentialMovingAverage` (DESIGN.md, "Semantics")."""

import inspect
import json

import keras
import numpy as np
import pytest
from conftest import BACKEND
from conftest import bits
from conftest import compiled_step
from conftest import fit_recording_kernel
from conftest import numpy
from conftest import regression_data
from conftest import small_model
from conftest import sync
from conftest import tensor
from conftest import tensorflow_only

import keras_ema
from keras_ema import ExponentialMovingAverage


def _scalar_setup(start_value=1.0, lr=0.1, **ema_kwargs):
    variable = keras.Variable(np.array([start_value], "float32"), name="w")
    opt = ExponentialMovingAverage(keras.optimizers.SGD(lr), **ema_kwargs)
    opt.build([variable])
    return variable, opt


def _average(opt, variable):
    return keras.ops.convert_to_numpy(opt.average(variable))


ONE = [tensor([1.0])]


# -- the update rule ---------------------------------------------------------


def test_averages_start_equal_to_the_weights_not_zero():
    model = small_model()
    model.build((None, 4))
    opt = ExponentialMovingAverage("sgd")
    opt.shadow_copy(model)
    for weight in model.trainable_variables:
        np.testing.assert_array_equal(bits(opt.average(weight)), bits(weight))
    kernel = model.trainable_variables[0]
    assert np.abs(_average(opt, kernel)).sum() > 0


def test_fixed_decay_half_over_two_sgd_steps_matches_hand_computation():
    # w: 1.0 -> 0.9 -> 0.8. average: 1.0 -> 1 - 0.5 * (1 - 0.9) = 0.95
    #                                    -> 0.95 - 0.5 * (0.95 - 0.8) = 0.875
    w, opt = _scalar_setup(average_decay=0.5, dynamic_decay=False)
    opt.apply(ONE, [w])
    np.testing.assert_allclose(_average(opt, w), [0.95], rtol=1e-6)
    opt.apply(ONE, [w])
    np.testing.assert_allclose(w.numpy(), [0.8], rtol=1e-6)
    np.testing.assert_allclose(_average(opt, w), [0.875], rtol=1e-6)


def test_first_dynamic_decays_are_one_tenth_then_two_elevenths():
    # decay_0 = 1/10: 1.0 - 0.9 * (1.0 - 0.9) = 0.91
    # decay_1 = 2/11: 0.91 - 9/11 * (0.91 - 0.8) = 0.82
    w, opt = _scalar_setup(average_decay=0.99)
    opt.apply(ONE, [w])
    np.testing.assert_allclose(_average(opt, w), [0.91], rtol=1e-6)
    opt.apply(ONE, [w])
    np.testing.assert_allclose(_average(opt, w), [0.82], rtol=1e-6)


def test_dynamic_decay_is_capped_by_average_decay():
    # decay_0 = min(0.15, 1/10) = 0.1; decay_1 = min(0.15, 2/11) = 0.15
    w, opt = _scalar_setup(average_decay=0.15)
    opt.apply(ONE, [w])
    opt.apply(ONE, [w])
    expected = 0.91 - 0.85 * (0.91 - 0.8)
    np.testing.assert_allclose(_average(opt, w), [expected], rtol=1e-6)


def test_start_step_copies_the_weights_exactly_then_averages():
    values = np.array([3e-8, 1e-30, -7e-9, 123456.7], "float32")
    w = keras.Variable(np.ones(4, "float32"))
    opt = ExponentialMovingAverage(
        keras.optimizers.SGD(0.0), average_decay=0.99, start_step=2
    )
    zero = [tensor(np.zeros(4))]
    opt.apply(zero, [w])
    w.assign(values)
    opt.apply(zero, [w])
    # A real copy: average 1.0 minus (1.0 - 3e-8) would give 0 or 6e-8.
    np.testing.assert_array_equal(bits(opt.average(w)), bits(values))
    w.assign(np.zeros(4, "float32"))
    opt.apply(zero, [w])  # first EMA update: decay 0.1
    np.testing.assert_allclose(_average(opt, w), 0.1 * values, rtol=1e-6)


@tensorflow_only
def test_decay_is_computed_inside_the_compiled_step_not_frozen_at_trace():
    import tensorflow as tf

    w, opt = _scalar_setup(average_decay=0.99)
    traces = []

    @tf.function
    def step():
        traces.append(1)
        opt.apply(ONE)

    expected, average, weight = [], 1.0, 1.0
    for n in range(4):
        step()
        weight -= 0.1
        decay = min(0.99, (1 + n) / (10 + n))
        average -= (1 - decay) * (average - weight)
        expected.append(average)
    assert len(traces) == 1
    np.testing.assert_allclose(_average(opt, w), [expected[-1]], rtol=1e-5)


def test_fit_matches_a_numpy_reference_of_the_recorded_weights():
    opt, kernel, history = fit_recording_kernel()
    average = history[0].astype("float64")
    for n, weight in enumerate(history[1:]):
        decay = min(0.9, (1 + n) / (10 + n))
        average -= (1 - decay) * (average - weight)
    assert len(history) == 17
    np.testing.assert_allclose(_average(opt, kernel), average, atol=1e-6)
    assert np.abs(_average(opt, kernel) - kernel.numpy()).max() > 1e-3


@tensorflow_only
def test_fit_compiled_with_xla_builds_the_averages_inside_the_step():
    # XLA cannot lift an initial value read from a weight inside the traced
    # step, where `fit` builds the optimizer lazily; the averages read it
    # eagerly.
    # Weights of over 128 elements: XLA lifts no larger constant either.
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(64), keras.layers.Dense(1)]
    )
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.05), average_decay=0.5,
                                   dynamic_decay=False)
    model.compile(optimizer=opt, loss="mse", jit_compile=True)
    kernel = model.trainable_variables[0]
    start = kernel.numpy()
    x, y = regression_data(8)
    model.fit(x, y, batch_size=8, verbose=0)  # one step, built inside it
    assert int(opt._ema_state.step.numpy()) == 1
    assert not np.array_equal(start, kernel.numpy())
    np.testing.assert_allclose(
        _average(opt, kernel), (start + kernel.numpy()) / 2, rtol=1e-6
    )


# -- real updates only -------------------------------------------------------


def test_averages_move_once_per_real_update_under_gradient_accumulation():
    w = keras.Variable(np.array([1.0], "float32"))
    inner = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    opt = ExponentialMovingAverage(inner, average_decay=0.5, dynamic_decay=False)
    opt.build([w])
    compiled_step(opt, ONE, [w])  # micro-step: the weight does not move
    np.testing.assert_array_equal(_average(opt, w), [1.0])
    compiled_step(opt, ONE, [w])  # real update: w = 0.9, average = 0.95
    np.testing.assert_allclose(w.numpy(), [0.9], rtol=1e-6)
    np.testing.assert_allclose(_average(opt, w), [0.95], rtol=1e-6)
    assert int(numpy(opt.iterations)) == 1


def test_averages_stay_when_an_inner_loss_scale_optimizer_skips_the_step():
    w = keras.Variable(np.array([1.0], "float32"))
    inner = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1))
    opt = ExponentialMovingAverage(inner, average_decay=0.5, dynamic_decay=False)
    opt.build([w])
    compiled_step(opt, [tensor([np.inf])], [w])
    np.testing.assert_array_equal(w.numpy(), [1.0])
    np.testing.assert_array_equal(_average(opt, w), [1.0])
    assert int(keras.ops.convert_to_numpy(opt._ema_state.step)) == 0


# -- swapping ----------------------------------------------------------------

SPAN = np.array(
    [1e-38, 3.4e38, -3.3e-20, 5e20, 1e-45, -0.0, np.pi, -1.0, 7e-3], "float32"
)


def _swap_setup():
    w = keras.Variable(SPAN.copy())
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.0))
    opt.build([w])
    other = (SPAN[::-1] * np.float32(0.37)).astype("float32")
    opt.average(w).assign(other)
    return w, opt, other


@pytest.mark.parametrize(
    "compiled",
    [False, pytest.param(True, marks=tensorflow_only)],
    ids=["eager", "tf.function"],
)
def test_two_swaps_restore_raw_weights_bit_for_bit(compiled):
    w, opt, other = _swap_setup()
    swap = opt.swap_weights
    if compiled:
        import tensorflow as tf

        swap = tf.function(swap)
    swap()
    np.testing.assert_array_equal(bits(w), bits(other))
    np.testing.assert_array_equal(bits(opt.average(w)), bits(SPAN))
    assert opt.averages_swapped_in
    swap()
    np.testing.assert_array_equal(bits(w), bits(SPAN))
    np.testing.assert_array_equal(bits(opt.average(w)), bits(other))
    assert not opt.averages_swapped_in


def test_averaged_weights_swaps_back_when_the_block_raises():
    w, opt, other = _swap_setup()
    with pytest.raises(RuntimeError, match="boom"):
        with opt.averaged_weights():
            np.testing.assert_array_equal(bits(w), bits(other))
            raise RuntimeError("boom")
    np.testing.assert_array_equal(bits(w), bits(SPAN))
    np.testing.assert_array_equal(bits(opt.average(w)), bits(other))


def test_averaged_weights_does_not_swap_twice_when_the_block_swapped_back():
    w, opt, other = _swap_setup()
    with opt.averaged_weights():
        opt.swap_weights()
    np.testing.assert_array_equal(bits(w), bits(SPAN))
    assert not opt.averages_swapped_in


def test_averaged_weights_inside_a_swap_leaves_the_averages_in():
    w, opt, other = _swap_setup()
    opt.swap_weights()
    with opt.averaged_weights():
        np.testing.assert_array_equal(bits(w), bits(other))
    np.testing.assert_array_equal(bits(w), bits(other))
    assert opt.averages_swapped_in


def test_assign_average_vars_sets_non_trainable_variables_too():
    model = small_model(batchnorm=True)
    opt = ExponentialMovingAverage("sgd", trainable_weights_only=False)
    model.compile(optimizer=opt, loss="mse")
    model.build((None, 4))
    opt.shadow_copy(model)
    moving_mean = model.get_layer(index=1).moving_mean
    opt.average(moving_mean).assign(np.full(8, 0.25, "float32"))
    opt.assign_average_vars([moving_mean])
    np.testing.assert_array_equal(moving_mean.numpy(), np.full(8, 0.25))
    np.testing.assert_array_equal(_average(opt, moving_mean), np.full(8, 0.25))


# -- what gets averaged ------------------------------------------------------


def _fit_batchnorm_model(trainable_weights_only):
    model = small_model(batchnorm=True)
    opt = ExponentialMovingAverage(
        keras.optimizers.SGD(0.05),
        trainable_weights_only=trainable_weights_only,
        average_decay=0.9,
    )
    model.compile(optimizer=opt, loss="mse")
    model.build((None, 4))
    opt.shadow_copy(model)
    x, y = regression_data()
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    return model, opt, model.get_layer(index=1)


def test_batchnorm_statistics_are_not_averaged_by_default():
    model, opt, bn = _fit_batchnorm_model(trainable_weights_only=True)
    assert opt.average(bn.moving_mean) is None
    assert opt.average(bn.gamma) is not None
    before = bn.moving_mean.numpy().copy()
    opt.swap_weights()
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)


def test_batchnorm_statistics_are_averaged_when_asked():
    model, opt, bn = _fit_batchnorm_model(trainable_weights_only=False)
    for stat in (bn.moving_mean, bn.moving_variance):
        average = _average(opt, stat)
        assert np.abs(average - stat.numpy()).max() > 1e-4
    raw = bn.moving_variance.numpy().copy()
    average = _average(opt, bn.moving_variance)
    with opt.averaged_weights():
        np.testing.assert_array_equal(bn.moving_variance.numpy(), average)
    np.testing.assert_array_equal(bn.moving_variance.numpy(), raw)


def test_shadow_copy_is_idempotent_and_sets_has_shadow_copy():
    model = small_model(batchnorm=True)
    model.build((None, 4))
    opt = ExponentialMovingAverage("sgd", trainable_weights_only=False)
    assert not opt.has_shadow_copy
    opt.shadow_copy(model)
    count = len(opt.variables)
    opt.shadow_copy(model)
    assert opt.has_shadow_copy
    assert len(opt.variables) == count
    assert sum(opt.average(v) is not None for v in model.variables) == len(
        model.variables
    )


def test_model_weights_are_not_tracked_as_optimizer_variables():
    model = small_model()
    model.build((None, 4))
    opt = ExponentialMovingAverage("sgd")
    opt.shadow_copy(model)
    model_ids = {id(v) for v in model.variables}
    assert not model_ids & {id(v) for v in opt.variables}


def test_a_step_without_its_model_refuses_to_leave_statistics_unaveraged():
    # A custom loop builds the optimizer from the trainable weights only:
    # without `shadow_copy(model)` it cannot know the BatchNorm statistics.
    model = small_model(batchnorm=True)
    model.build((None, 4))
    opt = ExponentialMovingAverage("sgd", trainable_weights_only=False)
    variables = model.trainable_variables
    opt.build(variables)
    before = [numpy(v) for v in variables]
    with pytest.raises(ValueError, match=r"call `optimizer.shadow_copy\(model\)`"):
        opt.apply([keras.ops.ones(v.shape) for v in variables], variables)
    for v, value in zip(variables, before):
        np.testing.assert_array_equal(numpy(v), value)
    assert int(numpy(opt.iterations)) == 0
    opt.shadow_copy(model)
    opt.apply([keras.ops.ones(v.shape) for v in variables], variables)
    assert opt.average(model.layers[1].moving_mean) is not None


def test_fit_averages_the_batchnorm_statistics_of_the_model_it_is_told():
    model = small_model(batchnorm=True)
    opt = ExponentialMovingAverage("sgd", trainable_weights_only=False,
                                   average_decay=0.0, dynamic_decay=False)
    model.compile(optimizer=opt, loss="mse")
    # A keras-ema callback tells the optimizer its model (`shadow_copy`).
    model.fit(*regression_data(), epochs=1, verbose=0,
              callbacks=[keras_ema.SwapAverageWeights()])
    moving_mean = model.layers[1].moving_mean
    assert opt.average(moving_mean) is not None
    # Decay 0: each average follows its variable after every update (to
    # rounding: `a - (a - w)` is not always `w`).
    np.testing.assert_allclose(numpy(opt.average(moving_mean)),
                               numpy(moving_mean), rtol=1e-6, atol=1e-7)
    assert np.abs(numpy(moving_mean)).max() > 0


# -- model.fit, forwarding, mixed precision ----------------------------------


def test_fit_moves_averages_and_lr_scheduler_reaches_the_inner_optimizer():
    model = small_model()
    inner = keras.optimizers.Adam(1e-2)
    opt = ExponentialMovingAverage(inner, average_decay=0.99)
    model.compile(optimizer=opt, loss="mse")
    schedule = keras.callbacks.LearningRateScheduler(lambda epoch: 0.5**epoch)
    x, y = regression_data()
    model.fit(x, y, epochs=3, batch_size=16, callbacks=[schedule], verbose=0)
    np.testing.assert_allclose(float(inner.learning_rate.numpy()), 0.25)
    assert opt.learning_rate is inner.learning_rate
    assert int(numpy(opt.iterations)) == 12
    assert int(keras.ops.convert_to_numpy(opt._ema_state.step)) == 12
    for weight in model.trainable_variables:
        assert not np.array_equal(_average(opt, weight), weight.numpy())


def test_apply_gradients_in_a_custom_loop():
    w = keras.Variable(np.array([1.0], "float32"))
    opt = ExponentialMovingAverage(
        keras.optimizers.SGD(0.1), average_decay=0.5, dynamic_decay=False
    )
    opt.apply_gradients([(ONE[0], w)])
    opt.apply_gradients([(ONE[0], w)])
    np.testing.assert_allclose(_average(opt, w), [0.875], rtol=1e-6)


def test_inner_loss_scale_factor_is_applied_to_the_loss():
    inner = keras.optimizers.SGD(0.1, loss_scale_factor=128.0)
    opt = ExponentialMovingAverage(inner)
    assert float(opt.scale_loss(2.0)) == 256.0


def test_mixed_float16_wraps_it_in_a_loss_scale_optimizer_and_averages_move():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    model = small_model()
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.05), average_decay=0.9)
    model.compile(optimizer=opt, loss="mse")
    model.fit(*regression_data(), epochs=2, batch_size=16, verbose=0)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.optimizer.inner_optimizer is opt
    kernel = model.trainable_variables[0]
    assert kernel.dtype == "float32"
    assert int(keras.ops.convert_to_numpy(opt._ema_state.step)) > 0
    assert not np.array_equal(_average(opt, kernel), kernel.numpy())


def test_mixed_float16_averages_batchnorm_statistics_in_fit():
    # On JAX this `fit` failed: the step read the optimizer's values as if
    # they were this optimizer's own, not the LossScaleOptimizer's.
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    model = small_model(batchnorm=True)
    opt = ExponentialMovingAverage(
        keras.optimizers.SGD(0.05), trainable_weights_only=False,
        average_decay=0.5, dynamic_decay=False,
    )
    model.compile(optimizer=opt, loss="mse")
    model.build((None, 4))
    opt.shadow_copy(model)
    mean = model.layers[1].moving_mean
    history = [(0, mean.numpy().astype("float64"))]

    def record(batch, logs):
        sync(model)
        history.append((int(keras.ops.convert_to_numpy(opt.iterations)),
                        mean.numpy().astype("float64")))

    model.fit(*regression_data(), epochs=1, batch_size=8, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(on_train_batch_end=record)])
    expected = history[0][1]
    for (before, _), (after, value) in zip(history, history[1:]):
        if after != before:  # a step the loss scale skipped moves nothing
            expected = 0.5 * expected + 0.5 * value
    assert history[-1][0] > 4
    np.testing.assert_allclose(_average(opt, mean), expected, rtol=1e-6,
                               atol=1e-7)


# -- saving ------------------------------------------------------------------


def _trained(batchnorm=False, trainable_weights_only=True):
    model = small_model(batchnorm)
    opt = ExponentialMovingAverage(
        keras.optimizers.Adam(1e-2),
        trainable_weights_only=trainable_weights_only,
        average_decay=0.9,
        start_step=1,
    )
    model.compile(optimizer=opt, loss="mse")
    model.build((None, 4))
    opt.shadow_copy(model)
    model.fit(*regression_data(), epochs=2, batch_size=16, verbose=0)
    return model, opt


def _assert_same_averages(model, opt, loaded, loaded_opt):
    averaged = [v for v in model.variables if opt.average(v) is not None]
    assert averaged
    for v, loaded_v in zip(model.variables, loaded.variables):
        if opt.average(v) is not None:
            np.testing.assert_array_equal(
                bits(opt.average(v)), bits(loaded_opt.average(loaded_v))
            )
    assert int(loaded_opt._ema_state.step.numpy()) == int(opt._ema_state.step.numpy())


def test_keras_file_round_trip_restores_averages_bit_for_bit(tmp_path):
    model, opt = _trained()
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, ExponentialMovingAverage)
    _assert_same_averages(model, opt, loaded, loaded.optimizer)
    # The resumed optimizer continues exactly where the first one stopped.
    x, y = regression_data(16, seed=1)
    model.train_on_batch(x, y)
    loaded.train_on_batch(x, y)
    _assert_same_averages(model, opt, loaded, loaded.optimizer)


def test_keras_file_restores_non_trainable_averages(tmp_path):
    model, opt = _trained(batchnorm=True, trainable_weights_only=False)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    # Loading builds the optimizer from the trainable weights; the averages
    # of BatchNorm statistics wait until the optimizer is told its model.
    bn = loaded.get_layer(index=1)
    assert loaded.optimizer.average(bn.moving_mean) is None
    with pytest.raises(ValueError, match=r"shadow_copy\(model\)"):
        loaded.optimizer.swap_weights()
    loaded.optimizer.shadow_copy(loaded)
    _assert_same_averages(model, opt, loaded, loaded.optimizer)
    assert loaded.optimizer.average(bn.moving_mean) is not None


def test_averages_of_non_trainable_weights_wait_for_shadow_copy(tmp_path):
    model, opt = _trained(batchnorm=True, trainable_weights_only=False)
    model.save_weights(tmp_path / "m.weights.h5")
    fresh = small_model(batchnorm=True)
    fresh_opt = ExponentialMovingAverage.from_config(opt.get_config())
    fresh_opt.build(fresh.trainable_variables)  # no model known
    fresh.compile(optimizer=fresh_opt, loss="mse")
    fresh.load_weights(tmp_path / "m.weights.h5")
    with pytest.raises(ValueError, match=r"shadow_copy\(model\)"):
        fresh_opt.swap_weights()
    fresh_opt.shadow_copy(fresh)
    _assert_same_averages(model, opt, fresh, fresh_opt)


def test_save_weights_restores_averages(tmp_path):
    model, opt = _trained(batchnorm=True, trainable_weights_only=False)
    model.save_weights(tmp_path / "m.weights.h5")
    fresh = small_model(batchnorm=True)
    fresh_opt = ExponentialMovingAverage(
        keras.optimizers.Adam(1e-2), trainable_weights_only=False,
        average_decay=0.9, start_step=1,
    )
    fresh.compile(optimizer=fresh_opt, loss="mse")
    fresh.build((None, 4))
    fresh_opt.build(fresh.trainable_variables)
    fresh.load_weights(tmp_path / "m.weights.h5")
    fresh_opt.shadow_copy(fresh)
    _assert_same_averages(model, opt, fresh, fresh_opt)


@tensorflow_only
def test_tf_train_checkpoint_restores_averages(tmp_path):
    import tensorflow as tf

    model, opt = _trained()
    path = tf.train.Checkpoint(model=model, optimizer=opt).save(tmp_path / "c")
    fresh = small_model()
    fresh_opt = ExponentialMovingAverage(
        keras.optimizers.Adam(1e-2), average_decay=0.9, start_step=1
    )
    fresh.build((None, 4))
    fresh_opt.build(fresh.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh_opt).restore(path)
    _assert_same_averages(model, opt, fresh, fresh_opt)


def test_loading_a_mismatched_optimizer_raises_instead_of_skipping(tmp_path):
    model, _ = _trained(batchnorm=True, trainable_weights_only=True)
    model.save_weights(tmp_path / "m.weights.h5")
    other = small_model(batchnorm=True)
    other_opt = ExponentialMovingAverage("adam", trainable_weights_only=False)
    other.compile(optimizer=other_opt, loss="mse")
    other.build((None, 4))
    other_opt.shadow_copy(other)  # 2 more averages than were saved
    with pytest.raises(ValueError, match="same `trainable_weights_only`"):
        other.load_weights(tmp_path / "m.weights.h5")


def _assert_fit_is_refused(model, opt):
    held = [bits(v) for v in model.variables]
    held_averages = [bits(opt.average(v)) for v in model.trainable_variables]
    x, y = regression_data(16)
    if BACKEND == "jax":
        # Raising inside JAX's fit would lose the model's state (the trainer
        # has taken it out of the variables): the step changes nothing and
        # prints a warning instead.
        model.fit(x, y, verbose=0)
    else:
        # torch: ValueError; TensorFlow: ValueError when traced, else the
        # in-graph check.
        with pytest.raises(Exception, match="swapped into"):
            model.fit(x, y, verbose=0)
    for v, b in zip(model.variables, held):
        np.testing.assert_array_equal(bits(v), b)
    for v, b in zip(model.trainable_variables, held_averages):
        np.testing.assert_array_equal(bits(opt.average(v)), b)


def test_training_inside_averaged_weights_is_refused():
    model, opt = _trained()
    with opt.averaged_weights():
        _assert_fit_is_refused(model, opt)


def test_a_fit_after_a_swap_never_trains_on_the_averages():
    model, opt = _trained()  # its train step is compiled and cached
    opt.swap_weights()
    _assert_fit_is_refused(model, opt)


@tensorflow_only
@pytest.mark.parametrize("size", [1, 20_000], ids=["small", "large"])
def test_a_compiled_step_traced_before_a_swap_still_refuses_to_train(size):
    """Small gradients pass the check in bunches, large ones one by one."""
    import tensorflow as tf

    w = keras.Variable(np.ones(size, "float32"), name="w")
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.1))
    opt.build([w])
    grads = [tensor(np.ones(size, "float32"))]
    step = tf.function(lambda: opt.apply(grads, [w]))
    step()  # traced while the raw weights are in
    opt.swap_weights()
    held = bits(w), bits(opt.average(w))
    with pytest.raises(tf.errors.InvalidArgumentError, match="swapped into"):
        step()
    # The refused step moved nothing, not even the inner step counter.
    np.testing.assert_array_equal(bits(w), held[0])
    np.testing.assert_array_equal(bits(opt.average(w)), held[1])
    assert int(opt.iterations.numpy()) == 1
    opt.swap_weights()
    step()
    assert int(opt._ema_state.step.numpy()) == 2


# Keras warns that the unbuilt inner optimizer skips loading; the wrapper
# restores its variables at build, which the test checks.
@pytest.mark.filterwarnings("ignore:Skipping variable loading")
def test_loading_into_an_unbuilt_optimizer_restores_when_it_is_built(tmp_path):
    model, opt = _trained()
    model.save_weights(tmp_path / "m.weights.h5")
    fresh = small_model()
    fresh_opt = ExponentialMovingAverage(
        keras.optimizers.Adam(1e-2), average_decay=0.9, start_step=1
    )
    fresh.compile(optimizer=fresh_opt, loss="mse")
    fresh.build((None, 4))
    assert not fresh_opt.built
    fresh.load_weights(tmp_path / "m.weights.h5")
    fresh_opt.shadow_copy(fresh)  # builds, then restores what was loaded
    _assert_same_averages(model, opt, fresh, fresh_opt)


def test_a_file_saved_inside_averaged_weights_loads_with_averages_swapped_in(
    tmp_path,
):
    model, opt = _trained()
    raw = [bits(v) for v in model.trainable_variables]
    averages = [bits(opt.average(v)) for v in model.trainable_variables]
    with opt.averaged_weights():
        model.save(tmp_path / "ema.keras")
    loaded = keras.models.load_model(tmp_path / "ema.keras")
    # What was saved comes back: the model holds the averages.
    for v, a in zip(loaded.trainable_variables, averages):
        np.testing.assert_array_equal(bits(v), a)
    assert loaded.optimizer.averages_swapped_in
    _assert_fit_is_refused(loaded, loaded.optimizer)
    loaded.optimizer.swap_weights()
    for v, r in zip(loaded.trainable_variables, raw):
        np.testing.assert_array_equal(bits(v), r)
    loaded.fit(*regression_data(16), verbose=0)


# -- config ------------------------------------------------------------------


def test_config_is_json_safe_and_round_trips():
    opt = ExponentialMovingAverage(
        keras.optimizers.AdamW(3e-4, weight_decay=0.01),
        trainable_weights_only=False,
        average_decay=0.995,
        start_step=7,
        dynamic_decay=False,
        update_every=3,
        average_dtype="float32",
        exclude=["bias$", "^embedding/"],
        name="ema",
    )
    config = opt.get_config()
    json.dumps(config)
    arguments = inspect.signature(ExponentialMovingAverage).parameters
    assert set(config) == set(arguments) - {"kwargs"}
    frozen = json.dumps(config, sort_keys=True)
    clone = ExponentialMovingAverage.from_config(config)
    assert json.dumps(config, sort_keys=True) == frozen  # not mutated
    assert json.dumps(clone.get_config(), sort_keys=True) == frozen
    assert isinstance(clone.inner_optimizer, keras.optimizers.AdamW)


def test_schedule_average_decay_round_trips_through_config():
    opt = ExponentialMovingAverage(
        "sgd", average_decay=keras_ema.schedules.Warmup(0.999, power=0.75)
    )
    clone = ExponentialMovingAverage.from_config(
        json.loads(json.dumps(opt.get_config()))
    )
    assert isinstance(clone.average_decay, keras_ema.schedules.Warmup)
    assert clone.average_decay.get_config() == opt.average_decay.get_config()


def test_keras_deserialize_needs_no_custom_objects():
    opt = ExponentialMovingAverage("adam", average_decay=0.9)
    clone = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(clone, ExponentialMovingAverage)
    assert clone.get_config() == opt.get_config()


def test_optimizer_accepts_names_and_config_dicts():
    by_name = ExponentialMovingAverage("adam")
    by_dict = ExponentialMovingAverage(
        keras.optimizers.serialize(keras.optimizers.SGD(0.3))
    )
    assert isinstance(by_name.inner_optimizer, keras.optimizers.Adam)
    np.testing.assert_allclose(float(by_dict.learning_rate.numpy()), 0.3)


# -- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": 42}, "Keras 3 optimizer"),
        ({"optimizer": "no-such-optimizer"}, "Keras 3 optimizer"),
        ({"optimizer": keras.layers.Dense(1)}, "Keras 3 optimizer"),
        ({"average_decay": 1.5}, "average_decay"),
        ({"average_decay": -0.1}, "average_decay"),
        ({"average_decay": float("nan")}, "average_decay"),
        ({"average_decay": True}, "average_decay"),
        ({"start_step": -1}, "integer >= 0"),
        ({"start_step": 2.5}, "integer >= 0"),
        ({"start_step": True}, "integer >= 0"),
        ({"trainable_weights_only": "yes"}, "True or False"),
        ({"use_ema": True}, "wrapped `optimizer`"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, message):
    kwargs = {"optimizer": "sgd", **kwargs}
    with pytest.raises(ValueError, match=message):
        ExponentialMovingAverage(**kwargs)


def test_inner_optimizer_with_use_ema_is_rejected():
    with pytest.raises(ValueError, match="use_ema=False"):
        ExponentialMovingAverage(keras.optimizers.SGD(use_ema=True))


@pytest.mark.parametrize(
    "call", ["swap_weights", "averaged_weights", "assign_average_vars"]
)
def test_swapping_before_any_average_exists_raises(call):
    opt = ExponentialMovingAverage("sgd")
    with pytest.raises(ValueError, match="none exist yet"):
        if call == "assign_average_vars":
            opt.assign_average_vars([])
        elif call == "averaged_weights":
            with opt.averaged_weights():
                pass
        else:
            opt.swap_weights()


def test_assign_average_vars_names_the_variables_without_average():
    model = small_model(batchnorm=True)
    opt = ExponentialMovingAverage("sgd")
    model.compile(optimizer=opt, loss="mse")
    model.build((None, 4))
    opt.shadow_copy(model)
    other = small_model()
    other.build((None, 4))
    kernel = other.trainable_variables[0]
    with pytest.raises(ValueError, match=kernel.path):
        opt.assign_average_vars(model.variables + [kernel])
