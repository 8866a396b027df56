"""Runs the whole test suite once per Keras backend, two backends at a time.

    python tests/run_backends.py                  # TensorFlow, JAX, PyTorch
    python tests/run_backends.py jax torch -x     # these, with pytest's -x

One pytest process per backend (`KERAS_BACKEND` is read once, at import).
A run of this suite keeps about one core busy: on 2 cores, the TensorFlow
and the JAX runs of two test files took 78 s and 56 s side by side, 72 s
and 48 s one after the other. So two backends run side by side:
TensorFlow, the longest, and JAX, then PyTorch when a core frees up. Each
backend's output is printed whole when it ends, then a summary line per
backend; the exit status is 0 only if every backend passed. Arguments that
are not backend names go to pytest.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import time

BACKENDS = ("tensorflow", "jax", "torch")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _start(backend, pytest_args, log):
    env = {**os.environ, "KERAS_BACKEND": backend}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
               *pytest_args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def main(argv):
    backends = [a for a in argv if a in BACKENDS] or list(BACKENDS)
    pytest_args = [a for a in argv if a not in BACKENDS]
    parallel = max(1, min(2, os.cpu_count() or 1))
    waiting, running, results = list(backends), {}, {}
    with tempfile.TemporaryDirectory() as logs:
        try:
            while waiting or running:
                while waiting and len(running) < parallel:
                    backend = waiting.pop(0)
                    log = open(os.path.join(logs, backend), "w+")
                    print(f"[{backend}] started", flush=True)
                    running[backend] = (_start(backend, pytest_args, log),
                                        log, time.monotonic())
                for backend, (process, log, start) in list(running.items()):
                    if process.poll() is None:
                        continue
                    del running[backend]
                    log.seek(0)
                    print(f"\n[{backend}] KERAS_BACKEND={backend} python -m "
                          "pytest", *pytest_args, flush=True)
                    sys.stdout.write(log.read())
                    log.close()
                    results[backend] = (process.returncode,
                                        time.monotonic() - start)
                time.sleep(0.5)
        finally:
            for process, log, _ in running.values():
                process.kill()
                process.wait()
                log.close()
    print()
    for backend in backends:
        code, seconds = results[backend]
        print(f"[{backend}] {'passed' if code == 0 else f'FAILED (exit {code})'}"
              f" in {seconds:.0f} s", flush=True)
    return 0 if all(code == 0 for code, _ in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
