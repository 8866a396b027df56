"""The model an optimizer is told about, and every wrapper of a Keras object.

Keras gives an optimizer no handle on its model: `compile` only stores the
optimizer on the model, and the trainers hand the optimizer variables or
their values. An `ExponentialMovingAverage` learns its model only when told:
from `shadow_copy(model)`, which the keras-ema callbacks call with their own
`model`. It needs it for the averages of non-trainable variables, for a
refused step that moves nothing (not even the BatchNorm statistics of the
forward pass), and on JAX to put the model's state back before a swap.

Where Keras has no hook, this module wraps a Keras object's method on the
instance, and nowhere else does: the train step (`install_guard`), the
model's `evaluate` during a `fit` (`install_validation`), its test and
predict functions during one call (`guard_function`), its `save` or
`save_weights` during one checkpoint (`saving_atomically`), and an inner
optimizer's next `load_own_variables` (`hand_next_load`). Each wrapper is
marked: installing one where one is already replaces it (they never stack),
and removing it puts back exactly what was there. The wrappers hold the
optimizer and the callbacks by weak references; the model holds only the
wrapper, so an optimizer no longer used is garbage-collected.
"""

import contextlib
import weakref

import keras
import numpy as np

from keras_ema import _slots
from keras_ema import _state
from keras_ema import _update

_MARK = "_keras_ema_wrapper"


# -- the model ----------------------------------------------------------------


def bound_model(optimizer):
    return optimizer._ema_state.bound_model()


def bind(optimizer, model):
    """Makes `model` the model of `optimizer` and of the averaging
    optimizers it wraps, and guards its train step; or raises, before
    anything changes, if it trains other variables than the optimizer was
    built for, or another model is bound."""
    state = optimizer._ema_state
    known = state.bound_model()
    if known is not model and optimizer.built:
        keys = [state.var_key(v) for v in model.trainable_variables]
        if keys != [state.var_key(v) for v in state.built_for]:
            detail = (
                f" (it was built for {_update.describe(state.built_for)}, not for "
                f"the variables of {model.name!r})"
            )
            raise other_model_error(optimizer, model, known, detail)
    if known is not None and known is not model:
        # A model that trains the same variables and contains every
        # averaged one (a task around its backbone) takes its place.
        inside = {id(v) for v in model.variables}
        if not all(id(e[0]) in inside for e in state.entries):
            raise other_model_error(optimizer, model, known)
    for averaging in _state.averaging_chain(optimizer):
        averaging._ema_state.model = weakref.ref(model)
        averaging._ema_state.unguarded_teacher = None
    guard_bound_model(optimizer)


def guard_bound_model(optimizer):
    """Guards the train step of the optimizer's model, if it has one and
    runs eagerly: bound while a step is traced (a teacher's first call on
    TensorFlow), the guard waits for the next eager call (a swap), so that
    the function being traced is not rebuilt under it."""
    state = optimizer._ema_state
    model = state.bound_model()
    if model is not None and state.road.executing_eagerly():
        install_guard(model, optimizer)


def other_model_error(optimizer, model, known=None, detail=""):
    """The error for a second model; `known` is the bound one, if any."""
    known = "another model" if known is None else repr(known.name)
    return ValueError(
        f"ExponentialMovingAverage does not support training a second "
        f"model: {optimizer.name!r} averages the weights of {known} and "
        f"cannot average those of {model.name!r} too{detail}. Instead, "
        "compile each model with its own optimizer, e.g. "
        "`keras_ema.ExponentialMovingAverage.from_config(opt.get_config())`;"
        " for a model that contains another (a task around its backbone), "
        "call `shadow_copy` with the model you train, on an optimizer not "
        "built yet."
    )


def find_in_model(model, user):
    """The model's `ExponentialMovingAverage`, also when it is wrapped.

    Under mixed_float16, `compile()` wraps it in a `LossScaleOptimizer`;
    `user` names the caller in the error raised when there is none.
    """
    optimizer = getattr(model, "optimizer", None)
    chain = _state.averaging_chain(optimizer)
    if not chain:
        raise ValueError(
            f"{user} does not support a model whose optimizer keeps no "
            f"averages. Received: optimizer={optimizer!r}. Instead, compile "
            "the model with `keras_ema.ExponentialMovingAverage(optimizer)`."
        )
    return chain[0]


def sync(state):
    """Puts the bound model's cleared variables back (a JAX trainer's)."""
    model = state.bound_model()
    if model is not None:
        state.road.sync(model)


def sync_model(model):
    """Puts a model's variables back from where its trainer keeps them
    during a step (JAX), so that a callback reads their values."""
    chain = _state.averaging_chain(getattr(model, "optimizer", None))
    if chain:
        chain[0]._ema_state.road.sync(model)


