"""keras-ema in a two-process JAX run: `jax.distributed` on 127.0.0.1.

Two processes (`tests/_multihost_jax_worker.py`), one CPU device each, CPU
collectives by gloo, train one model with Keras' `DataParallel` over both
processes' devices, each feeding its half of every global batch; a third
process trains the same model alone on the same global data. All three run
at once, every wait bounded, and all are killed at the end, also when a test
fails. What the runs showed (Keras 3.15, jax 0.10):

- `fit`, `SwapAverageWeights` and `averaged_weights()` work unchanged: the
  averages are identical bit for bit on both processes and equal the
  single-process ones within float32 rounding, also those of BatchNorm
  statistics (`trainable_weights_only=False`).
- Saving: every process calls `model.save` / `save_weights`, each to its own
  path (for all but process 0 a scratch path will do); every process then
  loads a file, its own or process 0's, and gets every average back bit for
  bit. Loading, like saving, must run in every process: it creates
  variables laid out over all processes' devices.
- Process 0 alone calling `model.save` or `save_weights` fails inside Keras:
  `saving_lib.get_attr_skipset` creates a throwaway `Optimizer(1.0)` on
  every save, whose `iterations` variable Keras puts on the distribution's
  layout with `jax.device_put`, a step that every process must join: it
  meets whatever step process 1 runs next (here a barrier, which fails
  too).
  With the distribution unset around the call, process 0 alone writes a
  file that every process restores bit for bit.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKEND

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_multihost_jax_worker.py"
TIMEOUT = 240  # seconds for all three processes together
INIT_FAILED = 3  # the worker's exit status when `jax.distributed` fails
PROCESSES = ("process-0", "process-1")
SCENARIOS = ("plain", "batchnorm")
STEPS = 8  # 64 samples, global batch 16, two epochs
RTOL = 1e-5

pytestmark = pytest.mark.skipif(
    BACKEND != "jax", reason="multi-process JAX (jax.distributed): jax only"
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(name, args, out):
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep),
    }
    log = open(out / f"{name}.log", "w")
    try:
        return subprocess.Popen(
            [sys.executable, str(WORKER), *args, str(out)], env=env,
            cwd=HERE.parent, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        log.close()


def _tail(out, name, n=4000):
    path = out / f"{name}.log"
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _init_error(out, name):
    path = out / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("init_error")


def _why(error, log):
    """The line that says why: jaxlib's fatal status, else the error's."""
    for line in log.splitlines():
        if "Status:" in line or "Error" in line:
            return line.strip()[-300:]
    lines = (error or log).strip().splitlines()
    return lines[-1] if lines else "no output"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("multihost_jax")
    port = str(_free_port())
    commands = {
        "reference": ["reference", "-"],
        "process-0": ["0", port],
        "process-1": ["1", port],
    }
    procs = {}
    start = time.monotonic()
    try:
        for name, args in commands.items():
            procs[name] = _start(name, args, out)
        deadline = start + TIMEOUT
        for name, proc in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(
                    f"{name} ran past {TIMEOUT} s:\n{_tail(out, name)}"
                )
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for name in PROCESSES:
        error = _init_error(out, name)
        if error is not None or procs[name].returncode == INIT_FAILED:
            pytest.skip(
                "jax.distributed cannot initialize two CPU processes on "
                f"127.0.0.1 here ({name}, exit status "
                f"{procs[name].returncode}): {_why(error, _tail(out, name))}"
            )
    results = {}
    for name, proc in procs.items():
        if proc.returncode != 0 or not (out / f"{name}.json").exists():
            pytest.fail(
                f"{name} failed (rc={proc.returncode}):\n{_tail(out, name)}"
            )
        facts = json.loads((out / f"{name}.json").read_text())
        with np.load(out / f"{name}.npz") as arrays:
            facts["arrays"] = {k: arrays[k] for k in arrays.files}
        results[name] = facts
    return results


def _facts(runs, name, scenario):
    facts = runs[name]
    errors = {
        k: v for k, v in facts["errors"].items()
        if k.split("/")[0] == scenario
    }
    if errors:
        label, error = next(iter(errors.items()))
        pytest.fail(f"{name}: stage {label!r} raised:\n{error}")
    return facts[scenario]


def _arrays(runs, name, prefix):
    prefix += "/"
    return {
        k[len(prefix):]: v for k, v in runs[name]["arrays"].items()
        if k.startswith(prefix)
    }


def _bits(array):
    return array.view(f"uint{array.dtype.itemsize * 8}")


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fit_leaves_identical_averages_on_both_processes_bit_for_bit(
    runs, scenario
):
    for name in PROCESSES:
        facts = _facts(runs, name, scenario)
        assert facts["iterations"] == STEPS
        assert facts["swapped_in_after_fit"] is False
        # Each average is laid out like its weight: replicated on the
        # devices of both processes.
        for path, sharding in facts["shardings"].items():
            assert "Mesh('batch': 2" in sharding, (path, sharding)
            assert "spec=P(None" in sharding, (path, sharding)
    assert runs["process-0"]["local_devices"] != (
        runs["process-1"]["local_devices"]
    )
    assert len(runs["process-0"]["devices"]) == 2
    for kind in ("averages", "weights"):
        first = _arrays(runs, "process-0", f"{scenario}/{kind}")
        second = _arrays(runs, "process-1", f"{scenario}/{kind}")
        assert sorted(first) == sorted(second)
        for path in first:
            assert np.array_equal(
                _bits(first[path]), _bits(second[path])
            ), (kind, path)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_fit_averages_equal_the_single_process_run_on_the_same_data(
    runs, scenario
):
    _facts(runs, "reference", scenario)
    reference = _arrays(runs, "reference", f"{scenario}/averages")
    averages = _arrays(runs, "process-0", f"{scenario}/averages")
    start = _arrays(runs, "process-0", f"{scenario}/initial_averages")
    weights = _arrays(runs, "process-0", f"{scenario}/weights")
    expected = ["hidden/bias", "hidden/kernel", "out/bias", "out/kernel"]
    if scenario == "batchnorm":
        expected += [
            "norm/beta", "norm/gamma", "norm/moving_mean",
            "norm/moving_variance",
        ]
    assert sorted(averages) == sorted(reference) == sorted(expected)
    for path in averages:
        np.testing.assert_allclose(
            averages[path], reference[path], rtol=RTOL, atol=1e-7,
            err_msg=path,
        )
        # Meaningful: every average moved, and is not its weight.
        assert np.max(np.abs(averages[path] - start[path])) > 1e-4, path
    assert max(
        float(np.max(np.abs(averages[p] - weights[p]))) for p in averages
    ) > 1e-3


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_validation_metric_is_evaluate_inside_averaged_weights(
    runs, scenario
):
    reference = _facts(runs, "reference", scenario)
    for name in PROCESSES:
        facts = _facts(runs, name, scenario)
        assert facts["val_loss"][-1] == pytest.approx(
            facts["evaluate_on_averages"], rel=1e-6
        )
        assert abs(facts["val_loss"][-1] - facts["evaluate_on_raw"]) > 1e-3
        assert facts["val_loss"] == pytest.approx(
            reference["val_loss"], rel=RTOL
        )


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_process_saves_its_own_file_and_loads_averages_bit_for_bit(
    runs, scenario
):
    expected = {"averages": True, "weights": True, "shardings": True,
                "swapped_in": False}
    for name in PROCESSES:
        found = _facts(runs, name, scenario)["every_process_saves"]
        # `model.save` -> `load_model`, `save_weights` -> `load_weights` into
        # a freshly compiled model; each process's own file and process 0's.
        assert sorted(found) == [
            "own_keras", "own_weights_h5",
            "process_0s_keras", "process_0s_weights_h5",
        ]
        for label, facts in found.items():
            assert facts == expected, (name, label)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_process_0_saves_alone_with_the_distribution_unset(runs, scenario):
    for name in PROCESSES:
        facts = _facts(runs, name, scenario)["process_0_saves_undistributed"]
        assert facts == {"averages": True, "weights": True,
                         "shardings": True, "swapped_in": False}, name


def test_process_0_saving_alone_fails_inside_keras_or_restores_everything(
    runs,
):
    """Keras 3.15 builds a throwaway optimizer on every save, laid out over
    all processes' devices: a step that every process must join. Should
    Keras stop doing that, what process 0 saves alone must load back whole
    in every process."""
    for name in PROCESSES:
        outcomes = _facts(runs, name, "plain")["process_0_alone"]
        assert sorted(outcomes) == ["save", "save_weights"], name
        for how, outcome in outcomes.items():
            error = outcome["error"]
            if error is None:
                assert outcome["restored"] == {
                    "averages": True, "weights": True, "shardings": True,
                    "swapped_in": False,
                }, (name, how)
            elif name == "process-0":
                assert "get_attr_skipset" in error, error
                assert "device_put" in error, error
            else:
                # Process 1's barrier met process 0's `device_put` check.
                assert "sync_global_devices" in error, error
