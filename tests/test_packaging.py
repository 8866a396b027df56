"""What the package says of itself is true: versions, license, changelog,
classifiers, and the commands README.md and CI run."""

import configparser
import pathlib
import re

import keras
import pytest

import keras_ema

ROOT = pathlib.Path(__file__).resolve().parents[1]
SETUP = configparser.ConfigParser()
SETUP.read(ROOT / "setup.cfg")
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="the files are the same on every backend; checked once",
)


def _lines(section, key):
    return [line.strip() for line in SETUP[section][key].splitlines()
            if line.strip()]


def floor(requirement, lines):
    """The version after `requirement>=` in `lines`."""
    (version,) = [line.split(">=")[1] for line in lines
                  if re.fullmatch(rf"{requirement}>=[\d.]+", line)]
    return version


def test_every_classifier_exists_and_the_python_versions_match():
    from trove_classifiers import classifiers

    listed = _lines("metadata", "classifiers")
    assert [c for c in listed if c not in classifiers] == []
    pythons = sorted(
        (int(c.split(".")[-1]) for c in listed
         if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c))
    )
    assert SETUP["options"]["python_requires"] == f">=3.{pythons[0]}"
    assert f"Python 3.{pythons[0]} to 3.{pythons[-1]}" in README


def test_the_license_is_apache_2_and_ships():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert SETUP["metadata"]["license"] == "Apache-2.0"
    assert SETUP["metadata"]["license_files"] == "LICENSE"


def test_the_changelog_starts_with_this_version():
    changelog = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (\d+\.\d+\.\d+)", changelog, re.MULTILINE)
    assert versions[0] == keras_ema.__version__
    assert len(set(versions)) == len(versions)


def test_the_readme_states_the_floor_that_setup_cfg_enforces():
    keras_floor = floor("keras", _lines("options", "install_requires"))
    tensorflow_floor = floor(
        "tensorflow", _lines("options.extras_require", "tensorflow")
    )
    assert tensorflow_floor == floor(
        "tensorflow", _lines("options.extras_require", "test")
    )
    assert f"Keras {keras_floor} or later" in README
    assert f"Keras {keras_floor} with TensorFlow {tensorflow_floor}" in README


def test_ci_runs_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, re.DOTALL)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert demo.startswith("pip install -e ") and "keras_ema.demo" in demo
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci


def test_the_backend_extras_state_floors_and_the_tests_pin_the_cpu_build():
    extras = "options.extras_require"
    # A pin in a user's extra replaces the PyTorch they have (often a CUDA
    # build); only the test environment pins, to PyTorch's CPU build.
    for backend in ("tensorflow", "jax", "torch"):
        (requirement,) = _lines(extras, backend)
        assert re.fullmatch(rf"{backend}>=[\d.]+", requirement), requirement
    assert "torch==2.13.0" in _lines(extras, "test")
    jax_floor = floor("jax", _lines(extras, "jax"))
    assert jax_floor == floor("jax", _lines(extras, "test"))
    assert f"JAX {jax_floor} or later" in README
    assert f"with JAX {jax_floor} (`.ci/floor`)" in README
    assert f"PyTorch {floor('torch', _lines(extras, 'torch'))} or later" in README
    assert "pinned to the CPU build of 2.13.0, for the tests only" in README


def test_ci_runs_the_floor_from_the_wheel_and_checks_the_torch_extra():
    ci = (ROOT / ".ci" / "run").read_text()
    floor_script = (ROOT / ".ci" / "floor").read_text()
    assert "bash .ci/floor" in ci and "bash .ci/torch-extra" in ci
    assert 'bash .ci/wheel "$venv/bin/python"' in floor_script
    assert "KERAS_BACKEND=jax" in floor_script
    assert ".ci/smoke.py" in floor_script