def reattach(model, values=()):
    """Gives a model's variables back the values that a JAX trainer's error
    left outside them (the road's `reattach`); nothing elsewhere."""
    chain = _state.averaging_chain(getattr(model, "optimizer", None))
    if chain:
        chain[0]._ema_state.road.reattach(model, values)


# -- the train step -----------------------------------------------------------


def install_guard(model, optimizer):
    """Wraps `model.train_step`, so that a step refused while averages are
    swapped in changes nothing, and, on JAX, moves the averages that only
    the train step sees.

    Keras has no hook that runs before a train step's forward pass, where
    the BatchNorm statistics move.
    """
    current = _owner_of(vars(model).get("train_step"))
    if current is not None and (
        any(o is optimizer for o in _state.averaging_chain(current))
        or any(o is current for o in _state.averaging_chain(optimizer))
    ):
        # Guarded for this chain already: the guard serves the whole chain
        # of the model's optimizer (`PostHocEMA`'s profiles).
        return
    _remove(model, "train_step")
    original = model.train_step
    owner = weakref.ref(optimizer)
    model_ref = weakref.ref(model)

    def train_step(*args):
        model = model_ref()
        optimizer = owner()
        chain = _state.averaging_chain(getattr(model, "optimizer", None))
        if optimizer is None or not any(o is optimizer for o in chain):
            # The model was compiled with another optimizer since.
            _unguard(model)
            return original(*args)
        states = [o._ema_state for o in chain]
        return states[0].road.run_guarded(model, states, original, args)

    _install(model, "train_step", train_step, owner=owner)
    _install_makers(model, optimizer)
    if getattr(model, "train_function", None) is not None:
        # `make_train_function` bound the old `train_step`; rebuild it rather
        # than drop it, as `fit` builds it before `on_train_begin`.
        model.make_train_function(force=True)


def _install_makers(model, optimizer):
    """Wraps `model.make_train_function`, and on JAX the test and predict
    ones too, with their steps and functions.

    `fit` builds its train function first thing, eagerly: the averages of
    an optimizer that has not updated yet start there from the weights
    training starts with (a `Normalization` adapted, weights loaded after
    `shadow_copy`); Keras has no hook at the start of `fit`. On JAX a
    compiled test or predict step receives only the model's state, with no
    hook to pass it the averages: each batch brings their values along
    (`JaxRoad.with_averages`), which the step's wrapper hands to a teacher.
    """
    owner = weakref.ref(optimizer)
    model_ref = weakref.ref(model)
    kinds = ["train"]
    if optimizer._ema_state.road.stateless:
        kinds += ["test", "predict"]
    for kind in kinds:
        make = _original(model, f"make_{kind}_function")
        _install(model, f"make_{kind}_function",
                 _maker(model_ref, owner, kind, make), owner=owner)
        if kind != "train":
            step = _original(model, f"{kind}_step")
            _install(model, f"{kind}_step",
                     _step_with_averages(model_ref, step), owner=owner)
            if getattr(model, f"{kind}_function", None) is not None:
                make(force=True)  # built with the old step


def _maker(model_ref, owner, kind, make):
    def make_function(force=False):
        model = model_ref()
        chain = _state.averaging_chain(getattr(model, "optimizer", None))
        optimizer = owner()
        if optimizer is None or not any(o is optimizer for o in chain):
            # The model was compiled with another optimizer since.
            _unguard(model)
            return getattr(model, f"make_{kind}_function")(force=force)
        if kind == "train":
            for averaging in chain:
                _slots.restart_untrained(averaging._ema_state)
            return make(force=force)
        name = f"{kind}_function"
        current = vars(model).get(name)
        if current is not None and _owner_of(current) is optimizer and not force:
            return current
        _remove(model, name)
        result = make(force=True)
        function = getattr(model, name)
        road = chain[0]._ema_state.road

        def function_with_averages(state_values, iterator):
            states = [
                o._ema_state for o in
                _state.averaging_chain(getattr(model_ref(), "optimizer", None))
            ]
            return function(state_values, road.with_averages(states, iterator))

        _install(model, name, function_with_averages, owner=owner)
        return function_with_averages if result is not None else None

    return make_function


def _step_with_averages(model_ref, step):
    def step_with_averages(state_values, data):
        model = model_ref()
        chain = _state.averaging_chain(getattr(model, "optimizer", None))
        if not chain:
            return step(state_values, data)
        states = [o._ema_state for o in chain]
        return states[0].road.run_with_averages(
            model, states, step, state_values, data
        )

    return step_with_averages


def _original(model, name):
    """`model.<name>` without a keras-ema wrapper."""
    _remove(model, name)
    return getattr(model, name)


