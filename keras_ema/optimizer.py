"""`ExponentialMovingAverage`: a Keras 3 optimizer that averages the weights.

The class owns all Python-side state in one `State` (`_state.py`) and hands
it, with what else they need, to the helper modules: which variables get
averages (`_slots.py`), the update math (`_update.py`), the decay
(`_decay_variables.py`), swaps (`_swapping.py`), files (`_layout.py`), the
model it is told about and the wrappers of Keras objects (`_binding.py`).
Each backend's road is one module (`_road.py`, `_tf.py`, `_jax.py`,
`_torch.py`), picked once, in `_road_for_backend` below.
"""

import keras

from keras_ema import _atomic
from keras_ema import _binding
from keras_ema import _checks
from keras_ema import _decay_variables
from keras_ema import _layout
from keras_ema import _settings
from keras_ema import _slots
from keras_ema import _state
from keras_ema import _step
from keras_ema import _swapping
from keras_ema import bema
from keras_ema import teacher


def _road_for_backend():
    """The backend's road: the one place that tells backends apart. Keras'
    LossScaleOptimizer branches in `apply` and `stateless_apply`; this
    optimizer's `apply` and `stateless_apply` call the road picked here."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_ema._tf import TensorFlowRoad as Road
    elif backend == "jax":
        from keras_ema._jax import JaxRoad as Road
    elif backend == "torch":
        from keras_ema._torch import TorchRoad as Road
    else:
        from keras_ema._road import Road
    return Road()


@keras.saving.register_keras_serializable(package="keras_ema")
class ExponentialMovingAverage(_settings.Settings, keras.optimizers.Optimizer):
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
        trainable_weights_only: If `False`, the model's non-trainable float
            variables (BatchNorm statistics) are averaged too: by `fit`, or
            by `shadow_copy(model)` for a custom loop.
        average_decay: Float in `[0, 1]`: the decay, the largest one when
            `dynamic_decay` is on. The average spans about
            `1 / (1 - average_decay)` updates. It can be set at any time,
            like `learning_rate` (e.g. from a callback), and takes effect
            from the next update. Or a schedule (`keras_ema.schedules`, or a
            function `n -> decay`), which then alone decides the decay.
        start_step: Non-negative int. The first `start_step` updates copy
            the weights into the averages instead of averaging.
        dynamic_decay: If `True` (default), a float `average_decay` is capped
            by `(1 + n) / (10 + n)`, so early averages forget fast.
        update_every: Int >= 1. Move the averages only on every
            `update_every`-th real update, with decay `decay ** update_every`
            so that the average spans the same number of updates; `Uniform`
            and `Power` schedules count these averaging updates instead.
        average_dtype: Dtype of the averages. Defaults to float32 for
            float16/bfloat16 weights and to the weight's dtype otherwise.
        exclude: Regular expressions; variables whose `path` matches one
            (`re.search`) get no average and are left alone by swaps.
        compensated: If `True`, each average keeps the rounding error of
            its updates in a second buffer (compensated summation) and stays
            within float32 rounding of the exact average however long the
            run; without, it drifts by 1e-4 to 1e-2 relative over 10**5 to
            10**6 updates of `Uniform`, `Power` or a decay of 0.9999. Costs
            one more buffer per average and a slower averaging update.
        name: String, the name of the optimizer.

    `trainable_weights_only`, `start_step`, `dynamic_decay`, `update_every`,
    `average_dtype`, `exclude` and `compensated` can be changed until the
    averages exist; after that, setting them raises.

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
        compensated=False,
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
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner
        state = _state.State(_road_for_backend(), self._var_key, inner)
        # Keras' own: its `iterations` and `learning_rate` variables, and on
        # TensorFlow the distribution strategy the averages belong to.
        state.own_variables = list(self._variables)
        state.strategy = getattr(self, "_distribution_strategy", None)
        self._ema_state = state
        layout = state.road.checkpoint_layout(state)
        if layout is not None:
            # Tracked as an attribute: a `tf.train.Checkpoint` saves it.
            self._ema_checkpoint_layout = layout
        self.trainable_weights_only = trainable_weights_only
        self.dynamic_decay = dynamic_decay
        self.start_step = start_step
        self.update_every = update_every
        self.average_dtype = average_dtype
        self.exclude = exclude
        self.compensated = compensated
        self.average_decay = average_decay

    # -- the decay ------------------------------------------------------------

    @property
    def average_decay(self):
        """The decay: a number, or the schedule given at construction."""
        return self._ema_state.average_decay

    @average_decay.setter
    def average_decay(self, value):
        _decay_variables.set_decay(self._ema_state, value, self.add_variable)

    # -- creating averages ----------------------------------------------------

    def build(self, var_list):
        # `strategy.run` calls `apply` in one thread per replica, one after
        # the other until a merge call: building without one (no assignment
        # of a mirrored variable here) lets the first build and the others
        # find it built.
        if self.built:
            return
        state = self._ema_state
        var_list = list(var_list)
        bema.check_settings(state.schedule, state.compensated)
        state.bias_corrected = bema.is_bema(state.schedule)
        # Created eagerly, also when `fit` builds the optimizer while tracing
        # its step, so that values loaded before (a file read into an
        # optimizer not built yet) can be restored right away.
        with state.road.eager_scope():
            state.step = self.add_variable(
                shape=(), dtype="int", aggregation="only_first_replica",
                name="average_step",
            )
            state.swapped = self.add_variable(
                shape=(), dtype="int", aggregation="only_first_replica",
                name="averages_swapped_in",
            )
            state.own_variables += [state.step, state.swapped]
            self.inner_optimizer.build(var_list)
        _decay_variables.create(state, self.add_variable)
        super().build(var_list)
        state.built_for = var_list
        state.built = True
        _slots.add_averages(
            state, [v for v in var_list if _slots.should_average(state, v)],
            self.add_variable,
        )
        model = state.bound_model()
        if model is not None:
            _slots.add_extra_averages(
                state, model, self.add_variable, _layout.take_pending
            )
        _step.prepare(state)

    def shadow_copy(self, model):
        """Creates the averages of a model's weights, if not done yet, and
        makes it the optimizer's model.

        `fit` creates the averages of the trainable weights by itself, and
        the keras-ema callbacks call this with their `model`. Call it after
        `compile()`, before training, to create them explicitly and, with
        `trainable_weights_only=False`, to average the model's non-trainable
        float variables (BatchNorm statistics) too; then also after loading
        a file with such averages, to attach them. Knowing its model, the
        optimizer makes a step refused while the averages are swapped in
        move nothing, BatchNorm statistics included. A model not built yet
        gets its averages in its first training step. Calling it again is
        harmless; a model that trains other variables is refused.

        Args:
            model: The `keras.Model` (or layer) compiled with this optimizer.
        """
        _checks.check_model(model, "shadow_copy")
        state = self._ema_state
        with state.road.strategy_scope(state):
            _binding.bind(self, model)
            if not model.variables:
                return
            if not self.built:
                self.build(model.trainable_variables)
            _slots.add_extra_averages(
                state, model, self.add_variable, _layout.take_pending
            )
            _step.prepare(state)

    @property
    def has_shadow_copy(self):
        """Whether averages exist (created by `build` or `shadow_copy`)."""
        return bool(self._ema_state.entries)

    def average(self, variable):
        """Returns the average of `variable`, or `None` if it has none.

        The average is a `keras.Variable`, or, for a small weight whose
        average is stored together with others' (TensorFlow and JAX, see
        README "Speed and memory"), a view of it with the same `value`,
        `numpy()`, `dtype`, `shape` and `assign`, usable in Keras ops and
        `np.asarray`.
        """
        state = self._ema_state
        _step.prepare(state)
        i = state.index.get(state.var_key(variable))
        return None if i is None else state.entries[i][1]

    @property
    def variables(self):
        # Own state, the inner optimizer's, then what `shadow_copy` added: a
        # freshly loaded optimizer, built from the trainable variables only,
        # matches the saved one up to that last group.
        extra = self._ema_state.extra
        extra_ids = {id(v) for v in extra}
        own = [v for v in self._variables if id(v) not in extra_ids]
        return own + self.inner_optimizer.variables + extra

    # -- training: the road of the backend ------------------------------------

    def apply(self, grads, trainable_variables=None):
        state = self._ema_state
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "ExponentialMovingAverage must be built before `apply` "
                    "is called without `trainable_variables`. Instead, pass "
                    "`trainable_variables` or call `build(variables)` first."
                )
            with state.road.strategy_scope(state):
                self.build(trainable_variables)
        chain = _state.averaging_chain(self)
        state.road.apply(
            [o._ema_state for o in chain], chain[-1].inner_optimizer, grads,
            trainable_variables,
        )

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        state = self._ema_state
        if not state.road.stateless:
            return super().stateless_apply(
                optimizer_variables, grads, trainable_variables
            )
        chain = _state.averaging_chain(self)
        for averaging in chain:
            _layout.warn_pending(averaging._ema_state)
            averaging._ema_state.trained = True
        return state.road.stateless_apply(
            [o._ema_state for o in chain], self.variables,
            chain[-1].inner_optimizer, state.built_for,
            optimizer_variables, grads, trainable_variables,
        )

    # -- swapping -------------------------------------------------------------

    def swap_weights(self):
        """Exchanges the averaged variables with their averages, exactly.

        Swapping twice restores every bit of weights and averages. Works
        eagerly and inside a `tf.function`. All or nothing: an exception or
        a Ctrl-C that arrives during the swap takes effect once it is
        complete. Prefer `averaged_weights()`, which swaps back for you.
        """
        self._check_ready("swap_weights")
        # A step refused while the averages are in must find the guard.
        _binding.guard_bound_model(self)
        _swapping.swap_weights(self._ema_state)

    @property
    def averages_swapped_in(self):
        """Whether the model holds the averages right now (after a swap)."""
        return _swapping.swapped_in(self._ema_state)

    def averaged_weights(self):
        """Context manager: the averages are in the model inside the block.

        The training weights come back, bit for bit, when the block ends,
        also when it raises or is interrupted, even while it is entered. If
        the averages are already swapped in, the block leaves them there.

        Example:

        ```python
        with opt.averaged_weights():
            model.evaluate(x_val, y_val)
            model.save("model_ema.keras")
        ```
        """
        self._check_ready("averaged_weights")
        return _atomic.SwappedIn(self)

    def assign_average_vars(self, var_list):
        """Overwrites each variable of `var_list` with its average.

        Unlike `swap_weights`, the variables' current values are lost.
        Non-trainable variables with an average are set too. Variables that
        this optimizer does not average by its settings (non-float ones such
        as a Dropout seed, those matched by `exclude`, non-trainable ones
        under `trainable_weights_only=True`) are skipped, so
        `assign_average_vars(model.variables)` works. All or nothing, as
        `swap_weights`.

        Args:
            var_list: Variables, e.g. `model.variables`.
        """
        self._check_ready("assign_average_vars")
        _swapping.assign_average_vars(self._ema_state, var_list)

    def _check_ready(self, what):
        state = self._ema_state
        _step.prepare(state)
        _layout.check_no_pending(state, what)
        if not state.entries:
            raise ValueError(
                f"`{what}` needs averages, but none exist yet. Instead, call "
                "`optimizer.shadow_copy(model)` or train for a step first."
            )

    def call_with_averages(self, model, *args, **kwargs):
        """Calls `model` with the averages in place of its weights: a teacher.

        For mean teacher, BYOL or DINO: inside a custom `train_step` or
        `compute_loss`, in compiled steps on every backend, or eagerly.
        Averaged BatchNorm statistics are used too. Nothing is swapped or
        copied, no variable is written (BatchNorm updates of a
        `training=True` call are dropped), and no gradient reaches the
        averages or, through the teacher, the weights. A model whose weights
        this optimizer does not average (another model, a clone) is refused.

        Example:

        ```python
        def compute_loss(self, x, y, y_pred, sample_weight=None, training=True):
            teacher = self.optimizer.call_with_averages(self, x, training=False)
            return super().compute_loss(x, y, y_pred, sample_weight) + (
                keras.ops.mean((y_pred - teacher) ** 2))
        ```
        """
        return teacher.call_with_averages(self, model, args, kwargs)

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
        # `fit` calls this at its end with its model's weights.
        self._ema_state.road.end_fit(self._ema_state, var_list, self.iterations)
        self.inner_optimizer.finalize_variable_values(var_list)

    # -- saving (`_layout.py`) ------------------------------------------------

    def save_own_variables(self, store):
        _step.prepare(self._ema_state)
        _layout.save(self._ema_state, store)

    def load_own_variables(self, store):
        _layout.load(self._ema_state, store)

    def get_config(self):
        # Not the base optimizer's config: its arguments belong to the inner
        # optimizer.
        return _settings.get_config(self)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**_settings.from_config(config, custom_objects))
