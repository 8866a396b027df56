"""`python -m keras_ema.compare_demo`: every average of one seed, side by side."""

import os
import re

import pytest

from keras_ema import compare_demo
from keras_ema import demo
from conftest import BACKEND

pytestmark = pytest.mark.skipif(
    BACKEND != "jax",
    reason="the demo's program on one backend: two trainings per run; "
    "its averages are tested on every backend by their own tests (JAX: "
    "TensorFlow's run of the suite is the longest)",
)

_ROW = re.compile(
    r"^(.+?) +(\d\.\d{4}) +(\d+\.\d{4}) +([+-]\d\.\d{4}) +(\d\.\d{4}|-)$",
    re.MULTILINE)


def test_compare_demo_prints_every_average_beside_the_raw_weights(
        tmp_path, capsys):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    # An earlier run's checkpoint: of other weights, removed.
    (out / "checkpoints" / "checkpoint-0000009999.weights.h5").write_bytes(
        b"from an earlier run")
    assert demo.main(["--compare", "--epochs", "4", "--output-dir",
                      str(out)]) == 0
    output = capsys.readouterr().out
    rows = {name.strip(): (float(a), float(loss), float(gain))
            for name, a, loss, gain, _ in _ROW.findall(output)}
    early = [e for *_, e in _ROW.findall(output)]
    # After epoch 3 of 4: raw, EMA and BEMA; LAWA and post-hoc keep no such.
    assert early[3:] == ["-", "-"]
    assert all(0.3 < float(e) <= 1 for e in early[:3])
    names = list(rows)
    assert names[:4] == [
        "raw", f"EMA (decay {compare_demo.EMA_DECAY})", "BEMA (TRL's defaults)",
        f"LAWA (last {compare_demo.LAWA_K}, every {compare_demo.LAWA_EVERY} "
        "epochs)"]
    assert re.fullmatch(r"post-hoc \(best sigma_rel [\d.]+\)", names[4])
    raw = rows["raw"][0]
    for accuracy, loss, gain in rows.values():
        # Four epochs of real training on 10 classes: far above chance.
        assert 0.5 < accuracy <= 1 and 0 < loss < 2
        assert gain == pytest.approx(accuracy - raw, abs=2e-4)
    assert "Both runs trained the same raw weights." in output
    # 4 epochs of 85 updates, a checkpoint every 2 epochs: 2 of them.
    assert sorted(os.listdir(out / "checkpoints")) == [
        "checkpoint-0000000170.weights.h5", "checkpoint-0000000340.weights.h5"]