def _unguard(model):
    """Takes off every wrapper an optimizer put on `model`."""
    for kind in ("train", "test", "predict"):
        _remove(model, f"make_{kind}_function")
        _remove(model, f"{kind}_step")
    for kind in ("test", "predict"):
        if _owner_of(vars(model).get(f"{kind}_function")) is not None:
            _remove(model, f"{kind}_function")
            setattr(model, f"{kind}_function", None)


def guard_of(model):
    """The optimizer whose guard wraps `model.train_step`, or None."""
    return _owner_of(vars(model).get("train_step"))


# -- SwapAverageWeights: validation inside fit, evaluate and predict ----------


def install_validation(model, callback, validate):
    """Wraps `model.evaluate` for the rest of a `fit`: `fit` validates
    through it, and `validate(evaluate, fit_callbacks, *args, **kwargs)` (a
    method of `callback`) runs the validation on the averages.

    `fit` has no try/finally and no hook around its validation, so hooks
    alone cannot swap back when validation raises.
    """
    _remove(model, "evaluate")
    evaluate = model.evaluate
    callback_ref = weakref.ref(callback)
    validate = weakref.WeakMethod(validate)

    def evaluate_on_averages(*args, **kwargs):
        callbacks = kwargs.get("callbacks")
        if not isinstance(callbacks, keras.callbacks.CallbackList):
            return evaluate(*args, **kwargs)
        callback, method = callback_ref(), validate()
        if callback is None or not any(c is callback for c in callbacks.callbacks):
            # The validation of a fit without that callback: the fit that
            # installed the wrapper raised before `on_train_end`.
            remove_validation(model)
            return evaluate(*args, **kwargs)
        return method(evaluate, callbacks.callbacks, *args, **kwargs)

    _install(model, "evaluate", evaluate_on_averages, owner=callback_ref)


def remove_validation(model, callback=None):
    """Removes the `evaluate` wrapper (only `callback`'s, if given)."""
    if callback is None or validating_callback(model) is callback:
        _remove(model, "evaluate")


def validating_callback(model):
    """The callback whose validation wraps `model.evaluate`, or None."""
    return _owner_of(vars(model).get("evaluate"))


def guard_function(model, name, on_error):
    """Wraps `model.<name>` (its `test_function` or `predict_function`) for
    one call of `evaluate` or `predict`: a step that raises calls
    `on_error(args)` before the error leaves them.

    Keras' `evaluate` and `predict` have no try/finally either.
    """
    if _owner_of(vars(model).get(name)) is None:
        _remove(model, name)  # a stale guard, of a call that raised
    function = getattr(model, name)

    def guarded(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except BaseException:
            on_error(args)
            raise

    _install(model, name, guarded)


def unguard_function(model, name):
    _remove(model, name)


# -- AverageModelCheckpoint: writing aside ------------------------------------


@contextlib.contextmanager
def saving_atomically(model, name, atomic_path):
    """Within the block, `model.<name>` (`save` or `save_weights`) writes to
    a temporary file in `atomic_path(filepath)` and renames it into place.

    `ModelCheckpoint` formats the path, decides, reports, saves and rewords
    errors in one method, with no hook around the write.
    """
    _remove(model, name)
    save = getattr(model, name)

    def save_atomically(filepath, *args, **kwargs):
        with atomic_path(filepath) as temporary:
            save(temporary, *args, **kwargs)

    _install(model, name, save_atomically)
    try:
        yield
    finally:
        _remove(model, name)


# -- loading an unbuilt optimizer ---------------------------------------------


def hand_next_load(inner, take):
    """Hands `inner`'s values, the next time Keras loads them, to `take`
    (a list of arrays) instead of `inner`.

    Keras gives no hook between loading a parent optimizer and its children:
    this lasts for the one call Keras makes next.
    """
    _remove(inner, "load_own_variables")

    def load_once(store):
        _remove(inner, "load_own_variables")
        take([np.asarray(store[str(i)]) for i in range(len(store.keys()))])

    _install(inner, "load_own_variables", load_once)


# -- the mechanism ------------------------------------------------------------


def _install(target, name, wrapper, owner=None):
    """Sets `target.<name> = wrapper`, marked with what it replaced (the
    instance's own attribute, or None for the class's) and its `owner`."""
    setattr(wrapper, _MARK, (vars(target).get(name), owner))
    setattr(target, name, wrapper)


def _remove(target, name):
    """Puts back what the keras-ema wrapper of `target.<name>` replaced;
    nothing if there is none."""
    if target is None:
        return
    wrapper = vars(target).get(name)
    mark = getattr(wrapper, _MARK, None)
    if mark is None:
        return
    replaced = mark[0]
    if replaced is None:
        delattr(target, name)
    else:
        setattr(target, name, replaced)


def _owner_of(wrapper):
    mark = getattr(wrapper, _MARK, None)
    if mark is None or mark[1] is None:
        return None
    return mark[1]()
