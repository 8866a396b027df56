"""The per-variable work: moving, swapping, starting and assigning averages.

Each averaged model variable has an entry `(weight, average, backup)`. The
average is float32 for float16/bfloat16 weights; such entries also keep a
`backup` of the weight's dtype that holds the raw weight while the averages
are swapped in, so that a swap never rounds the average. The functions
`move`, `move_or_copy`, `swap`, `start` and `assign` take one entry's
variables (per device under `tf.distribute`); `for_each` runs one of them
for many entries through the backend's road, once per pack for packed
averages (`_packing.py`). With `compensated`, the moves are
`move_compensated` and `move_compensated_or_copy`, whose third variable is
the average's compensation buffer instead of the backup (which no move
reads): `move_entries` gives the entries so. With a `schedules.BEMA` decay,
the moves are `bema.move`, whose third variable is the average's companion
`[ema, theta_0]`, and `start_averages` starts the companions too.
"""

from keras import ops

from keras_ema import _decay_variables
from keras_ema import _packing
from keras_ema import bema


def update_averages(state, moved, entries=None, joins=None):
    """Counts a (possibly skipped) real update and moves the averages.

    `joins` (a dict) shares the joined weights of a pack between the
    averages of a chain (`PostHocEMA`'s profiles), which pack alike.
    """
    step = ops.add(state.step, ops.cast(moved, state.step.dtype))
    state.step.assign(step)
    if entries is None:
        entries = state.entries
    move_averages(state, entries, moved, step, joins)


def move_averages(state, entries, moved, step, joins=None):
    """Moves the averages of `entries` for real-update count `step`."""
    since_start = ops.subtract(step, state.start_step)
    averaging = ops.logical_and(moved, ops.greater(since_start, 0))
    if state.update_every > 1:
        due = ops.equal(ops.mod(since_start, state.update_every), 0)
        averaging = ops.logical_and(averaging, due)
    copying, busy = None, averaging
    if state.start_step:
        copying = ops.logical_and(moved, ops.less_equal(since_start, 0))
        busy = ops.logical_or(averaging, copying)
    # With `update_every`, most steps have nothing to do: where the road
    # can, it skips the work under one conditional.
    when = busy if state.update_every > 1 else None
    if state.bias_corrected:
        # `t`: the real updates since averaging started; where nothing
        # averages, any `t >= 1` (the selects in `bema.move` drop it).
        beta, alpha = _decay_variables.bias_correction_at(
            state, ops.maximum(since_start, 1)
        )
        for_each(state, move_entries(state, entries), bema.move, beta, alpha,
                 averaging, copying, when=when, joins=joins)
        return
    n = ops.maximum(ops.subtract(since_start, 1), 0)
    complement = _decay_variables.complement_at(state, n)
    # Branch-free: a step that must not move uses factor 0, which leaves
    # the average bit-exact, with no conditional per variable.
    factor = ops.multiply(ops.cast(averaging, "float32"), complement)
    fn, args = move, (factor,)
    if copying is not None:
        fn, args = move_or_copy, (factor, copying)
    if state.compensated:
        fn = move_compensated if fn is move else move_compensated_or_copy
        entries = move_entries(state, entries)
    for_each(state, entries, fn, *args, when=when, joins=joins)


def start_averages(state, entries):
    """Sets the averages of `entries` to their weights (with BEMA, their
    companions too): where averages start."""
    if state.bias_corrected:
        for_each(state, move_entries(state, entries), bema.start)
    else:
        for_each(state, entries, start)


def move_entries(state, entries):
    """`entries` with each average's second buffer in place of the backup:
    its compensation buffer (or None, for a packed one: its pack's), or its
    BEMA companion; made once per list (the torch road keeps its grouping
    while the list stays the same)."""
    made = state.move_entries
    if made is None or made[0] is not entries or made[1] != len(entries):
        buffers = state.companions if state.bias_corrected else (
            state.compensation
        )
        made = state.move_entries = (entries, len(entries), [
            (weight, average, buffers.get(id(average)))
            for weight, average, _ in entries
        ])
    return made[2]


def for_each(state, entries, fn, *args, when=None, joins=None):
    """Calls `fn(average, weight, backup, *args)` for each entry.

    Given a boolean `when`, the road may skip the work where it is false
    (TensorFlow under one conditional, torch by reading it); JAX ignores it
    (XLA's conditional copies the buffers it passes through, which costs
    more than the update it skips): `fn` and `args` must then be a no-op.
    """
    packs = []
    if state.packs:
        entries, packs = split_packed(entries)
    state.road.for_each(state, entries, packs, fn, args, when, joins)


def split_packed(entries):
    """The unpacked entries, and `(pack, indices)` for the packed ones."""
    unpacked, packs = [], {}
    for entry in entries:
        average = entry[1]
        if isinstance(average, _packing.PackedAverage):
            pack = average.pack
            packs.setdefault(id(pack), (pack, []))[1].append(average.index)
        else:
            unpacked.append(entry)
    return unpacked, list(packs.values())


