"""What a file holds of an `ExponentialMovingAverage`, and how it loads.

Keras saves the wrapped optimizer by itself, as this optimizer's
`inner_optimizer` child, so this optimizer's own store holds, once each: its
own variables (step count, swap flag, decay), then one entry per average in
the unpacked order (a pack's averages one by one, so packed and unpacked
optimizers, and all backends, read each other's files), then a `layout`
entry: the name of each own variable and, for each average, which variable
it belongs to (its `position` among the variables the optimizer was built
with, or, for an average of a non-trainable variable, among the model's
non-trainable variables), its role (average or raw backup), shape, dtype and
the variable's `path` (to name it), and the settings that chose them.

Loading compares the layout with the optimizer's before it writes anything:
a file whose averages belong to other variables (another model, another
`exclude` or `trainable_weights_only`) is refused with the difference named,
and no average lands in another weight's slot. Paths are not compared: a
second model of the same architecture, whose layers got other automatic
names, loads the file. A file saved before the averages existed (compiled,
not trained) holds none: loading it starts the averages from the weights, as
the first step would have. An optimizer that is not built yet keeps the
values, and its inner optimizer's, until it is. Averages of non-trainable
variables come last; a freshly loaded optimizer, built from the trainable
variables only, keeps them "pending" until `shadow_copy(model)` names their
variables.
"""

import json
import warnings

import keras
import numpy as np
from keras import ops

from keras_ema import _binding
from keras_ema import _decay_variables
from keras_ema import _packing
from keras_ema import _slots
from keras_ema import _update

_LAYOUT = "layout"
_PENDING = (
    "the loaded optimizer holds {} saved averages of non-trainable variables "
    "that are not attached to the model. Instead, call "
    "`optimizer.shadow_copy(model)` once after loading."
)


def save(state, store):
    """Writes the values and the layout into a Keras store."""
    variables, layout = _saved(state)
    for i, variable in enumerate(variables):
        store[str(i)] = ops.convert_to_numpy(variable)
    store[_LAYOUT] = np.frombuffer(json.dumps(layout).encode(), "uint8")


def load(state, store):
    keys = set(store.keys())
    if not keys:
        # A file without an optimizer (weights saved from a model that was
        # not compiled): Keras' own optimizers skip it with a warning.
        warnings.warn(
            "keras-ema: this file holds no optimizer state; the averages "
            "stay as they are (before the first update, `fit` starts them "
            "from the weights just loaded)."
        )
        return
    if _LAYOUT not in keys:
        raise ValueError(
            "ExponentialMovingAverage cannot load this file: it holds no "
            "layout of the averages (it was written by another optimizer, or "
            "by keras-ema before 0.2). Instead, load it into the optimizer "
            "that saved it, or train again from the model's weights."
        )
    layout = json.loads(bytes(np.asarray(store[_LAYOUT])).decode())
    values = [np.asarray(store[str(i)]) for i in range(len(keys) - 1)]
    if state.built and not state.todo:
        try:
            _restore(state, layout, values)
        except ValueError:
            # Keras goes on loading the other objects of the file after an
            # error: the inner optimizer's state must not land either.
            _binding.hand_next_load(state.inner, lambda values: None)
            raise
        return
    # Keras' own optimizers skip loading with a warning here; these values
    # wait for `build` instead, and so do the inner optimizer's, which Keras
    # loads right after this (a parent's store before its children's).
    state.deferred = (layout, values)
    if not state.inner.built:
        _binding.hand_next_load(
            state.inner, lambda values: setattr(state, "deferred_inner", values)
        )


def restore_deferred(state):
    """Loads the values read before the optimizer was built, its inner
    optimizer's too, once their variables have values; checks the layout
    of a checkpoint restored before the averages existed."""
    if state.checkpoint_layout is not None and not state.todo:
        with state.road.eager_scope():
            check_checkpoint(state)
    inner, state.deferred_inner = state.deferred_inner, None
    deferred, state.deferred = state.deferred, None
    with state.road.eager_scope():
        # Ours first: it checks the layout before anything is written.
        if deferred is not None:
            _restore(state, *deferred)
        if inner is not None:
            state.inner.load_own_variables(_Store(inner))


def take_pending(state, new, model):
    """The saved values for the new averages of `new`, the model's
    non-trainable variables, checked against them, or None."""
    pending = state.pending
    if pending is None:
        return None
    layouts, values = pending
    wanted = [
        _entry(v, dtype, role, True, _position(model.non_trainable_variables, v))
        for v in new
        for dtype, role in _slots.slot_roles(state, v)
    ]
    if [_key(e, _identity(layouts)) for e in wanted] != [
        _key(e, _identity(layouts)) for e in layouts
    ]:
        raise ValueError(
            f"The loaded optimizer holds {len(values)} saved averages of "
            f"non-trainable variables ({_describe(layouts)}) that do not match "
            f"the variables without an average ({_describe(wanted)}). "
            "Instead, call `shadow_copy` with the model that was saved "
            "together with this optimizer."
        )
    state.pending = None
    return iter(values)


