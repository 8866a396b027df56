"""The post-hoc EMA demo (`python -m keras_ema.posthoc_demo`): real training,
the sweep's table, the plot and the exported best average."""

import json
import os
import re
import zipfile

import keras
import numpy as np
import pytest

from conftest import predict_without_keras_ema

import keras_ema
from keras_ema import demo
from keras_ema import posthoc_demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

def _table(output):
    """`{sigma_rel: (accuracy, loss, best?)}` and the raw row's numbers."""
    rows = {}
    for s, accuracy, loss, mark in re.findall(
        r"^ +(0\.\d{3}) +(\d\.\d{4}) +(\d+\.\d{4})( +<- best)?$",
        output, re.MULTILINE,
    ):
        rows[float(s)] = (float(accuracy), float(loss), bool(mark))
    raw = re.search(r"^raw +(\d\.\d{4}) +(\d+\.\d{4})$", output, re.MULTILINE)
    assert raw, output
    return rows, (float(raw.group(1)), float(raw.group(2)))


def test_posthoc_demo_sweeps_every_width_and_exports_the_best(
        tmp_path, capsys):
    out = tmp_path / "out"
    # What an earlier run left: its snapshots go, other files stay.
    (out / "snapshots").mkdir(parents=True)
    for stale in ("snapshot-0000009999.npz",
                  "snapshot-0000000008.npz.abandoned"):
        (out / "snapshots" / stale).write_bytes(b"from an earlier run")
    (out / "snapshots" / "notes.txt").write_text("kept")
    assert posthoc_demo.main(
        ["--epochs", "2", "--quiet", "--output-dir", str(out)]) == 0
    output = capsys.readouterr().out

    assert re.search(r"^sigma_rel +accuracy +loss$", output, re.MULTILINE)
    rows, (raw_accuracy, raw_loss) = _table(output)
    assert sorted(rows) == sorted(posthoc_demo.SWEPT)
    # Two epochs of real training on 10 classes: far above chance (0.1).
    assert all(0.5 < a <= 1 and 0 < loss < 2 for a, loss, _ in rows.values())
    assert 0.5 < raw_accuracy <= 1 and 0 < raw_loss < 2
    marked = [s for s, (*_, best) in rows.items() if best]
    assert len(marked) == 1
    best = marked[0]
    assert rows[best][0] == max(a for a, _, _ in rows.values())
    assert f"Best: sigma_rel {best:g}, validation accuracy " \
           f"{rows[best][0]:.4f} against {raw_accuracy:.4f} for the raw " \
           f"weights ({rows[best][0] - raw_accuracy:+.4f})." in output
    assert "Epoch 1/2" not in output  # --quiet

    # 2 x 85 updates, a snapshot every round(170 / 20) = 8 and at the end.
    assert sorted(os.listdir(out / "snapshots")) == ["notes.txt"] + [
        f"snapshot-{step:010d}.npz" for step in [*range(8, 170, 8), 170]
    ]
    assert "a snapshot every 8 updates" in output
    assert (out / "posthoc_sweep.png").read_bytes().startswith(PNG_SIGNATURE)

    # The exported file is the best width's synthesis, weight for weight: a
    # fresh model given that synthesis predicts exactly like it.
    path = out / "digits_posthoc_ema.keras"
    with zipfile.ZipFile(path) as archive:
        config = json.loads(archive.read("config.json"))
    assert "compile_config" not in config or not config["compile_config"]
    assert "keras_ema" not in json.dumps(config)
    exported = keras.models.load_model(path)
    synthesized = demo.build_model()
    keras_ema.synthesize(out / "snapshots", synthesized, best)
    # Every variable of the CNN is averaged: the synthesis writes them all.
    assert len(exported.get_weights()) == len(synthesized.variables) == 8
    for a, b in zip(exported.get_weights(), synthesized.get_weights()):
        np.testing.assert_array_equal(a, b)
    _, (x_val, y_val) = demo.load_digits(seed=0)
    predictions = exported.predict(x_val, verbose=0)
    np.testing.assert_array_equal(
        predictions, synthesized.predict(x_val, verbose=0))
    # And it scores what the table printed for that width.
    accuracy = np.mean(np.argmax(predictions, axis=1) == y_val)
    assert accuracy == pytest.approx(rows[best][0], abs=5e-5)

    np.testing.assert_array_equal(
        predict_without_keras_ema(path, x_val, tmp_path), predictions)


def test_demo_posthoc_forwards_the_other_arguments(capsys):
    # In-process: `python -m keras_ema.demo` is `demo.main()`.
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--posthoc", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m keras_ema.posthoc_demo")
    for flag in ("--epochs", "--batch-size", "--learning-rate", "--seed",
                 "--output-dir", "--quiet"):
        assert flag in out
    assert "--decay" not in out
    assert "keras_ema_posthoc_demo" in out  # its own default
