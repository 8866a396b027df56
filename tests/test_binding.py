"""The optimizer knows its model only when told (`shadow_copy`, a keras-ema
callback's `model`): a task around its backbone, one optimizer for two
models, clones, wrappers that never stack, mixed precision with XLA."""

import gc
import weakref

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    bits,
    numpy,
    regression_data,
    small_model,
    sync,
    tensorflow_only,
)

from keras_ema import ExponentialMovingAverage, SwapAverageWeights

X, Y = regression_data(32)
FIT = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)
STEPS = 2 * len(X) // 8


def _values(variables):
    return [bits(v).copy() for v in variables]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


# -- a task around its backbone -----------------------------------------------


def _backbone_and_task(head_weights, batchnorm=True):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((4,)), keras.layers.Dense(8)]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    backbone = keras.Sequential(layers, name="backbone")
    inputs = keras.Input((4,))
    features = backbone(inputs)
    if head_weights:
        outputs = keras.layers.Dense(1, name="head")(features)
    else:
        outputs = keras.layers.Activation("sigmoid", name="head")(features)
    return backbone, keras.Model(inputs, outputs, name="task")


def _task_run(told):
    """Trains the task around its backbone (no weights in the head);
    `told`: the model given to `shadow_copy`."""
    backbone, task = _backbone_and_task(head_weights=False)
    opt = ExponentialMovingAverage(
        keras.optimizers.SGD(0.1), average_decay=0.9,
        trainable_weights_only=False,
    )
    opt.shadow_copy({"backbone": backbone, "task": task}[told])
    task.compile(optimizer=opt, loss="mse")
    y = np.tile(Y, (1, 8)) / 10
    history = task.fit(X, y, validation_data=(X, y),
                       callbacks=[SwapAverageWeights()], **FIT)
    sync(task)
    averages = [opt.average(v) for v in task.variables]
    return task, opt, history, averages


def test_a_task_around_its_backbone_trains_as_if_told_the_task():
    # On JAX, today's main took the task for a second model: every step
    # changed nothing and the error came after the last epoch.
    task, opt, history, averages = _task_run("backbone")
    reference, ref_opt, ref_history, ref_averages = _task_run("task")
    assert int(numpy(opt.iterations)) == STEPS
    # Every float variable of the backbone has an average, BatchNorm
    # statistics included, and training matches bit for bit the run whose
    # optimizer was told the task itself.
    assert [a is not None for a in averages] == [True] * 6
    _assert_same(_values(task.variables), _values(reference.variables))
    _assert_same(_values(averages), _values(ref_averages))
    assert history.history["val_loss"] == ref_history.history["val_loss"]
    assert not opt.averages_swapped_in


def test_a_task_with_a_trainable_head_is_refused_before_anything_moves():
    # Without BatchNorm: the optimizer, not told the task, cannot keep the
    # forward pass of PyTorch and JAX from moving its statistics (as with
    # Keras' own optimizers; docs/semantics.md).
    backbone, task = _backbone_and_task(head_weights=True, batchnorm=False)
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.1))
    opt.shadow_copy(backbone)
    task.compile(optimizer=opt, loss="mse")
    before = _values(task.variables + opt.variables)
    with pytest.raises(ValueError) as error:
        if BACKEND == "jax":
            # A JAX step cannot raise without losing the trainer's state:
            # the compiled steps change nothing, and `fit` raises at its end.
            with pytest.warns(UserWarning, match="changes nothing"):
                task.fit(X, Y, **FIT)
        else:
            task.fit(X, Y, **FIT)
    message = str(error.value)
    assert "does not support training variables it was not built with" in (
        message
    )
    assert "head/kernel" in message and "'backbone'" in message
    assert "shadow_copy(model)" in message
    sync(task)
    _assert_same(_values(task.variables + opt.variables), before)
    assert int(numpy(opt.iterations)) == 0


def test_one_optimizer_for_two_models_names_both_before_anything_moves():
    first, second = small_model(), small_model()
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.01))
    first.compile(optimizer=opt, loss="mse")
    first.fit(X, Y, callbacks=[SwapAverageWeights()], **FIT)
    second.compile(optimizer=opt, loss="mse")
    sync(first)
    before = _values(first.variables + second.variables + opt.variables)
    with pytest.raises(ValueError, match="does not support training a second "
                       "model") as error:
        second.fit(X, Y, callbacks=[SwapAverageWeights()], **FIT)
    assert repr(first.name) in str(error.value)
    assert repr(second.name) in str(error.value)
    assert "from_config(opt.get_config())" in str(error.value)
    _assert_same(
        _values(first.variables + second.variables + opt.variables), before
    )
    assert int(numpy(opt.iterations)) == STEPS