def run_packed(fn, pack, chosen, joins, buffer, weights, compensation,
               *args):
    """`fn` for the entries of `pack` with indices in `chosen`, at once;
    `compensation` is the pack's (per device, as `buffer` and `weights`)."""
    if fn is assign:
        _packing.assign(pack, buffer, weights, chosen)
        return
    # Moves and swaps get every average of the pack.
    if fn is swap:
        _packing.swap(pack, buffer, weights, args[1])
        return
    fn(buffer, pack.join_once(weights, joins), compensation, *args)


def path(variable):
    """A variable's `path`; a plain `tf.Variable` has its `name` only."""
    return getattr(variable, "path", None) or variable.name


def paths(variables):
    """The paths of `variables`, for error messages."""
    return ", ".join(path(v) for v in variables)


def describe(variables, limit=3):
    """The first paths of `variables`, for error messages."""
    variables = list(variables)
    more = ", ..." if len(variables) > limit else ""
    return paths(variables[:limit]) + more


def move(average, weight, backup, factor):
    """`average -= factor * (average - weight)`, in the average's dtype."""
    delta = ops.subtract(average, ops.cast(weight, average.dtype))
    average.assign_sub(ops.multiply(ops.cast(factor, average.dtype), delta))


def move_or_copy(average, weight, backup, factor, copying):
    """`move`, or a real copy of the weight where `copying` is true."""
    # `a - 1 * (a - w)` is not always `w`, so a copy is a real assignment.
    weight = ops.cast(weight, average.dtype)
    delta = ops.subtract(average, weight)
    moved = ops.subtract(
        average, ops.multiply(ops.cast(factor, average.dtype), delta)
    )
    average.assign(ops.where(copying, weight, moved))


def move_compensated(average, weight, compensation, factor):
    """`move`, exact to the float32 rounding of the average itself.

    Each update adds a small step to a large average and float32 keeps
    only the step's leading digits: over 10**6 updates those roundings
    drift the average (see the performance guide). Here the average is
    the pair `average + compensation`, and each update adds to the pair,
    keeping the part of it the average's rounding lost in `compensation`
    (Knuth's TwoSum, branch-free and exact for any magnitudes). A step
    that must not move (factor 0) leaves both bit-exact.
    """
    new, error = _compensated_move(average, weight, compensation, factor)
    average.assign(new)
    compensation.assign(error)


def move_compensated_or_copy(average, weight, compensation, factor, copying):
    """`move_compensated`, or a real copy of the weight (and no error left)
    where `copying` is true."""
    new, error = _compensated_move(average, weight, compensation, factor)
    weight = ops.cast(weight, average.dtype)
    average.assign(ops.where(copying, weight, new))
    compensation.assign(ops.where(copying, ops.zeros_like(error), error))


def _compensated_move(average, weight, compensation, factor):
    """The pair `(average, compensation)` moved by `factor` towards
    `weight`, as its new two parts."""
    a = ops.convert_to_tensor(average)
    c = ops.convert_to_tensor(compensation)
    factor = ops.cast(factor, a.dtype)
    # Where nothing moves, the error is kept aside as it is: adding it to
    # the average could round differently, by an ulp, and move the average.
    moving = ops.cast(ops.not_equal(factor, 0), a.dtype)
    delta = ops.add(ops.subtract(a, ops.cast(weight, a.dtype)), c)
    y = ops.subtract(ops.multiply(c, moving), ops.multiply(factor, delta))
    new = ops.add(a, y)
    # TwoSum: `a + y - new`, exactly. XLA and grappler keep floating-point
    # operations in order, which this needs (tests/test_long_runs.py).
    y_part = ops.subtract(new, a)
    a_part = ops.subtract(new, y_part)
    error = ops.add(ops.subtract(a, a_part), ops.subtract(y, y_part))
    return new, ops.add(error, ops.multiply(c, ops.subtract(1, moving)))


def swap(average, weight, backup, swapped_in, is_lost):
    """Exchanges weight and average exactly; `swapped_in` is the state before.

    Never `a += b; b = a - b; a -= b`: that arithmetic loses bits. An
    explicit copy, because on torch a same-dtype cast aliases storage.
    `is_lost(weight)`: whether a failed JAX step consumed the weight's
    buffer (the road's `is_lost`).
    """
    raw = weight
    if is_lost(weight):
        # A compiled JAX step that failed consumed the buffer of the average
        # swapped into the model: that average is lost, and restarts from
        # the raw weight, which waits in the slot.
        raw = average if backup is None else backup
    raw = ops.copy(raw)
    if backup is None:
        weight.assign(average)
        average.assign(raw)
        return
    # Casting the float32 average into the weight would round it: the average
    # stays, and the raw weight waits in `backup` until the swap back.
    going_in = ops.equal(swapped_in, 0)
    held = ops.convert_to_tensor(backup)
    weight.assign(ops.where(going_in, ops.cast(average, weight.dtype), held))
    backup.assign(ops.where(going_in, raw, held))


def start(average, weight, backup):
    """Sets the average to the weight: where every average starts."""
    average.assign(ops.copy(ops.cast(weight, average.dtype)))


def assign(average, weight, backup):
    """Overwrites the weight with its average."""
    # A copy: on JAX a same-dtype cast is the same array, and two variables
    # sharing a buffer break the trainer's buffer donation.
    weight.assign(ops.copy(ops.cast(average, weight.dtype)))
