"""keras-ema under distribution: tf.distribute and Keras' JAX distribution API.

Each group runs in fresh processes: TensorFlow's logical devices and JAX's
host device count must be set before the framework starts, and a pytest
process has started it long before this file runs.

- MirroredStrategy over two logical CPUs: `tests/_dist_mirrored.py`, once
  for the whole group (one TensorFlow start-up); each test asserts on the
  facts one scenario measured there.
- MultiWorkerMirroredStrategy: two worker processes on 127.0.0.1,
  `tests/_mwms_worker.py`, every wait bounded.
- JAX DataParallel / ModelParallel over two host devices:
  `tests/_dist_jax.py`.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import BACKEND

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-6
STEPS = 4  # 64 samples, global batch 16, in every script

tensorflow_only = pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="tf.distribute strategies exist on the TensorFlow backend only",
)
jax_only = pytest.mark.skipif(
    BACKEND != "jax", reason="Keras' JAX distribution API (jax backend only)"
)


def _run(command, timeout, env=None):
    """Runs `command` in its own process group; kills the group on timeout."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    env.pop("TF_CONFIG", None)
    proc = subprocess.Popen(
        command, env=env, cwd=HERE.parent, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{command[1:3]} ran past {timeout} s:\n{out[-4000:]}")
    return proc.returncode, out


def _scenarios(script, out, backend, timeout=420, env=None):
    rc, output = _run(
        [sys.executable, str(HERE / script), str(out)], timeout,
        {"KERAS_BACKEND": backend, **(env or {})},
    )
    if rc != 0 or not out.exists():
        pytest.fail(f"{script} failed (rc={rc}):\n{output[-4000:]}")
    return json.loads(out.read_text())


def _facts(results, name):
    result = results[name]
    if "error" in result:
        pytest.fail(f"scenario {name!r} raised:\n{result['error']}")
    return result["facts"]


def _numpy_ema(recorded, decay=0.9):
    """The documented EMA (dynamic decay) of weights recorded per step."""
    averages = [np.array(w, "float32") for w in recorded[0]]
    for n, weights in enumerate(recorded[1:]):
        factor = np.float32(1.0) - np.float32(min(decay, (1 + n) / (10 + n)))
        averages = [a - factor * (a - w) for a, w in zip(averages, weights)]
    return averages


def _bits(array):
    array = np.asarray(array)
    return array.view(f"uint{array.dtype.itemsize * 8}")


# -- MirroredStrategy, two logical CPU devices --------------------------------


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored") / "results.json"
    return _scenarios("_dist_mirrored.py", out, "tensorflow")


@tensorflow_only
def test_mirrored_averages_are_mirrored_variables_on_their_weights_devices(
    mirrored,
):
    facts = _facts(mirrored, "placement")
    assert facts["replicas"] == 2
    assert len(facts["averages"]) == 4  # two Dense kernels and biases
    for entry in facts["averages"]:
        # Small weights: their averages share one flat variable, as on one
        # device, so a `tf.train.Checkpoint` has the same layout.
        assert entry["packed"], entry
        assert entry["weight_type"] == "MirroredVariable", entry
        assert entry["average_type"] == "MirroredVariable", entry
        assert entry["average_is_distributed"], entry
        # One component per device, each on its weight's component device.
        assert len(set(entry["average_devices"])) == 2, entry
        assert entry["average_devices"] == entry["weight_devices"], entry
    for name, state in facts["state"].items():
        assert state["type"] == "MirroredVariable", name
        assert len(set(state["devices"])) == 2, name


@tensorflow_only
def test_mirrored_fit_counts_each_step_once_and_matches_references(mirrored):
    facts = _facts(mirrored, "fit")
    assert facts["steps_run"] == STEPS
    # N steps, not N x replicas, and the same count on every replica.
    assert facts["step_per_replica"] == [STEPS, STEPS]
    assert facts["iterations"] == STEPS
    assert facts["reference_step"] == STEPS
    assert facts["identical_across_replicas"]
    # Exactly the documented EMA of the weights the strategy produced...
    assert facts["max_diff_to_numpy_ema"] <= TOLERANCE
    # ... and the same training without a strategy, within float noise.
    assert facts["max_diff_to_single_device_averages"] <= TOLERANCE
    assert facts["max_diff_to_single_device_weights"] <= TOLERANCE
    # The averages really averaged (they are not a copy of the weights).
    assert facts["min_average_to_weight_distance"] > 1e-3


@tensorflow_only
def test_mirrored_start_step_and_update_every_match_single_device(mirrored):
    facts = _facts(mirrored, "fit_start_step_update_every")
    assert facts["step_per_replica"] == [STEPS, STEPS]
    assert facts["identical_across_replicas"]
    assert facts["max_diff_to_single_device_averages"] <= TOLERANCE
    assert facts["max_diff_to_single_device_weights"] <= TOLERANCE


def _assert_exact_swap(facts):
    assert facts["weights_are_old_averages"], facts
    assert facts["averages_are_old_weights"], facts
    assert facts["identical_across_replicas"], facts
    assert facts["averages_swapped_in"] is True, facts


def _assert_round_trip(facts):
    _assert_exact_swap(facts)
    assert facts["back_bit_for_bit"], facts
    assert facts["swapped_in_after_back"] is False, facts


@tensorflow_only
@pytest.mark.parametrize("mode", ["eager", "eager_in_scope", "tf_function"])
def test_mirrored_swap_in_cross_replica_context(mirrored, mode):
    _assert_round_trip(_facts(mirrored, "swap_cross_replica")[mode])


@tensorflow_only
@pytest.mark.parametrize("mode", ["tf_function", "eager"])
def test_mirrored_swap_inside_strategy_run(mirrored, mode):
    _assert_round_trip(_facts(mirrored, "swap_in_replica_context")[mode])


@tensorflow_only
def test_mirrored_training_after_an_eager_replica_swap_is_refused(mirrored):
    facts = _facts(mirrored, "eager_replica_swap_then_train")
    assert facts["error"] is not None and "swapped" in facts["error"]
    assert facts["error"].startswith("ValueError")
    assert facts["weights_unchanged"]
    assert facts["averages_unchanged"]
    assert facts["step_unchanged"]


@tensorflow_only
@pytest.mark.parametrize("mode", ["eager", "in_scope", "eager_strategy_run"])
def test_mirrored_assign_average_vars(mirrored, mode):
    facts = _facts(mirrored, "assign_average_vars")[mode]
    assert facts == {
        "weights_are_averages": True,
        "averages_unchanged": True,
        "identical_across_replicas": True,
    }


@tensorflow_only
def test_mirrored_assign_average_vars_inside_traced_strategy_run(mirrored):
    facts = _facts(mirrored, "assign_average_vars_in_replica_fn")
    assert facts == {
        "weights_are_averages": True,
        "averages_unchanged": True,
        "identical_across_replicas": True,
    }


@tensorflow_only
@pytest.mark.parametrize("mode", ["outside_scope", "in_scope", "raising"])
def test_mirrored_averaged_weights(mirrored, mode):
    facts = _facts(mirrored, "averaged_weights")[mode]
    _assert_exact_swap(facts)  # inside the block
    assert facts["back_bit_for_bit"], facts
    assert facts["swapped_in_after"] is False, facts


@tensorflow_only
@pytest.mark.parametrize("mode", ["outside_scope", "in_scope"])
def test_mirrored_fit_with_swap_and_checkpoint_callbacks(mirrored, mode):
    facts = _facts(mirrored, "callbacks")[mode]
    # Validation ran on the averages; the raw metrics on the raw weights.
    assert facts["val_loss"][-1] == pytest.approx(
        facts["evaluate_on_averages"], rel=TOLERANCE
    )
    assert facts["val_raw_loss"][-1] == pytest.approx(
        facts["evaluate_on_raw"], rel=TOLERANCE
    )
    assert abs(facts["val_loss"][-1] - facts["val_raw_loss"][-1]) > 1e-3
    # Raw weights back bit for bit on every replica, averages untouched.
    assert facts["raw_back_bit_for_bit"]
    assert facts["averages_unchanged"]
    assert facts["identical_across_replicas"]
    assert facts["swapped_in_after_fit"] is False
    # AverageModelCheckpoint wrote the averages, not the raw weights.
    assert facts["checkpoint_holds_averages"]


@tensorflow_only
def test_mirrored_custom_loop_with_strategy_run_and_apply_gradients(mirrored):
    facts = _facts(mirrored, "custom_loop")
    assert facts["steps_run"] == STEPS
    assert facts["step_per_replica"] == [STEPS, STEPS]
    assert facts["iterations"] == STEPS
    assert facts["identical_across_replicas"]
    assert facts["max_diff_to_numpy_ema"] <= TOLERANCE
    _assert_exact_swap(facts["swap_in_loop"])


def _assert_batchnorm_averages(facts):
    assert facts["average_types"] == ["MirroredVariable"] * 2, facts
    assert facts["state_types"] == ["MirroredVariable"] * 2, facts
    assert facts["step_per_replica"] == [STEPS, STEPS], facts
    assert facts["colocated"], facts
    # Keras keeps BatchNorm statistics per replica (not synchronised): each
    # replica's average follows its own statistics and swaps exactly.
    assert facts["per_replica_exact_swap"], facts
    assert facts["back_bit_for_bit"], facts
    assert facts["trainable_identical_across_replicas"], facts


@tensorflow_only
def test_mirrored_batchnorm_statistics_averages_per_replica(mirrored):
    _assert_batchnorm_averages(
        _facts(mirrored, "non_trainable_shadow_copy_in_scope")
    )


@tensorflow_only
def test_mirrored_shadow_copy_outside_the_scope(mirrored):
    facts = _facts(mirrored, "shadow_copy_outside_scope")
    trainable = facts["trainable_only"]
    assert trainable["average_types"] == ["MirroredVariable"] * 4
    assert trainable["state_types"] == ["MirroredVariable"] * 2
    assert trainable["step_per_replica"] == [STEPS, STEPS]
    assert trainable["identical_across_replicas"]
    assert trainable["max_diff_to_numpy_ema"] <= TOLERANCE
    _assert_batchnorm_averages(facts["explicit"])
    _assert_batchnorm_averages(facts["callback"])


@tensorflow_only
def test_mirrored_bfloat16_weights_swap_exactly_on_every_replica(mirrored):
    facts = _facts(mirrored, "low_precision")
    assert facts["weight_dtype"] == "bfloat16"
    assert facts["average_dtype"] == "float32"
    assert facts["average_type"] == "MirroredVariable"
    assert facts["weights_are_rounded_averages"]
    assert facts["averages_untouched_while_swapped"]
    assert facts["identical_across_replicas"]
    assert facts["back_bit_for_bit"]


# -- MultiWorkerMirroredStrategy, two processes on 127.0.0.1 ------------------

MWMS_DEADLINE_S = 120


def _private_loopback():
    """`unshare -rn` + `ip link set lo up`, where the machine allows it.

    TensorFlow's gRPC server listens on 0.0.0.0 whatever the cluster spec
    says; in a private network namespace it can only ever see loopback.
    Without one (user namespaces disabled), the workers run as they are:
    addresses 127.0.0.1, ports picked free, a lifetime of seconds.
    """
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if not unshare or not ip:
        return []
    try:
        probe = subprocess.run(
            [unshare, "-rn", ip, "link", "set", "lo", "up"],
            capture_output=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if probe.returncode != 0:
        return []
    script = f'"{ip}" link set lo up && exec "$0" "$@"'
    return [unshare, "-rn", "sh", "-c", script]


@tensorflow_only
def test_multi_worker_mirrored_two_workers_hold_identical_averages(tmp_path):
    import keras
    import tensorflow as tf

    import keras_ema

    start = time.monotonic()
    command = _private_loopback() + [
        sys.executable, str(HERE / "_mwms_worker.py"), "launch",
        str(tmp_path), str(MWMS_DEADLINE_S),
    ]
    rc, output = _run(
        command, MWMS_DEADLINE_S + 30, {"KERAS_BACKEND": "tensorflow"}
    )
    elapsed = time.monotonic() - start
    launch = tmp_path / "launch.json"
    assert launch.exists(), output[-4000:]
    summary = json.loads(launch.read_text())
    for i, worker in enumerate(summary["workers"]):
        assert worker["rc"] == 0 and not worker["timed_out"], (
            f"worker {i}:\n{worker['output']}"
        )
    assert rc == 0, output[-4000:]
    assert elapsed < MWMS_DEADLINE_S

    workers = [np.load(tmp_path / f"worker{i}.npz") for i in range(2)]
    n = sum(1 for k in workers[0].files if k.startswith("raw_"))
    assert n == 4
    for w in workers:
        assert int(w["replicas"]) == 2
        assert int(w["steps_run"]) == STEPS
        assert int(w["step"]) == STEPS  # not STEPS x workers
        assert int(w["iterations"]) == STEPS
        assert bool(w["swapped_in"])
        for i in range(n):
            # The swap is exact on each worker.
            assert np.array_equal(
                _bits(w[f"swapped_weight_{i}"]), _bits(w[f"average_{i}"])
            )
            assert np.array_equal(
                _bits(w[f"swapped_average_{i}"]), _bits(w[f"raw_{i}"])
            )
        recorded = [
            [w[f"recorded_{s}_{i}"] for i in range(n)]
            for s in range(STEPS + 1)
        ]
        expected = _numpy_ema(recorded)
        for i in range(n):
            np.testing.assert_allclose(
                w[f"average_{i}"], expected[i], rtol=0, atol=TOLERANCE
            )
    # Both workers hold the same bits, before and after the swap.
    for key in workers[0].files:
        assert np.array_equal(
            _bits(workers[0][key]), _bits(workers[1][key])
        ), key

    # The chief's checkpoints hold the swapped state: averages in the model.
    from _mwms_worker import build

    chief = workers[0]

    def holds(variables, prefix):
        return all(
            np.array_equal(_bits(v.numpy()), _bits(chief[f"{prefix}_{i}"]))
            for i, v in enumerate(variables)
        )

    model, _ = build(keras, keras_ema)
    model.load_weights(tmp_path / "ema.weights.h5")
    assert holds(model.trainable_variables, "average")
    assert not (tmp_path / "scratch_1" / "ema.weights.h5").exists()
    model, opt = build(keras, keras_ema)
    tf.train.Checkpoint(model=model, optimizer=opt).read(
        str(tmp_path / "ckpt")
    ).assert_existing_objects_matched()
    assert opt.averages_swapped_in
    assert holds(model.trainable_variables, "average")
    assert holds([opt.average(v) for v in model.trainable_variables], "raw")
    opt.swap_weights()
    assert holds(model.trainable_variables, "raw")


# -- JAX: DataParallel and ModelParallel over two host devices ----------------


@pytest.fixture(scope="module")
def jax_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("jax") / "results.json"
    results = _scenarios("_dist_jax.py", out, "jax")
    assert len(results["devices"]) == 2, results["devices"]
    return results


def _assert_same_shardings(shardings, expected_specs=None):
    for entry in shardings:
        assert entry["same_sharding"], entry
        assert entry["average_spec"] == entry["weight_spec"], entry
        assert entry["average_devices"] == entry["weight_devices"] == [0, 1]
        assert entry["average_shard_shapes"] == entry["weight_shard_shapes"]
    if expected_specs is not None:
        assert {e["path"]: e["average_spec"] for e in shardings} == (
            expected_specs
        )


def _assert_fit_matches_single_device(facts):
    assert facts["step"] == STEPS
    assert facts["iterations"] == STEPS
    assert facts["max_diff_to_single_device_averages"] <= TOLERANCE
    assert facts["max_diff_to_single_device_weights"] <= TOLERANCE
    assert facts["min_average_to_weight_distance"] > 1e-3
    assert facts["swap"] == {
        "weights_are_old_averages": True,
        "averages_are_old_weights": True,
        "back_bit_for_bit": True,
        "shardings_kept_while_swapped": True,
        "shardings_kept_after": True,
    }
    assert facts["specs_inside_averaged_weights"] == [
        e["weight_spec"] for e in facts["shardings"]
    ]


@jax_only
def test_jax_data_parallel_averages_are_replicated_like_the_weights(
    jax_results,
):
    facts = _facts(jax_results, "data_parallel")
    _assert_same_shardings(facts["shardings"], {
        "net/hidden/kernel": "P(None, None)",
        "net/hidden/bias": "P(None,)",
        "net/out/kernel": "P(None, None)",
        "net/out/bias": "P(None,)",
    })
    _assert_fit_matches_single_device(facts)


@jax_only
def test_jax_model_parallel_average_of_a_sharded_kernel_is_sharded_alike(
    jax_results,
):
    facts = _facts(jax_results, "model_parallel")
    _assert_same_shardings(facts["shardings"], {
        "net/hidden/kernel": "P(None, 'model')",
        "net/hidden/bias": "P('model',)",
        "net/out/kernel": "P(None, None)",
        "net/out/bias": "P(None,)",
    })
    kernel = facts["shardings"][0]
    assert kernel["average_shard_shapes"] == [[4, 4], [4, 4]]  # 8 columns / 2
    _assert_fit_matches_single_device(facts)


@jax_only
def test_jax_data_parallel_swap_average_weights_validates_on_averages(
    jax_results,
):
    facts = _facts(jax_results, "data_parallel_callback")
    assert facts["val_loss"][-1] == pytest.approx(
        facts["evaluate_on_averages"], rel=TOLERANCE
    )
    assert facts["val_raw_loss"][-1] == pytest.approx(
        facts["evaluate_on_raw"], rel=TOLERANCE
    )
    assert abs(facts["val_loss"][-1] - facts["val_raw_loss"][-1]) > 1e-3
    assert facts["raw_back_bit_for_bit"]
    assert facts["swapped_in_after_fit"] is False
    _assert_same_shardings(facts["shardings"])


@jax_only
def test_jax_data_parallel_batchnorm_statistics_averages(jax_results):
    facts = _facts(jax_results, "data_parallel_batchnorm")
    _assert_same_shardings(facts["shardings"], {
        "net/norm/moving_mean": "P(None,)",
        "net/norm/moving_variance": "P(None,)",
    })
    assert facts["statistics_averages_moved"]
    assert all(facts["swap"].values()), facts["swap"]


# -- MirroredStrategy: one step from `strategy.run` ---------------------------

W0 = np.array([1.0, -1.0, 0.5], "float32")  # as in `_dist_mirrored.py`
G = np.array([1.0, 2.0, 3.0], "float32")
LR = 0.1
# Keras' optimizers apply a gradient that every replica passes as the same
# tensor once, and the sum of per-replica ones (`G`, then `2 * G`).
APPLIED = {"captured": G, "per_replica": 3 * G}


def _assert_one_step_as_reference(facts, kind, exact_sgd):
    if "error" in facts:
        pytest.fail(f"the step raised:\n{facts['error'][-3000:]}")
    assert facts["average_type"] == "MirroredVariable", facts
    assert facts["state_types"] == ["MirroredVariable"] * 2, facts
    assert facts["step_per_replica"] == [1, 1], facts
    reference = np.asarray(facts["reference"])
    assert np.array_equal(reference[0], reference[1]), facts
    if exact_sgd:
        np.testing.assert_allclose(
            reference[0], W0 - LR * APPLIED[kind], rtol=0, atol=TOLERANCE
        )
    for weight, average in zip(facts["ema"], facts["average"]):
        np.testing.assert_allclose(weight, reference[0], rtol=0, atol=TOLERANCE)
        # The first EMA update: dynamic decay 0.1.
        np.testing.assert_allclose(
            average, W0 - np.float32(0.9) * (W0 - reference[0]),
            rtol=0, atol=TOLERANCE,
        )


@tensorflow_only
@pytest.mark.parametrize("mode", ["eager", "tf_function"])
@pytest.mark.parametrize("kind", ["captured", "per_replica"])
def test_mirrored_gradient_from_outside_strategy_run_is_applied_as_by_sgd(
    mirrored, kind, mode
):
    facts = _facts(mirrored, "gradient_from_outside_strategy_run")
    _assert_one_step_as_reference(facts[f"sgd/{kind}/{mode}"], kind, True)


@tensorflow_only
@pytest.mark.parametrize("mode", ["eager", "tf_function"])
@pytest.mark.parametrize("kind", ["captured", "per_replica"])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
def test_mirrored_unbuilt_optimizer_builds_in_its_first_strategy_run_step(
    mirrored, inner, kind, mode
):
    facts = _facts(mirrored, "unbuilt_in_strategy_run")
    _assert_one_step_as_reference(
        facts[f"{inner}/{kind}/{mode}"], kind, inner == "sgd"
    )
