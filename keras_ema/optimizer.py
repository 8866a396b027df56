"""`ExponentialMovingAverage`: a Keras 3 optimizer that averages the weights."""

import contextlib
import numbers

import keras
from keras import ops
from keras.src.utils import tracking

from keras_ema import schedules

_LOW_PRECISION = ("float16", "bfloat16")


class _Averaged:
    """Plain holder of the averaged model variables and their averages.

    Keras optimizers track every list assigned to one of their attributes, so
    a list of model variables kept on the optimizer would turn the model's
    weights into optimizer variables. This object is not tracked.
    """

    def __init__(self):
        self.weights = []
        self.averages = []
        self.index = {}
        # Averages of the variables the optimizer was built with come first;
        # `shadow_copy` appends the rest (non-trainable statistics). Loading
        # a `.keras` file rebuilds only the first group, so the order of
        # `variables` keeps them apart.
        self.num_built = 0
        # Saved averages of the second group, read from a file before the
        # model variables they belong to were known.
        self.pending = None


@keras.saving.register_keras_serializable(package="keras_ema")
class ExponentialMovingAverage(keras.optimizers.Optimizer):
    """Optimizer that keeps an exponential moving average of the weights.

    Wraps any Keras optimizer. After every real update of the inner optimizer
    it moves an average ("shadow") of each weight towards the new weight:

    `average -= (1 - decay) * (average - weight)`

    Averages start equal to the weights. The first `start_step` updates copy
    the weights into the averages; the n-th update after that (n = 0, 1, ...)
    uses `decay = min(average_decay, (1 + n) / (10 + n))` when
    `dynamic_decay` is on (0.1, 2/11, ... while the weights move fast), else
    `average_decay`. An update that the inner optimizer skips (a gradient
    accumulation micro-step, a step a `LossScaleOptimizer` rejects) leaves
    the averages alone. Averages are optimizer variables, so they are saved
    and restored with the optimizer.

    Evaluate or export the averages with `averaged_weights()`, which swaps
    them into the model and swaps the training weights back afterwards; the
    swap is exact, bit for bit.

    Args:
        optimizer: The optimizer to wrap: a `keras.optimizers.Optimizer`, or
            anything `keras.optimizers.get` accepts (`"adam"`, a config
            dict). Available as `inner_optimizer`.
        trainable_weights_only: If `False`, `shadow_copy(model)` also averages
            the model's non-trainable variables (BatchNorm moving statistics).
        average_decay: Float in `[0, 1]`: the decay of the average, the
            largest one when `dynamic_decay` is on. Its horizon is about
            `1 / (1 - average_decay)` updates. Also accepts a schedule from
            `keras_ema.schedules`, which then alone decides the decay.
        start_step: Non-negative int. The first `start_step` updates copy
            the weights into the averages instead of averaging.
        dynamic_decay: If `True` (default), a float `average_decay` is capped
            by `(1 + n) / (10 + n)`, so early averages forget fast.
        name: String, the name of the optimizer.

    Example:

    ```python
    opt = keras_ema.ExponentialMovingAverage(
        keras.optimizers.AdamW(1e-3), average_decay=0.999
    )
    model.compile(optimizer=opt, loss="mse")
    model.fit(x, y, epochs=5)
    with opt.averaged_weights():
        model.save("model_ema.keras")
    ```
    """

    def __init__(
        self,
        optimizer,
        trainable_weights_only=True,
        average_decay=0.99,
        start_step=0,
        dynamic_decay=True,
        name="ExponentialMovingAverage",
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                "ExponentialMovingAverage does not support the arguments "
                f"{sorted(kwargs)}. Instead, set optimizer options such as "
                "`learning_rate` or `clipnorm` on the wrapped `optimizer`."
            )
        inner = _get_optimizer(optimizer)
        _check_bool(trainable_weights_only, "trainable_weights_only")
        _check_bool(dynamic_decay, "dynamic_decay")
        if isinstance(average_decay, numbers.Real):
            schedules._check_decay(
                "ExponentialMovingAverage", "average_decay", average_decay
            )
        if (
            isinstance(start_step, bool)
            or not isinstance(start_step, numbers.Integral)
            or start_step < 0
        ):
            raise ValueError(
                "ExponentialMovingAverage requires `start_step` to be a "
                f"non-negative integer. Received: start_step={start_step!r}. "
                "Instead, pass the number of updates to copy, e.g. 0."
            )
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner
        self.trainable_weights_only = trainable_weights_only
        self.average_decay = average_decay
        self.start_step = int(start_step)
        self.dynamic_decay = dynamic_decay
        self._schedule = schedules.get(average_decay, dynamic=dynamic_decay)
        self._averaged = _Averaged()
        self._trained = False

    # -- building -----------------------------------------------------------

    @tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        self._step = self.add_variable(
            shape=(),
            dtype="int",
            aggregation="only_first_replica",
            name="average_step",
        )
        self._swapped = self.add_variable(
            shape=(),
            dtype="int",
            aggregation="only_first_replica",
            name="averages_swapped_in",
        )
        self.inner_optimizer.build(var_list)
        for variable in var_list:
            self._add_average(variable)
        self._averaged.num_built = len(self._averaged.averages)
        super().build(var_list)

    def shadow_copy(self, model):
        """Creates the averages of a model's weights, if not done yet.

        `model.fit` creates the averages of the trainable weights by itself.
        Call this after `compile()` and before training to create them
        explicitly, and, when `trainable_weights_only=False`, to also average
        the model's non-trainable variables (BatchNorm moving statistics),
        which the optimizer does not see otherwise. After loading a `.keras`
        file saved with such averages, call it once more to restore them.
        Calling it again is harmless.

        Args:
            model: The `keras.Model` (or layer) whose weights to average.
        """
        if not self.built:
            self.build(model.trainable_variables)
        candidates = (
            model.trainable_variables
            if self.trainable_weights_only
            else model.variables
        )
        new = [v for v in candidates if self.average(v) is None]
        pending = self._averaged.pending
        if pending is not None and (
            len(pending) != len(new)
            or any(tuple(p.shape) != tuple(v.shape) for p, v in zip(pending, new))
        ):
            raise ValueError(
                f"The loaded optimizer holds {len(pending)} averages of "
                f"non-trainable variables, but {model.name!r} has "
                f"{len(new)} such variables without an average, or their "
                "shapes differ. Instead, call `shadow_copy` with the model "
                "that was saved together with this optimizer."
            )
        if new and self._trained:
            raise ValueError(
                "`shadow_copy` cannot add averages after training started: "
                "the compiled train step would never update the averages of "
                f"{_paths(new)}. Instead, call `shadow_copy(model)` right "
                "after `compile()`, before the first `fit`."
            )
        for i, variable in enumerate(new):
            self._add_average(variable, None if pending is None else pending[i])
        self._averaged.pending = None

    @property
    def has_shadow_copy(self):
        """Whether averages exist (created by `build` or `shadow_copy`)."""
        return bool(self._averaged.averages)

    def average(self, variable):
        """Returns the average of `variable`, or `None` if it has none."""
        i = self._averaged.index.get(self._var_key(variable))
        return None if i is None else self._averaged.averages[i]

    def _add_average(self, variable, initial_value=None):
        if self._overwrite_variable_with_gradient(variable):
            # Such variables hold statistics that the gradient overwrites
            # (e.g. float8 scales), not weights worth averaging.
            return
        dtype = _average_dtype(variable.dtype)

        def initializer(shape, dtype):
            value = variable if initial_value is None else initial_value
            # An explicit copy: on torch a same-dtype cast aliases storage.
            return ops.copy(ops.cast(value, dtype))

        with self._colocate_with(variable):
            average = self.add_variable(
                shape=variable.shape,
                initializer=initializer,
                dtype=dtype,
                name=variable.path.replace("/", "_") + "_average",
                layout=getattr(variable, "_layout", None),
            )
        self._averaged.index[self._var_key(variable)] = len(
            self._averaged.averages
        )
        self._averaged.weights.append(variable)
        self._averaged.averages.append(average)

    def _colocate_with(self, variable):
        if keras.backend.backend() != "tensorflow":
            return contextlib.nullcontext()
        return self._distribution_strategy.extended.colocate_vars_with(
            variable.value
        )

    @property
    def variables(self):
        # Own state, then the inner optimizer's, then the averages added by
        # `shadow_copy`: a freshly loaded optimizer, built from the trainable
        # variables only, matches the saved one up to that last group.
        extra = self._averaged.averages[self._averaged.num_built :]
        extra_ids = {id(v) for v in extra}
        own = [v for v in self._variables if id(v) not in extra_ids]
        return own + self.inner_optimizer.variables + extra

    # -- training -----------------------------------------------------------

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "ExponentialMovingAverage must be built before `apply` "
                    "is called without `trainable_variables`. Instead, pass "
                    "`trainable_variables` or call `build(variables)` first."
                )
            self.build(trainable_variables)
        self._check_ready("train")
        self._trained = True
        # "Did the inner optimizer really update?" One rule covers gradient
        # accumulation (its `iterations` counts real updates only) and an
        # inner LossScaleOptimizer that skips a non-finite step.
        before = ops.copy(self.inner_optimizer.iterations)
        self.inner_optimizer.apply(grads, trainable_variables)
        moved = ops.not_equal(self.inner_optimizer.iterations, before)
        self._update_averages(moved)

    def _update_averages(self, moved):
        step = ops.add(self._step, ops.cast(moved, self._step.dtype))
        self._step.assign(step)
        since_start = ops.subtract(step, self.start_step)
        n = ops.maximum(ops.subtract(since_start, 1), 0)
        decay = ops.cast(self._schedule(n), "float32")
        averaging = ops.logical_and(moved, ops.greater(since_start, 0))
        # Branch-free: a step that must not move uses factor 0, which leaves
        # the average bit-exact, and costs no conditional per variable.
        factor = ops.multiply(ops.cast(averaging, "float32"), 1.0 - decay)
        if self.start_step == 0:
            self._for_each_pair(_move_average, factor)
        else:
            copying = ops.logical_and(moved, ops.less_equal(since_start, 0))
            self._for_each_pair(_move_or_copy_average, factor, copying)

    def _for_each_pair(self, fn, *args, variables=None):
        """Calls `fn(average, weight, *args)` for each averaged variable.

        On TensorFlow the call runs once per device through the strategy, as
        Keras' own optimizers update their slots.
        """
        averaged = self._averaged
        if variables is None:
            pairs = list(zip(averaged.averages, averaged.weights))
        else:
            pairs = [(self.average(v), v) for v in variables]
        if keras.backend.backend() != "tensorflow":
            for average, weight in pairs:
                fn(average, weight, *args)
            return
        import tensorflow as tf

        def update(distribution, *args):
            for average, weight in pairs:
                distribution.extended.update(
                    average.value, fn, args=(weight.value, *args), group=False
                )

        if tf.distribute.in_cross_replica_context():
            update(self._distribution_strategy, *args)
        else:
            tf.__internal__.distribute.interim.maybe_merge_call(
                update, self._distribution_strategy, *args
            )

    # -- swapping -----------------------------------------------------------

    def swap_weights(self):
        """Exchanges the averaged variables with their averages, exactly.

        Swapping twice restores every bit of both. Works eagerly and inside a
        `tf.function`. Prefer `averaged_weights()`, which swaps back for you.
        """
        self._check_ready("swap_weights")
        self._for_each_pair(_swap)
        self._swapped.assign(ops.subtract(1, self._swapped))

    @property
    def averages_swapped_in(self):
        """Whether the model currently holds the averages (after a swap)."""
        return self.built and bool(ops.convert_to_numpy(self._swapped))

    @contextlib.contextmanager
    def averaged_weights(self):
        """Context manager: the averages are in the model inside the block.

        The training weights come back, bit for bit, when the block ends,
        also when it raises. If the averages are already swapped in, the
        block leaves them there.

        Example:

        ```python
        with opt.averaged_weights():
            model.evaluate(x_val, y_val)
            model.save("model_ema.keras")
        ```
        """
        self._check_ready("averaged_weights")
        if self.averages_swapped_in:
            yield
            return
        self.swap_weights()
        try:
            yield
        finally:
            self.swap_weights()

    def assign_average_vars(self, var_list):
        """Sets each variable of `var_list` to its average.

        Unlike `swap_weights`, this overwrites the variables: their current
        values are lost. Non-trainable variables with an average are set too.

        Args:
            var_list: Variables that have an average, e.g.
                `model.trainable_variables`.
        """
        self._check_ready("assign_average_vars")
        var_list = list(var_list)
        missing = [v for v in var_list if self.average(v) is None]
        if missing:
            raise ValueError(
                "`assign_average_vars` got variables that have no average: "
                f"{_paths(missing)}. Instead, pass only averaged variables "
                "(see `average(variable)`), or create their averages with "
                "`shadow_copy(model)` (`trainable_weights_only=False` for "
                "non-trainable ones)."
            )
        self._for_each_pair(_assign_average, variables=var_list)

    def _check_ready(self, what):
        if self._averaged.pending is not None:
            raise ValueError(
                f"`{what}` cannot run yet: the loaded optimizer holds "
                f"{len(self._averaged.pending)} averages of non-trainable "
                "variables that are not attached to the model. Instead, call "
                "`optimizer.shadow_copy(model)` once after loading."
            )
        if what != "train" and not self.has_shadow_copy:
            raise ValueError(
                f"`{what}` needs averages, but none exist yet. Instead, call "
                "`optimizer.shadow_copy(model)` or train for a step first."
            )

    # -- forwarding to the inner optimizer -----------------------------------

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    # -- saving ---------------------------------------------------------------

    def load_own_variables(self, store):
        variables = self.variables
        saved = len(store.keys())
        extra = saved - len(variables)
        if extra < 0 or (extra > 0 and len(self._averaged.averages) > self._averaged.num_built):
            raise ValueError(
                f"Cannot load the saved ExponentialMovingAverage: it holds "
                f"{saved} variables where this one holds {len(variables)}. "
                "Instead, load into an optimizer built for the same model, "
                "with the same `trainable_weights_only`."
            )
        for i, variable in enumerate(variables):
            variable.assign(store[str(i)])
        if extra:
            # Averages of non-trainable variables: the model variables they
            # belong to are unknown here; `shadow_copy(model)` attaches them.
            self._averaged.pending = [
                store[str(i)][...] for i in range(len(variables), saved)
            ]

    def get_config(self):
        # Not super().get_config(): the base optimizer arguments belong to
        # the inner optimizer.
        average_decay = self.average_decay
        if not isinstance(average_decay, numbers.Real):
            average_decay = schedules.serialize(average_decay)
        return {
            "name": self.name,
            "optimizer": keras.saving.serialize_keras_object(
                self.inner_optimizer
            ),
            "trainable_weights_only": self.trainable_weights_only,
            "average_decay": average_decay,
            "start_step": self.start_step,
            "dynamic_decay": self.dynamic_decay,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["optimizer"] = keras.saving.deserialize_keras_object(
            config["optimizer"], custom_objects=custom_objects
        )
        if isinstance(config.get("average_decay"), dict):
            config["average_decay"] = schedules.deserialize(
                config["average_decay"], custom_objects=custom_objects
            )
        return cls(**config)


def _move_average(average, weight, factor):
    delta = ops.subtract(average, ops.cast(weight, average.dtype))
    average.assign_sub(ops.multiply(ops.cast(factor, average.dtype), delta))


def _move_or_copy_average(average, weight, factor, copying):
    # A copy must be a real assignment: `a - 1 * (a - w)` is not always `w`.
    weight = ops.cast(weight, average.dtype)
    moved = ops.subtract(
        average,
        ops.multiply(ops.cast(factor, average.dtype), ops.subtract(average, weight)),
    )
    average.assign(ops.where(copying, weight, moved))


def _swap(average, weight):
    # A real exchange through a copy. Never `a += b; b = a - b; a -= b`:
    # that arithmetic loses bits.
    raw = ops.copy(weight)
    weight.assign(ops.cast(average, weight.dtype))
    average.assign(ops.cast(raw, average.dtype))


def _assign_average(average, weight):
    weight.assign(ops.cast(average, weight.dtype))


def _average_dtype(dtype):
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in _LOW_PRECISION else dtype


def _get_optimizer(optimizer):
    try:
        inner = keras.optimizers.get(optimizer)
    except (ValueError, TypeError):
        inner = None
    if not isinstance(inner, keras.optimizers.Optimizer):
        raise ValueError(
            "ExponentialMovingAverage expects `optimizer` to be a Keras 3 "
            "optimizer: a `keras.optimizers.Optimizer` instance, a name such "
            f"as 'adam', or a config dict. Received: optimizer={optimizer!r} "
            f"of type {type(optimizer).__name__}. Legacy Keras 2 "
            "(`tf.keras`, `tf_keras`) optimizers are not supported; use the "
            "matching `keras.optimizers` class instead."
        )
    if inner.use_ema:
        raise ValueError(
            "ExponentialMovingAverage does not support an inner optimizer "
            "with `use_ema=True`: the weights would be averaged twice. "
            "Instead, create the inner optimizer with `use_ema=False`."
        )
    return inner


def _check_bool(value, name):
    if not isinstance(value, bool):
        raise ValueError(
            f"ExponentialMovingAverage requires `{name}` to be True or False. "
            f"Received: {name}={value!r}."
        )


def _paths(variables):
    return ", ".join(getattr(v, "path", None) or v.name for v in variables)