def test_call_with_averages_refuses_a_clone():
    model = small_model()
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.01))
    model.compile(optimizer=opt, loss="mse")
    model.fit(X, Y, **FIT)
    clone = keras.models.clone_model(model)
    with pytest.raises(ValueError, match="does not average") as error:
        opt.call_with_averages(clone, X)
    assert repr(clone.name) in str(error.value)
    # Its own model still works, with the averages.
    with opt.averaged_weights():
        expected = numpy(model(X))
    np.testing.assert_array_equal(
        numpy(opt.call_with_averages(model, X)), expected
    )


# -- wrappers never stack, and keep nothing alive -----------------------------


def _keras_ema_wrappers(function):
    """How many functions of keras_ema a call of `function` goes through
    before it reaches one of Keras (following what each one wraps)."""
    count = 0
    while function is not None:
        code = getattr(getattr(function, "__func__", function), "__code__",
                       None)
        if code is None or "keras_ema" not in code.co_filename:
            return count
        count += 1
        inner = [
            cell.cell_contents for cell in function.__closure__ or ()
            if callable(cell.cell_contents)
            and getattr(cell.cell_contents, "__name__", "") == "train_step"
        ]
        function = inner[0] if inner else None
    return count


def test_three_recompiles_leave_one_wrapper_and_free_the_old_optimizers():
    model = small_model(batchnorm=True)
    olds = []
    for _ in range(3):
        opt = ExponentialMovingAverage(
            keras.optimizers.SGD(0.01), trainable_weights_only=False
        )
        model.compile(optimizer=opt, loss="mse")
        model.fit(X, Y, validation_data=(X, Y),
                  callbacks=[SwapAverageWeights()], **FIT)
        assert _keras_ema_wrappers(model.train_step) == 1
        olds.append(weakref.ref(opt))
    del opt
    gc.collect()
    assert [old() is None for old in olds] == [True, True, False]
    # Compiled with a plain optimizer, the model loses the wrapper at its
    # first step, and the last averaging optimizer is freed too.
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(X, Y, **FIT)
    assert _keras_ema_wrappers(model.train_step) == 0
    assert "train_step" not in vars(model)
    gc.collect()
    assert olds[-1]() is None


# -- mixed precision, XLA and SwapAverageWeights ------------------------------


def test_mixed_precision_with_xla_and_swap_average_weights_trains():
    # Keras' own SwapEMAWeights case with the LossScaleOptimizer that
    # `compile` puts around the averaging optimizer under mixed_float16: on
    # TensorFlow, today's main failed to lift variable creations out of the
    # XLA function.
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    model = keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
        keras.layers.Dense(1, dtype="float32"),
    ])
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.01),
                                   average_decay=0.9)
    model.compile(optimizer=opt, loss="mse",
                  jit_compile=BACKEND != "torch")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    history = model.fit(X, Y, validation_data=(X, Y),
                        callbacks=[SwapAverageWeights()], **FIT)
    sync(model)
    # Steps whose scaled gradients overflowed float16 moved nothing.
    assert 0 < int(numpy(opt.iterations)) <= STEPS
    assert len(history.history["val_loss"]) == FIT["epochs"]
    assert not opt.averages_swapped_in
    # Validation ran on the averages, which differ from the weights.
    with opt.averaged_weights():
        on_averages = model.evaluate(X, Y, batch_size=8, verbose=0)
    raw = model.evaluate(X, Y, batch_size=8, verbose=0)
    assert on_averages != raw
    np.testing.assert_allclose(history.history["val_loss"][-1], on_averages,
                               rtol=1e-6)


# -- files say which variables have averages ----------------------------------


