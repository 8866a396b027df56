"""A check run by hand, not by pytest: the teacher under torch.compile.

`KERAS_BACKEND=torch python tests/check_torch_compile_teacher.py` trains the
mean-teacher example with `jit_compile=True` (torch.compile; its first step
compiles for about a minute on 2 CPU cores, too long for the suite) and
prints, for three steps, the consistency the compiled step logged next to
the one computed eagerly from the swapped-in averages of that step.
"""

import time

import keras
import numpy as np

from keras_ema.examples import mean_teacher


def main():
    keras.utils.set_random_seed(0)
    model = mean_teacher.build(steps=40, jit_compile=True)
    opt = model.optimizer
    rng = np.random.default_rng(0)
    x = rng.random((64, 8, 8, 1), dtype="float32")
    y = rng.integers(0, 10, 64)
    start = time.perf_counter()
    model.train_on_batch(x, y)
    print(f"first step (compiles): {time.perf_counter() - start:.1f} s")
    for _ in range(3):
        with opt.averaged_weights():
            teacher = keras.ops.convert_to_numpy(model(x, training=False))
        student = keras.ops.convert_to_numpy(model(x, training=True))
        expected = float(np.mean((student - teacher) ** 2))
        logs = model.train_on_batch(x, y, return_dict=True)
        print(f"in-step consistency {logs['consistency']:.9g}, "
              f"eager {expected:.9g}")


if __name__ == "__main__":
    main()