def check_no_pending(state, what):
    if state.pending is not None:
        raise ValueError(
            f"`{what}` cannot run yet: " + _PENDING.format(len(state.pending[1]))
        )


def warn_pending(state):
    if state.pending is not None:
        warnings.warn(_PENDING.format(len(state.pending[1])))


class _Store:
    """The values of a store, read back: what `load_own_variables` takes."""

    def __init__(self, values):
        self.values = values

    def keys(self):
        return [str(i) for i in range(len(self.values))]

    def __getitem__(self, key):
        return self.values[int(key)]


def _saved(state):
    """The variables a file holds, in order, and their layout."""
    extra_ids = {id(v) for v in state.extra}
    stored = extra_ids | {id(p.buffer) for p in state.packs}
    non_trainable = _non_trainable(state)
    slots, extra = [], []
    for weight, average, backup in state.entries:
        companion = state.companions.get(id(average))
        for slot, role in ((average, "average"), (backup, "raw"),
                           (companion, "bema")):
            if slot is None:
                continue
            stored.add(id(slot))
            if id(slot) in extra_ids:
                position = _position(non_trainable, weight)
                extra.append((slot, _entry(weight, slot.dtype, role, True,
                                           position)))
            else:
                position = _position(state.built_for, weight)
                slots.append((slot, _entry(weight, slot.dtype, role, False,
                                           position)))
    own = [v for v in state.own_variables if id(v) not in stored]
    layout = {
        "built": state.built and not state.todo,
        "own": [v.name for v in own],
        "averages": [e for _, e in slots] + [e for _, e in extra],
        "trainable_weights_only": state.trainable_weights_only,
        "exclude": [p.pattern for p in state.exclude],
        "bias_corrected": state.bias_corrected,
    }
    variables = own + [s for s, _ in slots] + [s for s, _ in extra]
    if state.pending is not None:
        layouts, values = state.pending
        layout["averages"] += layouts
        variables += values
    return variables, layout


def _restore(state, layout, values):
    own_names = layout["own"]
    own_values = dict(zip(own_names, values))
    values = values[len(own_names):]
    current, current_layout = _saved(state)
    own = current[: len(current_layout["own"])]
    if not layout["built"]:
        # Saved before the averages existed: they start from the weights.
        _assign_own(own, own_values)
        _update.start_averages(state, state.entries)
        return
    saved, saved_extra, mine_extra = _check(state, layout, current_layout)
    slots = current[len(own):]
    main_values = values[: len(saved)]
    extra_values = values[len(saved):]
    _assign_own(own, own_values)
    _packing.assign_all(slots[: len(saved)], main_values)
    if mine_extra:
        _packing.assign_all(slots[len(saved):], extra_values)
    elif saved_extra:
        state.pending = (saved_extra, extra_values)
    state.swapped_in = bool(ops.convert_to_numpy(state.swapped))
    _decay_variables.sync_from_variables(state)


def _check(state, layout, current_layout):
    """Raises, naming them, unless the saved averages belong to the same
    variables as this optimizer's; returns the saved entries, the saved
    ones of non-trainable variables, and this optimizer's of those."""
    saved = [e for e in layout["averages"] if not e["extra"]]
    saved_extra = [e for e in layout["averages"] if e["extra"]]
    mine = [e for e in current_layout["averages"] if not e["extra"]]
    mine_extra = [e for e in current_layout["averages"] if e["extra"]]
    _compare(layout, current_layout, saved, mine, state.built_for)
    if saved_extra and state.trainable_weights_only:
        raise ValueError(
            "ExponentialMovingAverage cannot load this file: it holds "
            f"averages of non-trainable variables ({_describe(saved_extra)}), "
            "but this optimizer has `trainable_weights_only=True`. Instead, "
            "load it into an optimizer created with "
            "`trainable_weights_only=False`."
        )
    if mine_extra:
        _compare(layout, current_layout, saved_extra, mine_extra,
                 _non_trainable(state))
    return saved, saved_extra, mine_extra


# -- tf.train.Checkpoint ------------------------------------------------------
# A checkpoint holds the optimizer's variables by their place in its
# variable list, and the layout beside them (`_tf.CheckpointLayout`).
# TensorFlow restores that Python state before it writes any variable.


def layout_of(state):
    """The layout of the averages of `state`, as a file holds it."""
    return _saved(state)[1]


def hold_checkpoint_layout(state, layout):
    """Takes the layout a checkpoint restores: a built optimizer checks it
    now, before the checkpoint writes any variable; one not built yet, once
    it created the averages that take the checkpoint's values."""
    if not layout["built"]:
        return
    state.checkpoint_layout = layout
    if state.built and not state.todo:
        check_checkpoint(state, written=False)