def _two_layers(exclude):
    inputs = keras.Input((4,))
    a = keras.layers.Dense(4, name="layer_a")(inputs)
    b = keras.layers.Dense(4, name="layer_b")(a)
    model = keras.Model(inputs, b)
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.01),
                                   exclude=exclude)
    model.compile(optimizer=opt, loss="mse")
    return model, opt


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_a_file_whose_averages_belong_to_other_variables_is_refused(
    tmp_path, suffix
):
    # Same shapes, other variables: today's main loaded layer_a's average
    # into layer_b's slot.
    path = str(tmp_path / f"m{suffix}")
    model, opt = _two_layers(exclude=["layer_b"])
    model.fit(X, np.tile(Y, (1, 4)), **FIT)
    if suffix == ".keras":
        model.save(path)
    else:
        model.save_weights(path)
    other, other_opt = _two_layers(exclude=["layer_a"])
    other.fit(X, np.tile(Y, (1, 4)), **FIT)
    sync(other)
    # Keras loads the model's weights before it reaches the optimizer: no
    # optimizer variable, no average, may change.
    before = _values(other_opt.variables)
    with pytest.raises(ValueError) as error:
        other.load_weights(path)
    message = str(error.value)
    assert "layer_a/kernel" in message and "layer_b/kernel" in message
    _assert_same(_values(other_opt.variables), before)
    assert not other_opt.averages_swapped_in


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_a_file_loads_into_a_second_instance_with_other_layer_names(
    tmp_path, suffix
):
    path = str(tmp_path / f"m{suffix}")
    model, opt = small_model(batchnorm=True), None
    opt = ExponentialMovingAverage(keras.optimizers.SGD(0.01),
                                   trainable_weights_only=False)
    model.compile(optimizer=opt, loss="mse")
    opt.shadow_copy(model)
    model.fit(X, Y, **FIT)
    if suffix == ".keras":
        model.save(path)
    else:
        model.save_weights(path)
    sync(model)
    saved = _values(model.variables)
    saved_averages = _values(opt.average(v) for v in model.variables
                             if opt.average(v) is not None)
    # A second model built in this process: its layers have other names.
    second = small_model(batchnorm=True)
    assert [v.path for v in second.variables] != [
        v.path for v in model.variables
    ]
    second_opt = ExponentialMovingAverage(keras.optimizers.SGD(0.01),
                                          trainable_weights_only=False)
    second.compile(optimizer=second_opt, loss="mse")
    second_opt.shadow_copy(second)
    second.load_weights(path)
    _assert_same(_values(second.variables), saved)
    _assert_same(
        _values(second_opt.average(v) for v in second.variables
                if second_opt.average(v) is not None),
        saved_averages,
    )


def _checkpoint_without_layer_b(tmp_path):
    """A trained model with `exclude=["layer_b"]`, its optimizer, and the
    prefix of their `tf.train.Checkpoint`."""
    import tensorflow as tf

    model, opt = _two_layers(exclude=["layer_b"])
    model.fit(X, np.tile(Y, (1, 4)), **FIT)
    prefix = tf.train.Checkpoint(model=model, optimizer=opt).save(
        str(tmp_path / "c")
    )
    return model, opt, prefix


@tensorflow_only
def test_a_tf_checkpoint_whose_averages_belong_to_other_variables_is_refused(
    tmp_path,
):
    # Today's main restored layer_a's average into layer_b's slot.
    import tensorflow as tf

    model, opt, prefix = _checkpoint_without_layer_b(tmp_path)
    other, other_opt = _two_layers(exclude=["layer_a"])
    other.fit(X, np.tile(Y, (1, 4)), **FIT)
    # Refused before TensorFlow writes any variable: the model's either.
    before = _values(other.variables) + _values(other_opt.variables)
    with pytest.raises(ValueError) as error:
        tf.train.Checkpoint(model=other, optimizer=other_opt).restore(prefix)
    message = str(error.value)
    assert "layer_a/kernel" in message and "layer_b/kernel" in message
    assert "exclude=['layer_b']" in message
    _assert_same(_values(other.variables) + _values(other_opt.variables),
                 before)


@tensorflow_only
def test_a_tf_checkpoint_restored_before_build_is_checked_once_built(
    tmp_path,
):
    import tensorflow as tf

    model, opt, prefix = _checkpoint_without_layer_b(tmp_path)
    other, other_opt = _two_layers(exclude=["layer_a"])
    tf.train.Checkpoint(model=other, optimizer=other_opt).restore(prefix)
    weights = _values(other.trainable_variables)
    # TensorFlow writes the values as `build` creates the averages: they
    # start from the weights again, and the build raises.
    with pytest.raises(ValueError, match="layer_a/kernel"):
        other_opt.build(other.trainable_variables)
    for v, w in zip(other.trainable_variables, weights):
        average = other_opt.average(v)
        if average is not None:
            np.testing.assert_array_equal(bits(average), w)


@tensorflow_only
@pytest.mark.parametrize("built", [True, False])
def test_a_tf_checkpoint_restores_into_a_second_instance(tmp_path, built):
    import tensorflow as tf

    model, opt, prefix = _checkpoint_without_layer_b(tmp_path)
    other, other_opt = _two_layers(exclude=["layer_b"])
    if built:
        other_opt.build(other.trainable_variables)
    tf.train.Checkpoint(model=other, optimizer=other_opt).restore(prefix)
    other_opt.build(other.trainable_variables)
    for v, w in zip(other.trainable_variables, model.trainable_variables):
        np.testing.assert_array_equal(bits(v), bits(w))
        if opt.average(w) is None:
            assert other_opt.average(v) is None
        else:
            np.testing.assert_array_equal(bits(other_opt.average(v)),
                                          bits(opt.average(w)))
