"""How keras-ema starts: quietly, or with one clear line of what is missing.

Importing TensorFlow prints, on a CPU machine, lines such as
`E0000 ... failed call to cuInit: INTERNAL: CUDA error`, which look like
failures and are not. TensorFlow writes most of them before its logging is
set up, straight to the process's standard error, so `TF_CPP_MIN_LOG_LEVEL`
cannot hide them (and at 3 it would hide every real C++ error too).
`notices_hidden()` catches what the process writes to standard error
meanwhile and writes everything back except those exact notices.

A library must leave the process's standard error alone: `import keras_ema`
does, unless a program of keras-ema owns the process (`python -m
keras_ema...`) or a program asks for a quiet start by setting
`KERAS_EMA_QUIET_START=1` before it imports keras_ema (the notebooks do).

A Keras backend or an extra that is not installed is named, with the extra
of `setup.cfg` that installs it, before anything is written.

Imports nothing of Keras: `keras_ema/__init__.py` imports Keras through it.
"""

import contextlib
import os
import re
import sys
import tempfile
import warnings

# Each one's text as TensorFlow 2.16 (the floor) to 2.21 print it.
_NOTICES = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called are written "
    r"to STDERR"
    r"|\] Unable to register cu(FFT|DNN|BLAS) factory: Attempting to register "
    r"factory for plugin cu\w+ when one has already been registered"
    r"|\] TF-TRT Warning: Could not find TensorRT"
    r"|\] oneDNN custom operations are on\. "
    r"|\] This TensorFlow binary is optimized to use available CPU instructions"
    r"|^To enable the following instructions: .* rebuild TensorFlow with the "
    r"appropriate compiler flags\.$"
    r"|\] Could not find cuda drivers on your machine, GPU will not be used\."
)
_NO_DRIVER = "Could not find cuda drivers on your machine"
# Hidden only next to the no-driver notice: without it, a failed cuInit is a
# real error (a GPU whose driver is broken).
_CUINIT = re.compile(r"\] failed call to cuInit: ")


def kept_lines(text, no_driver=False):
    """The lines of `text` that are not TensorFlow's CPU start-up notices.

    `no_driver`: whether TensorFlow said earlier that it found no CUDA
    driver (then a failed cuInit is expected, not an error).
    """
    lines = text.splitlines(keepends=True)
    no_driver = no_driver or any(_NO_DRIVER in line for line in lines)
    return [
        line for line in lines
        if not _NOTICES.search(line)
        and not (no_driver and _CUINIT.search(line))
    ]


# Whether an earlier block saw the no-driver notice: TensorFlow prints it at
# import, and the failed cuInit when it starts its devices, later.
_no_driver_seen = []


@contextlib.contextmanager
def notices_hidden():
    """Runs the block with TensorFlow's CPU start-up notices hidden.

    TensorFlow writes to file descriptor 2 whatever `sys.stderr` is (in a
    notebook kernel, a pipe to the notebook). Everything else written there
    in the block is written back to `sys.stderr` when it ends, also when it
    raises.
    """
    fd = 2
    try:
        sys.stderr.flush()
        saved = os.dup(fd)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as caught, warnings.catch_warnings():
        # Keras 3.13's import probes `hasattr(np, "object")`, which NumPy 1
        # answers with this warning.
        warnings.filterwarnings(
            "ignore", message=r"In the future `np\.object` will be defined",
            category=FutureWarning,
        )
        os.dup2(caught.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            caught.seek(0)
            text = caught.read().decode(errors="replace")
            if _NO_DRIVER in text:
                _no_driver_seen.append(True)
            sys.stderr.writelines(kept_lines(text, bool(_no_driver_seen)))
            sys.stderr.flush()


QUIET_START = "KERAS_EMA_QUIET_START"


def import_keras():
    """Imports Keras, and with it the backend: quietly for a program of
    keras-ema, or where `KERAS_EMA_QUIET_START` is set; else standard error
    is left alone. A missing backend gets one line (`refuse_missing_backend`).
    """
    program = getattr(sys, "argv", [])[:1] == ["-m"]
    quiet = "tensorflow" not in sys.modules and (
        program or os.environ.get(QUIET_START, "") not in ("", "0")
    )
    with notices_hidden() if quiet else contextlib.nullcontext():
        try:
            import keras  # noqa: F401
        except ModuleNotFoundError as error:
            refuse_missing_backend(error)


def start_quietly():
    """Starts the backend's devices with the notices hidden.

    For the programs keras-ema runs (the demos, the command line, the
    examples): they own the process. A library must not start the devices
    at import: `tf.config.set_memory_growth` and logical device set-up
    must come first.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        with notices_hidden():
            keras.ops.convert_to_numpy(keras.ops.zeros(()))


# The import error's module, and the extra of setup.cfg that installs it.
_BACKEND_EXTRAS = {"tensorflow": "tensorflow", "jax": "jax", "jaxlib": "jax",
                   "torch": "torch"}


def refuse_missing_backend(error):
    """Re-raises Keras' import error for a backend that is not installed.

    With a message that says which extra installs it. Under `python -m
    keras_ema...` (a program of this package: `sys.argv[0]` is "-m" while
    Python imports the package to find it) the message is one line on
    standard error and the exit status 2, not a traceback.
    """
    extra = _BACKEND_EXTRAS.get((error.name or "").partition(".")[0])
    if extra is None:
        raise error
    message = (
        f"keras-ema cannot start: Keras' backend is {extra!r} "
        f"(KERAS_BACKEND or ~/.keras/keras.json), which is not installed. "
        f'Install it with `pip install -e ".[{extra}]"` in keras-ema\'s '
        "clone, or choose an installed backend with KERAS_BACKEND."
    )
    if sys.argv[:1] == ["-m"]:
        sys.stderr.write(message + "\n")
        raise SystemExit(2)
    raise ModuleNotFoundError(message, name=error.name) from None


def require(program, modules, extra):
    """Exits with one line naming the extra to install if `modules` lack.

    For the programs of this package, before they write anything.

    Args:
        program: The command, e.g. "python -m keras_ema.demo".
        modules: `{import name: distribution name}` that the program needs.
        extra: The extra of setup.cfg that installs them.
    """
    import importlib

    missing = []
    for module, name in modules.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(name)
    if missing:
        sys.stderr.write(
            f"{program} needs {' and '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install "
            f'with `pip install -e ".[{extra}]"` in keras-ema\'s clone.\n'
        )
        raise SystemExit(2)
