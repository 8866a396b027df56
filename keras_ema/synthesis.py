"""`synthesize`: the power-function EMA of any width, from snapshots (EDM2).

A power-function EMA of exponent `gamma` at time `t` weighs the weights of
time `tau <= t` by `(gamma + 1) / t * (tau / t) ** gamma`. Snapshots of the
tracked EMAs at several times span a space of such profiles; the average of
another width at time `t` is approximated by the combination of snapshots
whose profile is closest to its own in the least-squares sense. Karras et
al. 2024 (EDM2, Algorithm 3, Equation 151) give the inner products of two
profiles in closed form, so the coefficients come from a small linear
system, and the average from one streamed pass over the snapshot files.
"""

import warnings

import numpy as np

from keras_ema import _atomic
from keras_ema import schedules
from keras_ema import snapshots as _snapshots

# The relative residual above which `synthesize` warns that the fit is poor
# (see its docstring for the measurement behind it).
_POOR_FIT = 0.2


def profile_products(t_a, gamma_a, t_b, gamma_b):
    """Inner products of power-function EMA profiles (EDM2, Eq. 151)."""
    t_ratio = t_a / t_b
    t_exp = np.where(t_a < t_b, gamma_b, -gamma_a)
    t_max = np.maximum(t_a, t_b)
    num = (gamma_a + 1) * (gamma_b + 1) * t_ratio ** t_exp
    den = (gamma_a + gamma_b + 1) * t_max
    return num / den


