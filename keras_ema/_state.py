"""The Python-side state of one `ExponentialMovingAverage`, in one object.

The optimizer owns one `State`, at `optimizer._ema_state`; the helper modules
receive it (and whatever else they need) as arguments and never import the
optimizer. A plain object, kept out of Keras' attribute tracking: Keras
optimizers track the lists, dicts and variables assigned to their attributes,
and a list of the model's weights kept on the optimizer would turn them into
optimizer variables. `repr(state)` prints a
summary, for debugging.
"""


class State:
    """Everything an `ExponentialMovingAverage` keeps besides its variables'
    values. Created once, in the optimizer's `__init__`."""

    def __init__(self, road, var_key, inner):
        # The backend's road (`_road.py`), chosen once.
        self.road = road
        # The wrapped optimizer (`inner_optimizer`).
        self.inner = inner
        # Whether `build` created the own variables and the averages of the
        # variables it was given.
        self.built = False
        # `optimizer._var_key`: Keras' key of a variable (its `id`, or on
        # TensorFlow the id of the underlying or distributed variable).
        self.var_key = var_key

        # Settings fixed once the averages exist (`_settings.py`).
        self.trainable_weights_only = True
        self.start_step = 0
        self.dynamic_decay = True
        self.update_every = 1
        self.average_dtype = None
        self.exclude = []
        self.compensated = False

        # The decay (`_decay_variables.py`): what the user set (a number or a
        # schedule), the schedule or None for a number, and the variables a
        # compiled step reads them from (created by `build`).
        self.average_decay = None
        self.schedule = None
        self.decay = None
        self.schedule_values = {}

        # Own variables, created by `build`: the real-update count and the
        # swap flag (0: the model holds its weights, 1: its averages).
        self.step = None
        self.swapped = None
        # Every optimizer variable of its own that is not an average (Keras'
        # `iterations` and `learning_rate`, the ones above, the decay's), in
        # creation order: what a file holds before the averages.
        self.own_variables = []
        # The variables `build` was given (the trainable weights).
        self.built_for = []

        # The averages: one entry `(weight, average, backup)` per averaged
        # variable (`_slots.py`), in creation order; `index` maps a
        # variable's key to its entry's position; `packs` are the flat
        # variables of packed averages (`_packing.py`); `extra` the optimizer
        # variables added after `build` (averages of non-trainable
        # variables); `todo` the weights whose averages wait for a value.
        self.entries = []
        self.index = {}
        self.packs = []
        self.extra = []
        self.todo = []
        # With `compensated`: each average's compensation buffer (a packed
        # one's is the pack's, `Pack.compensation`), by the average's `id`,
        # and the entries as the moves take them (`_update.move_entries`).
        self.compensation = {}
        self.move_entries = None
        # With a `schedules.BEMA` decay (fixed by `build`): each average's
        # companion `[ema, theta_0]` (`bema.py`), by the average's `id`.
        self.bias_corrected = False
        self.companions = {}
        # On torch: the entries grouped for the multi-tensor kernels.
        self.torch_groups = None

        # Python's view of the swap flag, kept by eager swaps and loads, so
        # that a step can refuse without reading a device variable.
        self.swapped_in = False
        # Whether a step ran: from then on the decay rule and the set of
        # averages are fixed.
        self.trained = False

        # The model, once told (`_binding.py`): a weak reference.
        self.model = None
        # On JAX: the message of a step that refused to run for the model's
        # fit, raised when the fit ends (`finalize_variable_values`).
        self.refused = None
        # On JAX: `iterations` when the last `fit` ended, to tell a fit that
        # changed nothing from one after which a callback swapped averages in.
        self.iterations_after_fit = None
        # While a guarded step of the model is traced (`_binding.py`): the
        # values in that step of the averages' variables and of the model's
        # (JAX, where a trainer keeps them outside the variables), by `id`;
        # and whether the averages are swapped in for that step (None where
        # only the swap flag's value when the step runs can say). What
        # `call_with_averages` reads.
        self.step_values = None
        self.step_swapped = None
        # On JAX: why a teacher refused the model's train steps (its train
        # function was built before the model was told); cleared by `bind`.
        self.unguarded_teacher = None
        # The model whose first teacher call created the averages.
        self.built_by_teacher = None

        # Loading (`_layout.py`): saved values read before the optimizer was
        # built (`deferred`), its inner optimizer's (`deferred_inner`), and
        # the saved averages of non-trainable variables that wait for
        # `shadow_copy` to name them (`pending`); the layout of a
        # `tf.train.Checkpoint` restored before the averages it fills existed.
        self.deferred = None
        self.deferred_inner = None
        self.pending = None
        self.checkpoint_layout = None

    def bound_model(self):
        """The model this optimizer was told about, if it is still alive."""
        return None if self.model is None else self.model()

    def __repr__(self):
        model = self.bound_model()
        return (
            f"<State averages={len(self.entries)} packs={len(self.packs)} "
            f"extra={len(self.extra)} waiting={len(self.todo)} "
            f"swapped_in={self.swapped_in} trained={self.trained} "
            f"model={None if model is None else model.name!r} "
            f"pending={self.pending is not None} "
            f"deferred={self.deferred is not None}>"
        )


def averaging_chain(optimizer):
    """The averaging optimizers (those with a `State`) in `optimizer`'s chain
    of `inner_optimizer`s, outermost first: under a LossScaleOptimizer, and
    the profiles of a `PostHocEMA` one within the other."""
    found = []
    while optimizer is not None:
        if isinstance(getattr(optimizer, "_ema_state", None), State):
            found.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return found
