"""`ExponentialMovingAverage`: a Keras 3 optimizer that averages the weights."""

import contextlib
import warnings

import keras
from keras import ops
from keras.src.utils import tracking

from keras_ema import _atomic
from keras_ema import _averages
from keras_ema import _checks
from keras_ema import _creating
from keras_ema import _decay_variables
from keras_ema import _model
from keras_ema import _saving
from keras_ema import _settings
from keras_ema import _stepping
from keras_ema import _swapping
from keras_ema import _tf
from keras_ema import teacher
from keras_ema._model import find_in_model  # noqa: F401 (its old home)

_SWAPPED_IN = _stepping.SWAPPED_IN


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
        name: String, the name of the optimizer.

    `trainable_weights_only`, `start_step`, `dynamic_decay`, `update_every`,
    `average_dtype` and `exclude` can be changed until the averages exist;
    after that, setting them raises.

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
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner
        self.trainable_weights_only = trainable_weights_only
        self.dynamic_decay = dynamic_decay
        self.start_step = start_step
        self.update_every = update_every
        self.average_dtype = average_dtype
        self.exclude = exclude
        self._averaged = _averages.Averaged()
        self._trained = False
        self.average_decay = average_decay
        # Python's view of the swap state, kept by eager swaps and loads, so
        # that `apply` can refuse to train on the averages without reading
        # a device variable every step.
        self._swapped_in = False

    # -- the decay ------------------------------------------------------------

    @property
    def average_decay(self):
        """The decay: a number, or the schedule given at construction."""
        return self._average_decay

    @average_decay.setter
    def average_decay(self, value):
        _decay_variables.set_decay(self, value)

    # -- creating averages ----------------------------------------------------

    @tracking.no_automatic_dependency_tracking
    def build(self, var_list):
        # `strategy.run` calls `apply` in one thread per replica, one after
        # the other until a merge call: building without one (no assignment
        # of a mirrored variable here) lets the first build and the others
        # find it built.
        if not self.built:
            _creating.build(self, list(var_list), super().build)

    def shadow_copy(self, model):
        """Creates the averages of a model's weights, if not done yet.

        `model.fit` creates the averages of the trainable weights by itself.
        Call this after `compile()` and before training to create them
        explicitly, and, when `trainable_weights_only=False`, to also average
        the model's non-trainable float variables (BatchNorm statistics),
        which the optimizer does not see otherwise. A model that is not
        built yet (a `Sequential` without `Input`) gets its averages when
        its weights exist, in its first training step. After loading a file
        saved with averages of non-trainable variables, call it once to
        attach them. Calling it again is harmless.

        Args:
            model: The `keras.Model` (or layer) whose weights to average.
        """
        _checks.check_model(model, "shadow_copy")
        with _tf.strategy_scope(self):
            _model.register_with(self, model)
            if not model.variables:
                return
            if not self.built:
                self.build(model.trainable_variables)
            _creating.add_extra_averages(self, model)
            _creating.start_averages(self)

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
        _creating.start_averages(self)
        i = self._averaged.index.get(self._var_key(variable))
        return None if i is None else self._averaged.entries[i][1]

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
            with _tf.strategy_scope(self):
                self.build(trainable_variables)
        _stepping.apply(self, grads, trainable_variables)

    def stateless_apply(self, optimizer_variables, grads, trainable_variables):
        if keras.backend.backend() != "jax":
            return super().stateless_apply(
                optimizer_variables, grads, trainable_variables
            )
        from keras_ema import _jax

        # Nothing may raise here: JAX's `fit` has already taken the state of
        # the model and of this optimizer out of their variables, and an
        # exception would lose it. A step for another model changes nothing
        # and `fit` raises at its end (`finalize_variable_values`); a step
        # on swapped-in averages refuses by itself.
        foreign = _model.foreign_step(self, optimizer_variables, trainable_variables)
        if foreign is not None:
            return foreign
        for averaging in _model.chain(self):
            _saving.warn_pending(averaging)
            averaging._trained = True
        return _jax.stateless_apply(
            self, optimizer_variables, grads, trainable_variables
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
        _swapping.swap_weights(self)

    @property
    def averages_swapped_in(self):
        """Whether the model holds the averages right now (after a swap)."""
        if not self.built:
            return False
        self._swapped_in = bool(ops.convert_to_numpy(self._swapped))
        return self._swapped_in

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
        _swapping.assign_average_vars(self, var_list)

    def _not_swapped_in(self, message=_SWAPPED_IN):
        """Context for an update: it fails, before anything moves, while the
        averages are swapped in."""
        chain = _model.chain(self)
        if any(averaging._swapped_in for averaging in chain):
            raise ValueError(message)
        if not self.built:
            return contextlib.nullcontext()
        return _tf.check_zero([a._swapped for a in chain], message)

    def _check_ready(self, what):
        _creating.start_averages(self)
        _saving.check_no_pending(self, what)
        if not self.has_shadow_copy:
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
        averages or, through the teacher, the weights.

        Example:

        ```python
        def compute_loss(self, x, y, y_pred, sample_weight=None, training=True):
            teacher = self.optimizer.call_with_averages(self, x, training=False)
            return super().compute_loss(x, y, y_pred, sample_weight) + (
                keras.ops.mean((y_pred - teacher) ** 2))
        ```
        """
        return teacher.call_with_averages(self, model, *args, **kwargs)

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
        # `fit` calls this at its end with its model's weights, also on JAX,
        # where its steps for another model changed nothing.
        _model.check_no_foreign(self)
        if keras.backend.backend() == "jax" and self._swapped_in:
            warnings.warn(
                "keras-ema: this `fit` changed nothing: the averages are "
                "swapped into the model. Instead, call "
                "`optimizer.swap_weights()` first, or pass "
                "`keras_ema.SwapAverageWeights()` to `fit`."
            )
        self.inner_optimizer.finalize_variable_values(var_list)

    # -- saving (`_saving.py`) ------------------------------------------------

    def save_own_variables(self, store):
        _creating.start_averages(self)
        _saving.save(self, store)

    def load_own_variables(self, store):
        _saving.load(self, store)

    def get_config(self):
        return _saving.get_config(self)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return _saving.from_config(cls, config, custom_objects)
