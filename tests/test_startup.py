"""Quiet, clear starts: no TensorFlow start-up notices, one line per missing
dependency, nothing written before it (keras_ema/_startup.py)."""

import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import BACKEND
from conftest import START_UP_NOTICE
from conftest import tensorflow_only

# TensorFlow 2.21's start-up on a CPU machine, as it printed it here.
TENSORFLOW_START_UP = """\
WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1796142623.700849   16652 port.cc:153] oneDNN custom operations are on. You may see slightly different numerical results due to floating-point round-off errors from different computation orders. To turn them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.
I0000 00:00:1796142623.701202   16652 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
I0000 00:00:1796142623.756530   16652 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.
To enable the following instructions: AVX2 AVX512F AVX512_VNNI AVX512_BF16 AVX512_FP16 AVX_VNNI FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
"""
# TensorFlow 2.16's (the floor) own.
TENSORFLOW_2_16_START_UP = """\
2026-12-01 17:09:04.111217: E external/local_xla/xla/stream_executor/cuda/cuda_fft.cc:479] Unable to register cuFFT factory: Attempting to register factory for plugin cuFFT when one has already been registered
2026-12-01 17:09:04.132142: E external/local_xla/xla/stream_executor/cuda/cuda_dnn.cc:10575] Unable to register cuDNN factory: Attempting to register factory for plugin cuDNN when one has already been registered
2026-12-01 17:09:04.132202: E external/local_xla/xla/stream_executor/cuda/cuda_blas.cc:1442] Unable to register cuBLAS factory: Attempting to register factory for plugin cuBLAS when one has already been registered
2026-12-01 17:09:05.004299: W tensorflow/compiler/tf2tensorrt/utils/py_utils.cc:38] TF-TRT Warning: Could not find TensorRT
"""
CUINIT = (
    "E0000 00:00:1796142630.571521   16652 cuda_platform.cc:52] failed call to "
    "cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n"
)
REAL = [
    "E0000 00:00:1796142630.6   16652 some_kernel.cc:12] a real error\n",
    "UserWarning: something the user must see\n",
]


def test_only_the_notices_are_hidden():
    from keras_ema import _startup

    assert _startup.kept_lines(TENSORFLOW_START_UP + "".join(REAL)) == REAL
    assert _startup.kept_lines(TENSORFLOW_2_16_START_UP + REAL[0]) == REAL[:1]
    # A failed cuInit is expected once TensorFlow found no driver, at import
    # (earlier) or in the same text ...
    assert _startup.kept_lines(CUINIT + REAL[0], no_driver=True) == REAL[:1]
    assert _startup.kept_lines(TENSORFLOW_START_UP + CUINIT) == []
    # ... and a real error where a driver exists (a GPU whose driver broke).
    assert _startup.kept_lines(CUINIT) == [CUINIT]


def test_what_the_block_writes_comes_back_also_when_it_raises(capfd):
    from keras_ema import _startup

    with pytest.raises(RuntimeError, match="the block failed"):
        with _startup.notices_hidden():
            os.write(2, TENSORFLOW_START_UP.encode())
            os.write(2, "".join(REAL).encode())
            raise RuntimeError("the block failed")
    assert capfd.readouterr().err == "".join(REAL)
    os.write(2, b"after the block\n")  # file descriptor 2 is back
    assert capfd.readouterr().err == "after the block\n"


def _run(tmp_path, args, blocked=None):
    """Runs `python args` in `tmp_path` in a fresh process, without
    TensorFlow's log-level variable, with module `blocked` uninstalled
    (`None` in `sys.modules`: its import raises ModuleNotFoundError)."""
    env = {key: value for key, value in os.environ.items()
           if key != "TF_CPP_MIN_LOG_LEVEL"}
    env["KERAS_BACKEND"] = BACKEND
    if blocked:
        site = tmp_path / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(
            f"import sys\nsys.modules[{blocked!r}] = None\n"
        )
        env["PYTHONPATH"] = os.pathsep.join(
            [str(site), *filter(None, [env.get("PYTHONPATH")])]
        )
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="the line about a missing extra does not depend on the backend "
    "(_startup.require); one backend shows it (JAX: TensorFlow's run of "
    "the suite is the longest)",
)
@pytest.mark.parametrize("module, package", [
    ("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")
])
def test_demo_without_its_extra_says_so_in_one_line_before_writing(
    tmp_path, module, package
):
    result = _run(tmp_path, ["-m", "keras_ema.demo", "--output-dir", "out"],
                  blocked=module)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"python -m keras_ema.demo needs {package}, which is not installed. "
        'Install with `pip install -e ".[demo]"` in keras-ema\'s clone.'
    ]
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_a_missing_backend_is_one_line_for_a_program_and_an_error_on_import(
    tmp_path,
):
    extra = BACKEND  # each backend's extra has its name
    message = (
        f"keras-ema cannot start: Keras' backend is {extra!r} (KERAS_BACKEND "
        "or ~/.keras/keras.json), which is not installed. Install it with "
        f'`pip install -e ".[{extra}]"` in keras-ema\'s clone, or choose an '
        "installed backend with KERAS_BACKEND."
    )
    program = _run(tmp_path, ["-m", "keras_ema.demo", "--output-dir", "out"],
                   blocked=BACKEND)
    assert (program.returncode, program.stderr) == (2, message + "\n")
    assert not (tmp_path / "out").exists()

    library = _run(tmp_path, ["-c", "import keras_ema"], blocked=BACKEND)
    assert library.returncode == 1
    assert library.stderr.splitlines()[-1] == "ModuleNotFoundError: " + message


@tensorflow_only
def test_the_demo_and_the_command_line_print_no_start_up_notices(tmp_path):
    demo = _run(tmp_path, ["-m", "keras_ema.demo", "--epochs", "1", "--quiet",
                           "--output-dir", "out"])
    assert demo.returncode == 0, demo.stderr
    assert "final accuracy" in demo.stdout
    assert not re.search(START_UP_NOTICE, demo.stderr), demo.stderr

    command = _run(tmp_path, ["-m", "keras_ema", "export", "missing.keras",
                              "plain.keras"])
    assert command.returncode == 2
    assert len(command.stderr.splitlines()) == 1, command.stderr
    assert command.stderr.startswith("python -m keras_ema export: error: ")


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_keras_ema_before_the_backend_leaves_fd_2_alone(tmp_path):
    # While Keras (and TensorFlow with it) imports, fd 2 must be the
    # process's standard error: a crash in that import must show. A meta
    # path finder looks at fd 2 when `keras` is imported.
    script = textwrap.dedent("""
        import os, sys

        before = os.fstat(2)
        seen = []

        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name == "keras" and not seen:
                    now = os.fstat(2)
                    seen.append((now.st_ino, now.st_dev) ==
                                (before.st_ino, before.st_dev))
                return None

        sys.meta_path.insert(0, Spy())
        import keras_ema
        after = os.fstat(2)
        assert "keras" in sys.modules
        print(seen, (after.st_ino, after.st_dev) ==
              (before.st_ino, before.st_dev))
    """)
    env = {k: v for k, v in os.environ.items()
           if k != "KERAS_EMA_QUIET_START"}
    stderr = tmp_path / "stderr"
    with open(stderr, "w") as err:
        result = subprocess.run(
            [sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
            stderr=err, text=True, timeout=300, cwd=ROOT,
        )
    assert result.returncode == 0, stderr.read_text()
    assert result.stdout.split() == ["[True]", "True"]
