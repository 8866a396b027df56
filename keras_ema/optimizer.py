"""`ExponentialMovingAverage`: a Keras 3 optimizer that averages the weights."""

import contextlib
import numbers
import warnings

import keras
from keras import ops
from keras.src.utils import tracking

from keras_ema import _averages
from keras_ema import _checks
from keras_ema import _packing
from keras_ema import _tf
from keras_ema import schedules

_SWAPPED_IN = (
    "ExponentialMovingAverage cannot train while the averages are swapped "
    "into the model (after `swap_weights()`, or loaded from a checkpoint "
    "saved that way). Instead, call `optimizer.swap_weights()` to put the "
    "training weights back."
)

_ASSIGN_SWAPPED = (
    "`assign_average_vars` does not support being called while the averages "
    "are swapped in: the model already holds them. Instead, call it after "
    "swapping back."
)


_PENDING = (
    "the loaded optimizer holds {} saved averages of non-trainable variables "
    "that are not attached to the model. Instead, call "
    "`optimizer.shadow_copy(model)` once after loading."
)


@keras.saving.register_keras_serializable(package="keras_ema")
class ExponentialMovingAverage(keras.optimizers.Optimizer):
    """Optimizer that keeps an exponential moving average of the weights.

    Wraps any Keras optimizer. After every real update of the inner optimizer
    it moves an average ("shadow") of each weight towards the new weight:
    `average -= (1 - decay) * (average - weight)`.

    Averages start equal to the weights. The first `start_step` updates copy
    the weights into the averages; the n-th update after that (n = 0, 1, ...)
    uses `decay = min(average_decay, (1 + n) / (10 + n))` when
    `dynamic_decay` is on (0.1, 2/11, ... while the weights move fast), else
    `average_decay`, or `schedule(n)` when `average_decay` is a schedule from
    `keras_ema.schedules`. An update that the inner optimizer skips (a
    gradient-accumulation micro-step, a step a `LossScaleOptimizer` rejects)
    leaves the averages alone. Averages are optimizer variables, so they are
    saved and restored with the optimizer.

    Evaluate or export the averages with `averaged_weights()`, which swaps
    them into the model and the training weights back afterwards, exactly.

    Args:
        optimizer: The optimizer to wrap: a `keras.optimizers.Optimizer`, or
            anything `keras.optimizers.get` accepts (`"adam"`, a config
            dict). Available as `inner_optimizer`.
        trainable_weights_only: If `False`, `shadow_copy(model)` also averages
            the model's non-trainable float variables (BatchNorm statistics).
        average_decay: Float in `[0, 1]`: the decay, the largest one when
            `dynamic_decay` is on. The average spans about
            `1 / (1 - average_decay)` updates. Or a schedule
            (`keras_ema.schedules`, or a function `n -> decay`), which then
            alone decides the decay.
        start_step: Non-negative int. The first `start_step` updates copy
            the weights into the averages instead of averaging.
        dynamic_decay: If `True` (default), a float `average_decay` is capped
            by `(1 + n) / (10 + n)`, so early averages forget fast.
        update_every: Int >= 1. Move the averages only on every
            `update_every`-th real update, with decay `decay ** update_every`
            so that the average spans the same number of updates.
        average_dtype: Dtype of the averages. Defaults to float32 for
            float16/bfloat16 weights and to the weight's dtype otherwise.
        exclude: Regular expressions; variables whose `path` matches one
            (`re.search`) get no average and are left alone by swaps.
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
        update_every=1,
        average_dtype=None,
        exclude=None,
        name="ExponentialMovingAverage",
        **kwargs,
    ):
        if kwargs:
            raise ValueError(
                "ExponentialMovingAverage does not support the arguments "
                f"{sorted(kwargs)}. Instead, set optimizer options such as "
                "`learning_rate` or `clipnorm` on the wrapped `optimizer`."
            )
        inner = _checks.get_optimizer(optimizer)
        _checks.check_bool(trainable_weights_only, "trainable_weights_only")
        _checks.check_bool(dynamic_decay, "dynamic_decay")
        if isinstance(average_decay, numbers.Real):
            schedules._check_decay(
                "ExponentialMovingAverage", "average_decay", average_decay
            )
        _checks.check_int(start_step, "start_step", minimum=0)
        _checks.check_int(update_every, "update_every", minimum=1)
        if average_dtype is not None:
            average_dtype = _checks.check_float_dtype(average_dtype)
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner
        self.trainable_weights_only = trainable_weights_only
        self.average_decay = average_decay
        self.start_step = int(start_step)
        self.dynamic_decay = dynamic_decay
        self.update_every = int(update_every)
        self.average_dtype = average_dtype
        self.exclude = _checks.compile_patterns(exclude)
        self._schedule = schedules.get(average_decay, dynamic=dynamic_decay)
        self._averaged = _averages.Averaged()
        self._trained = False
        # Python's view of the swap state, kept by eager swaps and loads, so
        # that `apply` can refuse to train on the averages without reading
        # a device variable every step.
        self._swapped_in = False

    # -- creating averages ----------------------------------------------------

    @tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        if self.built:
            return
        var_list = list(var_list)
        self._step = self.add_variable(
            shape=(), dtype="int", aggregation="only_first_replica",
            name="average_step",
        )
        self._swapped = self.add_variable(
            shape=(), dtype="int", aggregation="only_first_replica",
            name="averages_swapped_in",
        )
        self.inner_optimizer.build(var_list)
        averaged = [v for v in var_list if self._should_average(v)]
        packed = {}
        if _packing.enabled():
            for group in _packing.plan(averaged, lambda v: self._slots(v)[0]):
                pack = self._add_pack(group)
                for i, weight in enumerate(group):
                    packed[id(weight)] = _packing.PackedAverage(pack, i)
        for variable in averaged:
            if id(variable) in packed:
                self._add_entry(variable, [packed[id(variable)]])
            else:
                self._add_average(variable)
        super().build(var_list)
        if self._averaged.deferred is not None:
            values, self._averaged.deferred = self._averaged.deferred, None
            with _tf.eager_scope():
                self._restore(values)

    def shadow_copy(self, model):
        """Creates the averages of a model's weights, if not done yet.

        `model.fit` creates the averages of the trainable weights by itself.
        Call this after `compile()` and before training to create them
        explicitly, and, when `trainable_weights_only=False`, to also average
        the model's non-trainable float variables (BatchNorm statistics),
        which the optimizer does not see otherwise. After loading a file
        saved with such averages, call it once to attach them. Calling it
        again is harmless.

        Args:
            model: The `keras.Model` (or layer) whose weights to average.
        """
        with _tf.strategy_scope(self):
            self._shadow_copy(model)

    def _shadow_copy(self, model):
        if not self.built:
            self.build(model.trainable_variables)
        candidates = (
            model.trainable_variables
            if self.trainable_weights_only
            else model.variables
        )
        new = [
            v for v in candidates
            if self._should_average(v) and self.average(v) is None
        ]
        if new and self._trained:
            raise ValueError(
                "`shadow_copy` cannot add averages after training started: "
                "the compiled train step would never update the averages of "
                f"{_paths(new)}. Instead, call `shadow_copy(model)` right "
                "after `compile()`, before the first `fit`."
            )
        pending = self._averaged.pending
        if pending is not None:
            shapes = [tuple(v.shape) for v in new for _ in self._slots(v)]
            if shapes != [tuple(p.shape) for p in pending]:
                raise ValueError(
                    f"The loaded optimizer holds {len(pending)} saved "
                    "averages of non-trainable variables that do not match "
                    f"the variables of {model.name!r} without an average. "
                    "Instead, call `shadow_copy` with the model that was "
                    "saved together with this optimizer."
                )
            pending = iter(pending)
        for variable in new:
            self._add_average(variable, pending, extra=True)
        self._averaged.pending = None
        if self._averaged.extra and keras.backend.backend() == "jax":
            from keras_ema import _jax

            # Inside `fit` the optimizer never sees these variables' values.
            _jax.install_train_step(model, self)

    @property
    def has_shadow_copy(self):
        """Whether averages exist (created by `build` or `shadow_copy`)."""
        return bool(self._averaged.entries)

    def average(self, variable):
        """Returns the average of `variable`, or `None` if it has none.

        The average is a `keras.Variable`, or, for a small weight whose
        average is stored together with others' (TensorFlow and JAX, see
        README "Speed and memory"), a view of it with the same `value`,
        `numpy()`, `dtype`, `shape` and `assign`, usable in Keras ops and
        `np.asarray`.
        """
        i = self._averaged.index.get(self._var_key(variable))
        return None if i is None else self._averaged.entries[i][1]

    def _should_average(self, variable):
        dtype = keras.backend.standardize_dtype(variable.dtype)
        return (
            dtype in _checks.FLOATS
            # Overwritten by their gradient (e.g. float8 scales): not weights.
            and not self._overwrite_variable_with_gradient(variable)
            and not any(p.search(variable.path) for p in self.exclude)
        )

    def _slots(self, variable):
        """The dtypes of the average and, if needed, of the raw backup."""
        weight_dtype = keras.backend.standardize_dtype(variable.dtype)
        dtype = self.average_dtype or (
            "float32" if weight_dtype in ("float16", "bfloat16")
            else weight_dtype
        )
        return [dtype] if dtype == weight_dtype else [dtype, weight_dtype]

    def _add_average(self, variable, saved=None, extra=False):
        slots = []
        for dtype, suffix in zip(self._slots(variable), ("average", "raw")):
            value = variable if saved is None else next(saved)

            def initializer(shape, dtype, value=value):
                # An explicit copy: on torch a same-dtype cast aliases storage.
                return ops.copy(ops.cast(value, dtype))

            # Created eagerly, also when `fit` builds the optimizer while tracing
            # its step: a variable created in the trace keeps its initial value
            # alive as a captured input of the step (a second copy of the
            # weights, for as long as the model lives), and cannot be lifted out
            # of an XLA-compiled step at all.
            with _tf.eager_scope(), _tf.colocate_with(self, variable):
                slots.append(self.add_variable(
                    shape=variable.shape,
                    initializer=initializer,
                    dtype=dtype,
                    name=f"{variable.path.replace('/', '_')}_{suffix}",
                    layout=getattr(variable, "_layout", None),
                ))
        self._add_entry(variable, slots)
        if extra:
            self._averaged.extra.extend(slots)

    def _add_pack(self, weights):
        """One flat variable for the averages of `weights` (`_packing.py`)."""
        pack = _packing.Pack(weights)

        def initializer(shape, dtype):
            return ops.cast(pack.join(weights), dtype)

        with _tf.eager_scope(), _tf.colocate_with(self, weights[0]):
            pack.buffer = self.add_variable(
                shape=(pack.offsets[-1],),
                initializer=initializer,
                dtype=weights[0].dtype,
                name=f"packed_averages_{len(self._averaged.packs)}",
            )
        self._averaged.packs.append(pack)
        return pack

    def _add_entry(self, variable, slots):
        averaged = self._averaged
        averaged.index[self._var_key(variable)] = len(averaged.entries)
        averaged.entries.append((variable, slots[0], (slots + [None])[1]))

    @property
    def variables(self):
        # Own state, the inner optimizer's, then what `shadow_copy` added: a
        # freshly loaded optimizer, built from the trainable variables only,
        # matches the saved one up to that last group.
        extra = self._averaged.extra
        extra_ids = {id(v) for v in extra}
        own = [v for v in self._variables if id(v) not in extra_ids]
        return own + self.inner_optimizer.variables + extra

    # -- training -------------------------------------------------------------

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "ExponentialMovingAverage must be built before `apply` "
                    "is called without `trainable_variables`. Instead, pass "
                    "`trainable_variables` or call `build(variables)` first."
                )
            self.build(trainable_variables)
        self._check_pending("train")
        if self._swapped_in:
            raise ValueError(_SWAPPED_IN)
        self._trained = True
        # A compiled step refuses too, before anything moves: everything
        # that moves waits for the gradients or, as the inner optimizer's
        # `iterations` increment does, for this read of `iterations`.
        before, *grads = _tf.gate(
            self._swapped,
            _SWAPPED_IN,
            [self.inner_optimizer.iterations, *grads],
            small=_packing.WEIGHT_LIMIT,
            bunch=_packing.PACK_LIMIT,
        )
        # Did the inner optimizer really update? One rule covers gradient
        # accumulation (its `iterations` counts real updates only) and an
        # inner LossScaleOptimizer that skips a non-finite step.
        before = ops.copy(before)
        self.inner_optimizer.apply(grads, trainable_variables)
        moved = ops.not_equal(self.inner_optimizer.iterations, before)
        self._update_averages(moved)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        if keras.backend.backend() != "jax":
            return super().stateless_apply(
                optimizer_variables, grads, trainable_variables
            )
        # Nothing may raise here: JAX's `fit` has already taken the model's
        # state out of its variables, and an exception would lose it. The
        # compiled step refuses to train on swapped-in averages by itself.
        if self._averaged.pending is not None:
            warnings.warn(_PENDING.format(len(self._averaged.pending)))
        self._trained = True
        from keras_ema import _jax

        return _jax.stateless_apply(
            self, optimizer_variables, grads, trainable_variables
        )

    def _update_averages(self, moved, entries=None):
        step = ops.add(self._step, ops.cast(moved, self._step.dtype))
        self._step.assign(step)
        self._move_averages(
            self._averaged.entries if entries is None else entries, moved, step
        )

    def _move_averages(self, entries, moved, step):
        """Moves the averages of `entries` for real-update count `step`."""
        since_start = ops.subtract(step, self.start_step)
        n = ops.maximum(ops.subtract(since_start, 1), 0)
        decay = ops.cast(self._schedule(n), "float32")
        averaging = ops.logical_and(moved, ops.greater(since_start, 0))
        if self.update_every > 1:
            decay = ops.power(decay, self.update_every)
            due = ops.equal(ops.mod(since_start, self.update_every), 0)
            averaging = ops.logical_and(averaging, due)
        # Branch-free: a step that must not move uses factor 0, which leaves
        # the average bit-exact, with no conditional per variable. With
        # `update_every`, most steps have nothing to do: on TensorFlow they
        # skip the work under one conditional.
        factor = ops.multiply(ops.cast(averaging, "float32"), 1.0 - decay)
        fn, args, busy = _averages.move, (factor,), averaging
        if self.start_step:
            copying = ops.logical_and(moved, ops.less_equal(since_start, 0))
            fn, args = _averages.move_or_copy, (factor, copying)
            busy = ops.logical_or(averaging, copying)
        when = busy if self.update_every > 1 else None
        _averages.for_each(self, entries, fn, *args, when=when)

    # -- swapping -------------------------------------------------------------

    def swap_weights(self):
        """Exchanges the averaged variables with their averages, exactly.

        Swapping twice restores every bit of weights and averages. Works
        eagerly and inside a `tf.function`. Prefer `averaged_weights()`,
        which swaps back for you.
        """
        self._check_ready("swap_weights")
        swapped = ops.copy(self._swapped)
        _averages.for_each(
            self, self._averaged.entries, _averages.swap, swapped
        )
        self._swapped.assign(ops.subtract(1, swapped))
        if _tf.executing_eagerly():
            # Traced, this line would run once per trace, not once per swap;
            # an eager `strategy.run` runs it once per replica: set, not flip.
            self._swapped_in = not bool(ops.convert_to_numpy(swapped))

    @property
    def averages_swapped_in(self):
        """Whether the model holds the averages right now (after a swap)."""
        if not self.built:
            return False
        self._swapped_in = bool(ops.convert_to_numpy(self._swapped))
        return self._swapped_in

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
            # Something inside the block may have swapped back already.
            if self.averages_swapped_in:
                self.swap_weights()

    def assign_average_vars(self, var_list):
        """Overwrites each variable of `var_list` with its average.

        Unlike `swap_weights`, the variables' current values are lost.
        Non-trainable variables with an average are set too.

        Args:
            var_list: Variables that have an average, e.g.
                `model.trainable_variables`.
        """
        self._check_ready("assign_average_vars")
        if _tf.executing_eagerly() and self.averages_swapped_in:
            raise ValueError(_ASSIGN_SWAPPED)
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
        entries = [
            self._averaged.entries[self._averaged.index[self._var_key(v)]]
            for v in var_list
        ]
        with self._not_swapped_in(_ASSIGN_SWAPPED):
            _averages.for_each(self, entries, _averages.assign)

    def _not_swapped_in(self, message=_SWAPPED_IN):
        """Context for an update: it fails, before anything moves, while the
        averages are swapped in."""
        if self._swapped_in:
            raise ValueError(message)
        return _tf.check_zero(self._swapped, message)

    def _check_pending(self, what):
        if self._averaged.pending is not None:
            raise ValueError(
                f"`{what}` cannot run yet: "
                + _PENDING.format(len(self._averaged.pending))
            )

    def _check_ready(self, what):
        self._check_pending(what)
        if not self.has_shadow_copy:
            raise ValueError(
                f"`{what}` needs averages, but none exist yet. Instead, call "
                "`optimizer.shadow_copy(model)` or train for a step first."
            )

    # -- forwarding to the inner optimizer ------------------------------------

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

    def _saved_variables(self):
        """`variables` with each pack replaced by its averages, in the order
        of the unpacked layout: a file holds one entry per average."""
        averaged = self._averaged
        extra_ids = {id(v) for v in averaged.extra}
        slots = [
            s for _, average, backup in averaged.entries
            for s in (average, backup)
            if s is not None and id(s) not in extra_ids
        ]
        stored = {id(s) for s in slots} | extra_ids | {
            id(p.buffer) for p in averaged.packs
        }
        own = [v for v in self._variables if id(v) not in stored]
        return own + slots + self.inner_optimizer.variables + averaged.extra

    def save_own_variables(self, store):
        for i, variable in enumerate(self._saved_variables()):
            store[str(i)] = variable.numpy()

    def load_own_variables(self, store):
        values = [store[str(i)][...] for i in range(len(store.keys()))]
        if self.built:
            self._restore(values)
        else:
            # Keras' own optimizers skip loading with a warning here; these
            # values wait for `build` instead.
            self._averaged.deferred = values

    def _restore(self, values):
        variables = self._saved_variables()
        extra = len(values) - len(variables)
        if extra < 0 or (extra and self._averaged.extra):
            raise ValueError(
                f"Cannot load the saved ExponentialMovingAverage: it holds "
                f"{len(values)} variables where this one holds "
                f"{len(variables)}. Instead, load into an optimizer built for "
                "the same model, with the same `trainable_weights_only` and "
                "`exclude`."
            )
        _packing.assign_all(variables, values[: len(variables)])
        if extra:
            # Averages of non-trainable variables: the model variables they
            # belong to are unknown here; `shadow_copy(model)` attaches them.
            self._averaged.pending = values[len(variables):]
        self._swapped_in = bool(ops.convert_to_numpy(self._swapped))

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
            "update_every": self.update_every,
            "average_dtype": self.average_dtype,
            "exclude": [p.pattern for p in self.exclude],
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


def find_in_model(model, user):
    """The model's `ExponentialMovingAverage`, also when it is wrapped.

    Under mixed_float16, `compile()` wraps it in a `LossScaleOptimizer`;
    `user` names the caller in the error raised when there is none.
    """
    optimizer = getattr(model, "optimizer", None)
    found = optimizer
    while found is not None and not isinstance(found, ExponentialMovingAverage):
        found = getattr(found, "inner_optimizer", None)
    if found is None:
        raise ValueError(
            f"{user} does not support a model whose optimizer keeps no "
            f"averages. Received: optimizer={optimizer!r}. Instead, compile "
            "the model with `keras_ema.ExponentialMovingAverage(optimizer)`."
        )
    return found


def _paths(variables):
    return ", ".join(v.path for v in variables)
