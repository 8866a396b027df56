"""What every backend's road does, as an eager backend (torch) does it.

`ExponentialMovingAverage` picks its road once, in its one backend switch
(`optimizer._road`): `Road` here for the backends that run eagerly, and the
subclasses in `_tf.py` (traced steps, `tf.distribute`) and `_jax.py` (the
stateless train step) for the others; `_torch.py` adds torch's multi-tensor
kernels. The core modules call the road, never `keras.backend.backend()`.
"""

import contextlib

import keras

from keras_ema import _step
from keras_ema import _update


class Road:
    """The road of an eager backend: no tracing, one device per variable."""

    # Whether the averages of small weights are stored together
    # (`_packing.py`): where a step costs per operation, on TF and JAX.
    packs_averages = False
    # Whether the trainer steps through `stateless_apply` (JAX), which the
    # road then implements; else Keras' own runs `apply` in a scope.
    stateless = False

    # -- where variables are created ------------------------------------------

    def eager_scope(self):
        """Runs its block eagerly, also while a step is being traced."""
        return contextlib.nullcontext()

    def executing_eagerly(self):
        return True

    def initialized(self, variable):
        """Whether `variable` has a value outside the step being traced."""
        return True

    def strategy_scope(self, state):
        """The scope of the distribution strategy the averages belong to."""
        return contextlib.nullcontext()

    def colocate_with(self, state, variable):
        """Creates the variables of the block where `variable` lives."""
        return contextlib.nullcontext()

    def checkpoint_layout(self, state):
        """What a backend's own checkpoint (`tf.train.Checkpoint`) saves to
        say which variables have averages: an object tracked as an
        attribute of the optimizer, or None."""
        return None

    def graph_key(self):
        """What tells apart the graphs a join may be used in (`_packing`)."""
        return None

    # -- a training step ------------------------------------------------------

    def apply(self, states, base, grads, trainable_variables):
        """One step of the chain of averages `states` (outermost first) over
        the optimizer `base`."""
        _step.apply(self, states, base, grads, trainable_variables)

    def gate(self, flags, message, values, never=None):
        """`values`, released once every swap flag in `flags` is checked 0:
        in a traced step (`_tf.py`); eagerly the caller checked already."""
        return values

    def refusing(self, flags, message):
        """Context: in a traced step its ops run once `flags` are checked 0."""
        return contextlib.nullcontext()

    def run_guarded(self, model, states, original, args):
        """`original(*args)`, the model's train step, refused before its
        forward pass moves anything (BatchNorm statistics) while an average
        of `states` is swapped in (`_binding.py` wraps the step with this)."""
        _step.refuse_if_swapped_in(states)
        return original(*args)

    def for_each(self, state, entries, packs, fn, args, when, joins):
        """Calls `fn(average, weight, backup, *args)` for each entry, and
        once per pack (`_update.run_packed`), unless `when` is false."""
        if when is not None and not bool(when):
            return
        for weight, average, backup in entries:
            fn(average, weight, backup, *args)
        for pack, chosen in packs:
            _update.run_packed(fn, pack, chosen, joins, pack.buffer,
                               pack.weights, pack.compensation, *args)

    def end_fit(self, state, var_list, iterations):
        """At the end of a `fit` (`finalize_variable_values`): raises what
        steps that could not raise refused (JAX)."""

    # -- a model's state outside its variables (JAX) ---------------------------

    def is_lost(self, variable):
        """Whether a model variable lost its value (a JAX trainer's error)."""
        return False

    def sync(self, model):
        """Puts back a model's variables that its trainer keeps elsewhere."""

    def reattach(self, model, values=()):
        """`sync`, after an error, with the state given to a failed step."""

    # -- settings the backend limits ------------------------------------------

    def check_float_dtype(self, dtype):
        """Raises if the backend cannot hold averages of `dtype`."""

    def step_count_limit(self):
        """The largest `start_step` or `update_every`, or None."""
        return None

    def is_variable(self, value):
        return isinstance(value, keras.Variable)