def check_checkpoint(state, written=True):
    """Raises if the held checkpoint layout is not this optimizer's. With
    `written`, TensorFlow already wrote the checkpoint's values into the
    averages as it created them: they start from the weights instead, as
    if nothing was loaded."""
    layout = state.checkpoint_layout
    if layout is None:
        return
    try:
        _, saved_extra, mine_extra = _check(state, layout, layout_of(state))
    except ValueError:
        state.checkpoint_layout = None
        if written:
            _update.start_averages(state, state.entries)
        raise
    if mine_extra or not saved_extra:
        # Else the averages of non-trainable variables are checked once
        # `shadow_copy` created them.
        state.checkpoint_layout = None


def _assign_own(own, values):
    for variable in own:
        if variable.name in values:
            variable.assign(values[variable.name])


def _identity(saved):
    """Whether the saved entries say which variable each belongs to (files
    of keras-ema 0.2 give shapes only)."""
    return all("position" in e for e in saved)


def _key(entry, identity):
    key = (tuple(entry["shape"]), entry["dtype"], entry["role"])
    return (entry["position"], *key) if identity else key


def _compare(layout, current_layout, saved, mine, variables):
    """Raises, naming the variables, unless the saved averages belong to
    the same variables (`variables`: what positions refer to) as `mine`."""
    identity = _identity(saved)
    if [_key(e, identity) for e in saved] == [_key(e, identity) for e in mine]:
        return
    settings = ""
    for name in ("exclude", "trainable_weights_only", "bias_corrected"):
        # Files of keras-ema before 0.4 hold no BEMA companions.
        saved_value = layout.get(name, False if name == "bias_corrected" else None)
        if saved_value != current_layout[name]:
            settings += (
                f" The file was saved with {name}={saved_value!r}, this "
                f"optimizer has {name}={current_layout[name]!r}."
            )
    if identity:
        differs = _differences(saved, mine, variables)
    else:
        first = next(
            (i for i, (a, b) in enumerate(zip(saved, mine))
             if _key(a, False) != _key(b, False)),
            min(len(saved), len(mine)),
        )
        differs = (
            f"they differ from entry {first} on (file: "
            f"{_describe(saved[first:first + 3]) or 'none'}; this optimizer: "
            f"{_describe(mine[first:first + 3]) or 'none'})"
        )
    raise ValueError(
        "ExponentialMovingAverage cannot load this file: its averages are "
        f"not those of this optimizer. The file holds {len(saved)} averages, "
        f"this optimizer {len(mine)}; {differs}.{settings} Instead, load it "
        "into an optimizer compiled for the same model, with the same "
        "`trainable_weights_only` and `exclude`."
    )


def _differences(saved, mine, variables):
    """Which variables have averages in the file only, or here only."""
    def named(entries):
        return {e["position"]: e for e in entries}

    in_file, here = named(saved), named(mine)
    def only(ones, others, text):
        keys = sorted(set(ones) - set(others))
        names = ", ".join(_name(ones[p], variables) for p in keys[:3])
        return [text.format(names + ", ..." * (len(keys) > 3))] if keys else []

    parts = only(in_file, here, "the file averages {}, which this optimizer "
                 "does not") + only(here, in_file, "this optimizer averages "
                                    "{}, which the file does not")
    if not parts:
        changed = [p for p in here if _key(here[p], True) != _key(in_file[p], True)]
        parts.append("they differ in shape, dtype or backup for " + ", ".join(
            f"{_name(here[p], variables)} (file: {_describe([in_file[p]])}; "
            f"this optimizer: {_describe([here[p]])})" for p in changed[:3]
        ))
    return "; ".join(parts)


def _name(entry, variables):
    """A saved entry's variable: its path here (and in the file if other)."""
    position = entry["position"]
    if 0 <= position < len(variables):
        here = _update.path(variables[position])
        if here != entry["path"]:
            return f"{here} (saved as {entry['path']})"
        return here
    return entry["path"]


def _entry(weight, dtype, role, extra, position):
    return {
        "path": _update.path(weight),
        "position": position,
        "shape": [int(d) for d in weight.shape],
        "dtype": keras.backend.standardize_dtype(dtype),
        "role": role,
        "extra": extra,
    }


def _non_trainable(state):
    """The bound model's non-trainable variables, which the positions of the
    averages of non-trainable variables refer to."""
    model = state.bound_model()
    return [] if model is None else model.non_trainable_variables


def _position(variables, variable):
    for i, v in enumerate(variables):
        if v is variable:
            return i
    return -1


def _describe(entries):
    return ", ".join(
        f"{e['path']} {tuple(e['shape'])} {e['dtype']}" for e in entries
    )
