"""What a file holds of an `ExponentialMovingAverage`, and how it loads.

Keras saves the wrapped optimizer by itself, as this optimizer's
`inner_optimizer` child, so this optimizer's own store holds, once each: its
own variables (step count, swap flag, decay), then one entry per average in
the unpacked order (a pack's averages one by one, so packed and unpacked
optimizers, and all backends, read each other's files), then a `layout`
entry: the name of each own variable and, for each average, the path, shape
and dtype of its weight, and the settings that chose them.

Loading compares the layout with the optimizer's before it writes anything:
a file saved for another model, with another `exclude` or
`trainable_weights_only`, is refused with the difference named, and no
average lands in another weight's slot. A file saved before the averages
existed (compiled, not trained) holds none: loading it starts the averages
from the weights, as the first step would have. An optimizer that is not
built yet keeps the values, and its inner optimizer's, until it is.
Averages of non-trainable variables come last; a freshly loaded optimizer,
built from the trainable variables only, keeps them "pending" until
`shadow_copy(model)` names their variables.
"""

import json
import warnings

import keras
import numpy as np
from keras import ops

from keras_ema import _averages
from keras_ema import _creating
from keras_ema import _packing
from keras_ema import schedules

_LAYOUT = "layout"
_PENDING = (
    "the loaded optimizer holds {} saved averages of non-trainable variables "
    "that are not attached to the model. Instead, call "
    "`optimizer.shadow_copy(model)` once after loading."
)


def save(optimizer, store):
    variables, layout = _saved(optimizer)
    for i, variable in enumerate(variables):
        store[str(i)] = ops.convert_to_numpy(variable)
    store[_LAYOUT] = np.frombuffer(json.dumps(layout).encode(), "uint8")


def load(optimizer, store):
    keys = set(store.keys())
    if _LAYOUT not in keys:
        raise ValueError(
            "ExponentialMovingAverage cannot load this file: it holds no "
            "layout of the averages (it was written by another optimizer, or "
            "by keras-ema before 0.2). Instead, load it into the optimizer "
            "that saved it, or train again from the model's weights."
        )
    layout = json.loads(bytes(np.asarray(store[_LAYOUT])).decode())
    values = [np.asarray(store[str(i)]) for i in range(len(keys) - 1)]
    averaged = optimizer._averaged
    if optimizer.built and not averaged.todo:
        try:
            _restore(optimizer, layout, values)
        except ValueError:
            # Keras goes on loading the other objects of the file after an
            # error: the inner optimizer's state must not land either.
            _next_inner_load(optimizer, lambda values: None)
            raise
        return
    # Keras' own optimizers skip loading with a warning here; these values
    # wait for `build` instead, and so do the inner optimizer's, which Keras
    # loads right after this (a parent's store before its children's).
    averaged.deferred = (layout, values)
    if not optimizer.inner_optimizer.built:
        _next_inner_load(
            optimizer, lambda values: setattr(averaged, "deferred_inner", values)
        )


def _next_inner_load(optimizer, take):
    """Hands the inner optimizer's values, the next time Keras loads them,
    to `take` instead of the inner optimizer."""
    inner = optimizer.inner_optimizer

    def load_once(inner_store):
        del inner.load_own_variables
        take([
            np.asarray(inner_store[str(i)])
            for i in range(len(inner_store.keys()))
        ])

    # Keras gives no hook between loading a parent and its children: this
    # instance attribute lasts for the one call Keras makes next.
    inner.load_own_variables = load_once


def restore_deferred(optimizer):
    """Loads the values read before the optimizer was built, its inner
    optimizer's too, once their variables have values."""
    from keras_ema import _tf

    averaged = optimizer._averaged
    inner, averaged.deferred_inner = averaged.deferred_inner, None
    deferred, averaged.deferred = averaged.deferred, None
    with _tf.eager_scope():
        # Ours first: it checks the layout before anything is written.
        if deferred is not None:
            _restore(optimizer, *deferred)
        if inner is not None:
            optimizer.inner_optimizer.load_own_variables(_Store(inner))


