"""Peak memory of `keras_ema.soup` (and `greedy_soup`), in copies of the model.

`soup` reads its files one at a time, one block of a variable at a time, and
keeps one float64 sum per variable: about two float32 copies of the model,
whatever the number of files. `greedy_soup` also keeps a copy of the model's
weights to restore on an error: about three. This builds an MLP of about
21M float32 parameters (5 Dense layers 2048 wide by default), writes 20
files of it (`.weights.h5`, or `.keras` with `--kind keras`), each with
other weights, then, in a fresh process (this script runs itself with
`--measure`), builds the model and makes the soup, measuring how much
memory the soup takes beyond what the process held before:

- the peak resident memory of the process (`VmHWM`, reset through
  `/proc/self/clear_refs` just before the soup; Linux only) over the
  resident memory before it (`VmRSS`): everything, the backend's tensors
  and what allocators cache included;
- the peak of the memory that Python's allocators hand out
  (`tracemalloc`: numpy's and h5py's arrays). On TensorFlow this also
  counts the model's own variables once an assignment has handed them the
  buffer of a numpy array (TensorFlow keeps the buffer rather than copying
  it): up to one copy of the model that is not memory added.

Both are printed in MiB and in copies of the model (its float32 bytes);
the script fails unless the soup's resident peak stays under 4 copies, and,
except on TensorFlow, its tracemalloc peak too. With `--greedy` it also
prints the figures of `greedy_soup` on a few validation samples, without a
limit: they add what the backend's `evaluate` and assignments cost (on JAX
alone, assigning all variables and evaluating, ten times, peaks at about
2.8 copies over before).

    KERAS_BACKEND=tensorflow python benchmarks/soup_memory.py --greedy
    KERAS_BACKEND=torch python benchmarks/soup_memory.py --files 20 --greedy
    KERAS_BACKEND=jax python benchmarks/soup_memory.py --kind keras
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MIB = 2**20
LIMIT = 4.0


def _status(field):
    """A `/proc/self/status` field in bytes (e.g. `VmRSS`), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak():
    """Resets `VmHWM` to the current resident memory (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _model(width, depth):
    import keras

    layers = [keras.Input((width,))]
    layers += [keras.layers.Dense(width) for _ in range(depth)]
    return keras.Sequential(layers)


def _measure(args):
    """In a fresh process: the soup's peaks, printed as JSON."""
    import numpy as np

    import keras_ema

    model = _model(args.width, args.depth)
    paths = sorted(os.path.join(args.folder, name)
                   for name in os.listdir(args.folder))
    if args.measure == "soup":
        def run():
            keras_ema.soup(paths, model)
    else:
        model.compile(loss="mse", jit_compile=False)
        x = np.ones((8, args.width), "float32")

        def run():
            keras_ema.greedy_soup(paths, model, (x, x), verbose=0)
    before = _status("VmRSS")
    reset = _reset_peak()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        run()
        _, traced = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    peak = _status("VmHWM") if reset else None
    print(json.dumps({
        "seconds": time.perf_counter() - start,
        "traced": traced,
        "resident": None if peak is None else max(0, peak - before),
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=5)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--kind", choices=["weights.h5", "keras"],
                        default="weights.h5")
    parser.add_argument("--greedy", action="store_true",
                        help="also measure greedy_soup")
    parser.add_argument("--folder", default=None,
                        help="where to write the files (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--measure", choices=["soup", "greedy"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.measure:
        _measure(args)
        return
    import keras
    import numpy as np

    model = _model(args.width, args.depth)
    size = sum(w.nbytes for w in model.get_weights())
    backend = keras.backend.backend()
    print(f"backend {backend}: {model.count_params() / 1e6:.1f}M parameters, "
          f"one copy {size / MIB:.1f} MiB; {args.files} .{args.kind} files")
    folder = args.folder or tempfile.mkdtemp(prefix="soup_memory_")
    worst = 0.0
    try:
        initial = model.get_weights()
        for i in range(args.files):
            model.set_weights([w + np.float32(0.001 * i) for w in initial])
            path = os.path.join(folder, f"{i:02d}.{args.kind}")
            if args.kind == "keras":
                model.save(path)
            else:
                model.save_weights(path)
        del initial, model
        for measure in ["soup"] + ["greedy"] * args.greedy:
            result = subprocess.run(
                [sys.executable, __file__, "--measure", measure,
                 "--folder", folder, "--width", str(args.width),
                 "--depth", str(args.depth)],
                capture_output=True, text=True, check=True,
            )
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{measure}: {figures['seconds']:.1f} s")
            ratios = []
            if figures["resident"] is not None:
                ratios.append(figures["resident"] / size)
                print(f"  resident peak over before "
                      f"{figures['resident'] / MIB:8.1f} MiB = "
                      f"{ratios[-1]:.2f} model copies")
            else:
                print("  resident peak: not available on this system")
            traced = figures["traced"] / size
            print(f"  tracemalloc peak          "
                  f"{figures['traced'] / MIB:8.1f} MiB = "
                  f"{traced:.2f} model copies")
            if backend != "tensorflow":
                ratios.append(traced)
            if measure == "soup":
                worst = max(ratios)
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"soup: {worst:.2f} model copies at most (limit {LIMIT})")
    assert worst < LIMIT, f"{worst:.2f} copies of the model, limit {LIMIT}"


if __name__ == "__main__":
    main()
