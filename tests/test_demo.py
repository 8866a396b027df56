"""The demo (`python -m keras_ema.demo`): real training, plot, export."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import BACKEND

from keras_ema import demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _summary_row(output, row):
    match = re.search(rf"^{row}\s+([\d.]+)\s+([\d.]+)\s+([-+][\d.]+)$",
                      output, re.MULTILINE)
    assert match, output
    return tuple(float(v) for v in match.groups())


def test_demo_prints_both_accuracies_writes_a_plot_and_the_averages(
    tmp_path, capsys
):
    assert demo.main(["--epochs", "2", "--output-dir", str(tmp_path)]) == 0
    output = capsys.readouterr().out

    for epoch in (1, 2):
        assert re.search(
            rf"^epoch +{epoch}  validation  accuracy raw [\d.]+ averaged "
            rf"[\d.]+  \|  loss raw [\d.]+ averaged [\d.]+$",
            output, re.MULTILINE,
        ), output
    raw, averaged, difference = _summary_row(output, "final accuracy")
    # Two epochs of real training on 10 classes: far above chance (0.1).
    assert 0.5 < raw <= 1 and 0.5 < averaged <= 1
    assert difference == pytest.approx(averaged - raw, abs=2e-4)
    best_raw, best_averaged, _ = _summary_row(output, "best accuracy")
    assert best_raw >= raw and best_averaged >= averaged
    _summary_row(output, "final loss")
    _summary_row(output, "best loss")

    png = tmp_path / "digits_ema.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    from matplotlib.image import imread

    height, width, _ = imread(png).shape
    assert (width, height) == (1000, 400)

    # The exported model holds the averages: it scores what the demo printed.
    exported = keras.models.load_model(tmp_path / "digits_ema.keras")
    exported.compile(loss="sparse_categorical_crossentropy",
                     metrics=["accuracy"])
    _, (x_val, y_val) = demo.load_digits(seed=0)
    _, accuracy = exported.evaluate(x_val, y_val, verbose=0)
    assert accuracy == pytest.approx(averaged, abs=5e-5)


@pytest.mark.parametrize("epochs", [1, 7, 20])
def test_the_plot_marks_the_first_and_last_epoch_and_names_the_backend(
    tmp_path, epochs
):
    history = {key: list(np.linspace(0.9, 0.1, epochs))
               for keys in demo._CURVES.values() for key in keys}
    args = demo._parser().parse_args([])
    figure = demo.plot(history, tmp_path / "curves.png",
                       title=demo.plot_title(args))
    for axes in figure.axes:
        ticks = list(axes.get_xticks())
        assert ticks[0] == 1 and ticks[-1] == epochs, ticks
        assert ticks == sorted(set(ticks))
    name = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}[
        keras.backend.backend()
    ]
    assert figure.get_suptitle().startswith(f"digits on {name}: SGD lr 0.05")


def test_demo_help_lists_its_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--epochs", "--decay", "--batch-size", "--learning-rate",
                 "--seed", "--output-dir", "--quiet"):
        assert flag in help_text


@pytest.mark.parametrize(
    "argv", [["--decay", "1.5"], ["--epochs", "0"], ["--batch-size", "-1"]]
)
def test_demo_rejects_invalid_flags_before_training(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo.main(argv)
    assert exit_info.value.code == 2
    assert "error: argument" in capsys.readouterr().err


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="the command line's output, the same on every backend; the demo "
    "itself runs on each in test_demo_prints_both_accuracies_... (JAX: "
    "tests/run_backends.py runs TensorFlow beside JAX then PyTorch, and "
    "TensorFlow's run is the longest)",
)
def test_demo_runs_as_a_module_and_quiet_prints_only_the_summary(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "keras_ema.demo", "--epochs", "1", "--quiet",
         "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr
    assert "final accuracy" in result.stdout
    assert "epoch   1" not in result.stdout
    assert "━" not in result.stdout  # no progress bar
    assert (tmp_path / "out" / "digits_ema.png").is_file()
    assert (tmp_path / "out" / "digits_ema.keras").is_file()


def test_keras_ema_and_the_demo_import_without_sklearn_and_matplotlib():
    # Keras imports both when they are installed, so hide them instead.
    code = (
        "import sys; sys.modules['sklearn'] = None; "
        "sys.modules['matplotlib'] = None; "
        "import keras_ema, keras_ema.demo; print('imported')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True,
        timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported"


def test_summarize_takes_the_last_epoch_and_the_best_one():
    history = {
        "val_raw_accuracy": [0.5, 0.9, 0.7],
        "val_accuracy": [0.6, 0.8, 0.85],
        "val_raw_loss": [1.0, 0.2, 0.6],
        "val_loss": [0.9, 0.3, 0.25],
    }
    summary = demo.summarize(history)
    assert summary["accuracy"] == {
        "raw": {"final": 0.7, "best": 0.9},
        "averaged": {"final": 0.85, "best": 0.85},
    }
    assert summary["loss"] == {
        "raw": {"final": 0.6, "best": 0.2},
        "averaged": {"final": 0.25, "best": 0.25},
    }
    table = demo.format_summary(summary)
    assert re.search(r"^best loss\s+0\.2000\s+0\.2500\s+\+0\.0500$", table,
                     re.MULTILINE), table


def test_load_digits_is_a_stratified_split_of_all_images():
    (x_train, y_train), (x_val, y_val) = demo.load_digits(seed=3)
    assert x_train.shape[1:] == (8, 8, 1) and x_train.dtype == np.float32
    assert len(x_train) + len(x_val) == 1797
    assert len(x_val) == 450
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0
    # Stratified: each class holds out a quarter of its images, rounded.
    per_class = np.bincount(np.concatenate([y_train, y_val]))
    assert np.all(np.abs(np.bincount(y_val) - per_class / 4) < 1)