def take_pending(optimizer, new):
    """The saved values for the new averages of `new` non-trainable
    variables, checked against them, or None when there are none."""
    averaged = optimizer._averaged
    pending = averaged.pending
    if pending is None:
        return None
    layouts, values = pending
    wanted = [
        (_path(v), list(v.shape), dtype)
        for v in new for dtype in _creating.slot_dtypes(optimizer, v)
    ]
    saved = [(e["path"], e["shape"], e["dtype"]) for e in layouts]
    if [w[1:] for w in wanted] != [s[1:] for s in saved]:
        raise ValueError(
            f"The loaded optimizer holds {len(values)} saved averages of "
            f"non-trainable variables ({_describe(saved)}) that do not match "
            f"the variables without an average ({_describe(wanted)}). "
            "Instead, call `shadow_copy` with the model that was saved "
            "together with this optimizer."
        )
    averaged.pending = None
    return iter(values)


def check_no_pending(optimizer, what):
    pending = optimizer._averaged.pending
    if pending is not None:
        raise ValueError(
            f"`{what}` cannot run yet: " + _PENDING.format(len(pending[1]))
        )


def warn_pending(optimizer):
    pending = optimizer._averaged.pending
    if pending is not None:
        warnings.warn(_PENDING.format(len(pending[1])))


class _Store:
    """The values of a store, read back: what `load_own_variables` takes."""

    def __init__(self, values):
        self.values = values

    def keys(self):
        return [str(i) for i in range(len(self.values))]

    def __getitem__(self, key):
        return self.values[int(key)]


def _saved(optimizer):
    """The variables a file holds, in order, and their layout."""
    averaged = optimizer._averaged
    extra_ids = {id(v) for v in averaged.extra}
    stored = extra_ids | {id(p.buffer) for p in averaged.packs}
    slots, extra = [], []
    for weight, average, backup in averaged.entries:
        for slot, role in ((average, "average"), (backup, "raw")):
            if slot is None:
                continue
            target = extra if id(slot) in extra_ids else slots
            target.append((weight, slot, role))
            stored.add(id(slot))
    own = [v for v in optimizer._variables if id(v) not in stored]
    layout = {
        "built": optimizer.built and not averaged.todo,
        "own": [v.name for v in own],
        "averages": [_entry(w, s, r, False) for w, s, r in slots]
        + [_entry(w, s, r, True) for w, s, r in extra],
        "trainable_weights_only": optimizer.trainable_weights_only,
        "exclude": [p.pattern for p in optimizer.exclude],
    }
    variables = own + [s for _, s, _ in slots] + [s for _, s, _ in extra]
    if averaged.pending is not None:
        layouts, values = averaged.pending
        layout["averages"] += layouts
        variables += values
    return variables, layout


def _restore(optimizer, layout, values):
    own_names = layout["own"]
    own_values = dict(zip(own_names, values))
    values = values[len(own_names):]
    current, current_layout = _saved(optimizer)
    own = current[: len(current_layout["own"])]
    if not layout["built"]:
        # Saved before the averages existed: they start from the weights.
        _assign_own(optimizer, own, own_values)
        _averages.for_each(
            optimizer, optimizer._averaged.entries, _averages.start
        )
        return
    saved = [e for e in layout["averages"] if not e["extra"]]
    saved_extra = [e for e in layout["averages"] if e["extra"]]
    mine = [e for e in current_layout["averages"] if not e["extra"]]
    mine_extra = [e for e in current_layout["averages"] if e["extra"]]
    _compare(layout, current_layout, saved, mine)
    if saved_extra and optimizer.trainable_weights_only:
        raise ValueError(
            "ExponentialMovingAverage cannot load this file: it holds "
            f"averages of non-trainable variables ({_describe_entries(saved_extra)}), "
            "but this optimizer has `trainable_weights_only=True`. Instead, "
            "load it into an optimizer created with "
            "`trainable_weights_only=False`."
        )
    if mine_extra:
        _compare(layout, current_layout, saved_extra, mine_extra)
    slots = current[len(own):]
    main_values = values[: len(saved)]
    extra_values = values[len(saved):]
    _assign_own(optimizer, own, own_values)
    _packing.assign_all(slots[: len(saved)], main_values)
    if mine_extra:
        _packing.assign_all(slots[len(saved):], extra_values)
    elif saved_extra:
        optimizer._averaged.pending = (saved_extra, extra_values)
    optimizer._swapped_in = bool(ops.convert_to_numpy(optimizer._swapped))
    _sync_decay(optimizer)