def solve_coefficients(in_t, in_sigma_rel, out_t, out_sigma_rel):
    """The coefficients of the snapshots `(in_t, in_sigma_rel)` whose
    combination best matches the profile `(out_t, out_sigma_rel)`; they sum
    to 1 (EDM2, Algorithm 3)."""
    gamma = np.float64([schedules.sigma_rel_to_gamma(s) for s in in_sigma_rel])
    t = np.float64(in_t)
    out_gamma = schedules.sigma_rel_to_gamma(out_sigma_rel)
    a = profile_products(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    b = profile_products(t, gamma, np.float64(out_t), out_gamma)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / np.sum(x)


def fit_residual(in_t, in_sigma_rel, out_t, out_sigma_rel, coefficients):
    """How far the combination of the snapshot profiles with `coefficients`
    is from the profile `(out_t, out_sigma_rel)`: the L2 norm of their
    difference relative to the norm of the target profile (0: exact)."""
    gamma = np.float64([schedules.sigma_rel_to_gamma(s) for s in in_sigma_rel])
    t = np.float64(in_t)
    out_t = np.float64(out_t)
    out_gamma = schedules.sigma_rel_to_gamma(out_sigma_rel)
    x = np.float64(coefficients)
    a = profile_products(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    b = profile_products(t, gamma, out_t, out_gamma)
    c = profile_products(out_t, out_gamma, out_t, out_gamma)
    return float(np.sqrt(max(c - 2 * x @ b + x @ a @ x, 0.0) / c))


def synthesize(directory, model, sigma_rel, step=None):
    """Writes the post-hoc EMA of `sigma_rel` into `model`, from snapshots.

    Solves EDM2's least-squares problem over the snapshots of `directory`
    (written by `keras_ema.PostHocSnapshots`) taken at or before `step`,
    and overwrites each of `model`'s averaged variables (BatchNorm
    statistics included where they were averaged) with the synthesized
    average of width `sigma_rel` at `step`; the model's other variables are
    left alone. For a tracked `sigma_rel` at a snapshot's step the result is
    that snapshot. The snapshots are read one at a time: memory holds the
    model and one float64 sum of it, whatever their number.

    The folder is checked first: a file named like a snapshot that is not
    one (corrupt, truncated, foreign), or snapshots of another model, of
    other widths or of another training run get an error naming the file.
    A width the snapshots cannot fit well, far outside the tracked ones,
    gets a warning with the fit's relative residual (the norm of the
    difference between the fitted and the requested profile, relative to
    the requested profile's): above 0.2, the synthesized weights were off
    by 15% or more of the average's distance to the raw weights in a
    simulation, at or below it by 7% or less.

    The model's variables are matched by `path`, or, for a model rebuilt in
    another session (whose layer names differ), by their position in
    `model.variables`. All are written at the end, at once: an error or a
    Ctrl-C leaves the model as it was.

    Args:
        directory: The folder of the snapshots.
        model: A `keras.Model` of the architecture that was trained (e.g.
            the trained model itself; save its weights first if they are
            needed: `sweep_sigma_rel` does).
        sigma_rel: Float in (0, 0.2887], the relative width to synthesize.
        step: The update count of one of the snapshots: synthesize the
            average at that time. Defaults to the last one.

    Returns:
        The coefficients used: a list of `(step, sigma_rel, coefficient)`,
        one per snapshot profile.

    Example:

    ```python
    keras_ema.synthesize("snapshots", model, sigma_rel=0.07)
    model.evaluate(x_val, y_val)
    ```
    """
    schedules.Power(sigma_rel=sigma_rel)  # a clear error for a bad width
    _refuse_swapped_in(model)
    found = _snapshots.list_snapshots(directory)
    if not found:
        raise ValueError(
            f"synthesize found no snapshot in {directory!r}. Instead, train "
            "with `keras_ema.PostHocSnapshots(directory, every=...)` first."
        )
    steps = [s for s, _ in found]
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(
            f"synthesize does not support step={step!r}: there is no "
            f"snapshot at that step in {directory!r}. Instead, pass one of "
            f"the snapshot steps, {_describe(steps)}."
        )
    used = [(s, p, _snapshots.read_meta(p)) for s, p in found if s <= step]
    _snapshots.check_series(used, directory)
    out_t = used[-1][2]["t"]
    # Two snapshots with the same `t` (no averaging update between them)
    # hold the same averages: the later one stands for both.
    latest = {meta["t"]: i for i, (_, _, meta) in enumerate(used)}
    inputs = [
        (i, j, t, sigma)
        for t, i in sorted(latest.items()) if t > 0
        for j, sigma in enumerate(used[i][2]["sigma_rels"])
    ]
    if out_t <= 0 or not inputs:
        raise ValueError(
            f"synthesize cannot build an average at step {step}: no "
            "averaging update came before it. Instead, pass a later step."
        )
    in_t, in_sigma = [t for _, _, t, _ in inputs], [s for *_, s in inputs]
    x = solve_coefficients(in_t, in_sigma, out_t, sigma_rel)
    residual = fit_residual(in_t, in_sigma, out_t, sigma_rel, x)
    if residual > _POOR_FIT:
        warnings.warn(
            f"keras-ema: the snapshots fit the average of sigma_rel="
            f"{sigma_rel} poorly (relative residual {residual:.2f}, above "
            f"{_POOR_FIT}): the synthesis may be far from that average. "
            f"They track sigma_rels={used[-1][2]['sigma_rels']}, "
            f"{len(latest)} times. Instead, synthesize widths nearer those, "
            "or track a width near this one, with more snapshots."
        )
    variables = _match(model, used[-1][2]["variables"], used[-1][1])
    totals = [np.zeros(v.shape, "float64") for v in variables]
    by_file = {}
    for (i, j, _, _), c in zip(inputs, x):
        by_file.setdefault(i, []).append((j, c))
    for i, terms in by_file.items():
        _, path, meta = used[i]
        with _snapshots.reading(path), np.load(path, allow_pickle=False) as data:
            for k in range(len(variables)):
                for j, c in terms:
                    totals[k] += c * _snapshots.read_average(data, meta, j, k)
    with _atomic.deferred_signals():
        for variable, total in zip(variables, totals):
            variable.assign(total.astype(variable.dtype))
    return [
        (used[i][0], sigma, float(c))
        for (i, _, _, sigma), c in zip(inputs, x)
    ]


def _match(model, entries, path):
    """The model's variables for the entries of the snapshot `path`."""
    variables = model.variables
    by_path = {v.path: v for v in variables}
    if all(e["path"] in by_path for e in entries):
        chosen = [by_path[e["path"]] for e in entries]
    elif all(e["index"] < len(variables) for e in entries):
        chosen = [variables[e["index"]] for e in entries]
    else:
        chosen = None
    if chosen is None or [list(v.shape) for v in chosen] != [
        e["shape"] for e in entries
    ]:
        raise ValueError(
            "synthesize does not support a model whose variables differ from "
            f"the snapshots' ({path}: {len(entries)} averaged variables, the "
            f"first {entries[0]['path']} {tuple(entries[0]['shape'])}). "
            "Instead, pass a model of the architecture that was trained."
        )
    return chosen


def _refuse_swapped_in(model):
    opt = getattr(model, "optimizer", None)
    while opt is not None and not hasattr(opt, "averages_swapped_in"):
        opt = getattr(opt, "inner_optimizer", None)
    if opt is not None and opt.built and opt.averages_swapped_in:
        raise ValueError(
            "synthesize does not support a model whose averages are swapped "
            "in: writing into it would replace the averages it holds, and "
            "the raw weights would come back over the synthesized ones. "
            "Instead, call `optimizer.swap_weights()` first."
        )


def _describe(steps):
    if len(steps) <= 6:
        return ", ".join(map(str, steps))
    return f"{', '.join(map(str, steps[:3]))}, ..., {', '.join(map(str, steps[-2:]))}"
