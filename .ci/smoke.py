"""Usage: python .ci/smoke.py README, from an empty folder outside the
checkout, with keras-ema installed from its wheel. Runs what a user runs
first: the import, the README's quick start, the export command on the file
it wrote, the demo for one epoch and the post-hoc demo's --help, each from
the installed wheel (not from the source tree)."""

import contextlib
import io
import pathlib
import re
import runpy
import sys
import sysconfig

import keras
import numpy as np

import keras_ema

site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
where = pathlib.Path(keras_ema.__file__).resolve()
if site not in where.parents:
    sys.exit(f"smoke: keras_ema imports from {where}, not from the installed "
             f"wheel in {site}. Instead, run this outside the checkout.")
print(f"smoke: import keras_ema {keras_ema.__version__} from {where.parent}")

readme = pathlib.Path(sys.argv[1]).read_text()
(quick_start,) = re.findall(
    r"\[start:quickstart\].*?```python\n(.*?)```", readme, re.DOTALL
)
exec(compile(quick_start, "README.md (quick start)", "exec"), {})
print("smoke: README quick start ran")


def run(module, *args):
    """`python -m MODULE ARGS` as Python runs it (runpy), with its output;
    in this process, since a new one would import TensorFlow again (about
    8 seconds of CPU each)."""
    sys.argv = [module, *args]
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code
    if code:
        sys.exit(f"smoke: python -m {' '.join([module, *args])} failed "
                 f"(exit {code}):\n{output.getvalue()}")
    return output.getvalue()


run("keras_ema", "export", "training.keras", "exported.keras")
exported = keras.models.load_model("exported.keras").get_weights()
averaged = keras.models.load_model("averaged.keras").get_weights()
if len(exported) != len(averaged) or not all(
        np.array_equal(a, b) for a, b in zip(exported, averaged)):
    sys.exit("smoke: `python -m keras_ema export` wrote other weights than "
             "export_averaged.")
print("smoke: python -m keras_ema export wrote export_averaged's weights")

run("keras_ema.demo", "--epochs", "1", "--quiet")
for name in ("digits_ema.png", "digits_ema.keras"):
    if not (pathlib.Path("keras_ema_demo") / name).is_file():
        sys.exit(f"smoke: the demo wrote no keras_ema_demo/{name}.")
print("smoke: python -m keras_ema.demo --epochs 1 wrote its plot and model")

if not run("keras_ema.posthoc_demo", "--help").startswith("usage:"):
    sys.exit("smoke: python -m keras_ema.posthoc_demo --help printed no usage.")
print("smoke: python -m keras_ema.posthoc_demo --help")