def _sync_decay(optimizer):
    """The Python decay (what `get_config` saves) from the loaded variables."""
    def number(variable):
        return float(ops.convert_to_numpy(variable))

    if optimizer._schedule is None:
        decay = number(optimizer._decay)
        if np.float32(optimizer._average_decay) != np.float32(decay):
            optimizer.__dict__["_average_decay"] = decay
        return
    held = optimizer.__dict__.get("_schedule_values")
    schedule = optimizer._schedule
    loaded = {k: number(v) for k, v in (held or {}).items()}
    # Values that float32 holds as they were keep their Python spelling.
    changed = {
        k: v for k, v in loaded.items()
        if np.float32(getattr(schedule, k)) != np.float32(v)
    }
    if changed:
        schedule = schedules.with_values(schedule, changed)
        optimizer.__dict__["_schedule"] = schedule
        optimizer.__dict__["_average_decay"] = schedule


def _assign_own(optimizer, own, values):
    for variable in own:
        if variable.name in values:
            variable.assign(values[variable.name])


def _compare(layout, current_layout, saved, mine):
    def key(e):
        return (tuple(e["shape"]), e["dtype"], e["role"])

    if [key(e) for e in saved] == [key(e) for e in mine]:
        return
    settings = ""
    for name in ("exclude", "trainable_weights_only"):
        if layout.get(name) != current_layout[name]:
            settings += (
                f" The file was saved with {name}={layout.get(name)!r}, this "
                f"optimizer has {name}={current_layout[name]!r}."
            )
    first = next(
        (i for i, (a, b) in enumerate(zip(saved, mine)) if key(a) != key(b)),
        min(len(saved), len(mine)),
    )
    raise ValueError(
        "ExponentialMovingAverage cannot load this file: its averages are "
        f"not those of this optimizer. The file holds {len(saved)} averages, "
        f"this optimizer {len(mine)}; they differ from entry {first} on "
        f"(file: {_describe_entries(saved[first:first + 3]) or 'none'}; "
        f"this optimizer: {_describe_entries(mine[first:first + 3]) or 'none'})."
        f"{settings} Instead, load it into an optimizer compiled for the same "
        "model, with the same `trainable_weights_only` and `exclude`."
    )


def _entry(weight, slot, role, extra):
    return {
        "path": _path(weight),
        "shape": [int(d) for d in weight.shape],
        "dtype": keras.backend.standardize_dtype(slot.dtype),
        "role": role,
        "extra": extra,
    }


def _describe_entries(entries):
    return _describe([(e["path"], e["shape"], e["dtype"]) for e in entries])


def _describe(items):
    return ", ".join(f"{p} {tuple(s)} {d}" for p, s, d in items)


def _path(variable):
    return _averages.path(variable)


def get_config(optimizer):
    # Not the base optimizer's config: its arguments belong to the inner
    # optimizer.
    average_decay = optimizer.average_decay
    if not schedules._is_real(average_decay):
        average_decay = schedules.serialize(average_decay)
    return {
        "name": optimizer.name,
        "optimizer": keras.saving.serialize_keras_object(
            optimizer.inner_optimizer
        ),
        "trainable_weights_only": optimizer.trainable_weights_only,
        "average_decay": average_decay,
        "start_step": optimizer.start_step,
        "dynamic_decay": optimizer.dynamic_decay,
        "update_every": optimizer.update_every,
        "average_dtype": optimizer.average_dtype,
        "exclude": [p.pattern for p in optimizer.exclude],
    }


def from_config(cls, config, custom_objects=None):
    config = dict(config)  # never mutate the caller's dict
    config["optimizer"] = keras.saving.deserialize_keras_object(
        config["optimizer"], custom_objects=custom_objects
    )
    if isinstance(config.get("average_decay"), dict):
        config["average_decay"] = schedules.deserialize(
            config["average_decay"], custom_objects=custom_objects
        )
    return cls(**config)
