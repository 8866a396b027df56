"""`soup`, `greedy_soup` and `python -m keras_ema soup`: averages of the
model weights of real files written by real training, checked against
numpy."""

import os
import re
import subprocess
import sys
import tracemalloc
import zipfile

import keras
import numpy as np
import pytest

import keras_ema
from keras_ema.__main__ import main

from conftest import BACKEND
from conftest import bits
from conftest import regression_data
from conftest import small_model

X, Y = regression_data(64)
X_VAL, Y_VAL = regression_data(32, seed=1)


def _compiled(model, optimizer="sgd"):
    # No XLA: compiling it would cost more than these tiny runs.
    model.compile(optimizer=optimizer, loss="mse",
                  metrics=[keras.metrics.R2Score()], jit_compile=False)
    return model


def _read_back(path):
    """What Keras itself loads from `path`: the weights of a fresh model."""
    model = small_model(batchnorm=True)
    model.load_weights(path)
    return model.get_weights()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three fine-tunings of one trained model, written as `ModelCheckpoint`
    and `model.save` / `save_weights` write them (with their optimizer's
    variables; one with an `ExponentialMovingAverage` and its averages),
    then a model trained alone on other targets, which spoils any soup.
    Returns `(paths, weights read back by Keras)`."""
    folder = tmp_path_factory.mktemp("soup")
    keras.utils.set_random_seed(0)
    base = _compiled(small_model(batchnorm=True), keras.optimizers.Adam(0.05))
    base.fit(X, Y, epochs=30, batch_size=16, verbose=0)
    paths = []
    for i, (name, optimizer) in enumerate([
        ("ema.keras", keras_ema.ExponentialMovingAverage(
            keras.optimizers.SGD(0.1, momentum=0.5), average_decay=0.9)),
        ("momentum.weights.h5", keras.optimizers.SGD(0.1, momentum=0.5)),
        ("checkpoint.keras", keras.optimizers.SGD(0.1, momentum=0.5)),
    ]):
        keras.utils.set_random_seed(10 + i)
        tuned = _compiled(small_model(batchnorm=True), optimizer)
        tuned.set_weights(base.get_weights())
        # A high learning rate: each run ends elsewhere around the
        # minimum, where an average of two is closer than either.
        tuned.fit(X, Y, epochs=2, batch_size=8, verbose=0)
        path = str(folder / name)
        checkpoint = keras.callbacks.ModelCheckpoint(
            path, save_weights_only=name.endswith(".weights.h5"))
        checkpoint.set_model(tuned)
        checkpoint.on_epoch_end(0, logs={})
        paths.append(path)
    keras.utils.set_random_seed(99)
    other = _compiled(small_model(batchnorm=True))
    other.fit(X, -3.0 * Y, epochs=2, batch_size=16, verbose=0)
    paths.append(str(folder / "other.weights.h5"))
    other.save_weights(paths[-1])
    return paths, [_read_back(path) for path in paths]


def _numpy_soup(weights, coefficients=None):
    """The weighted mean of lists of arrays, in float64, as float32."""
    coefficients = coefficients or [1.0] * len(weights)
    total = sum(coefficients)
    return [
        (sum(c * w.astype("float64") for c, w in zip(coefficients, ws))
         / total).astype(ws[0].dtype)
        for ws in zip(*weights)
    ]


def _assert_bits(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(bits(a), bits(e))


def test_uniform_soup_of_three_files_is_the_numpy_mean_of_their_weights(
    files
):
    paths, weights = files
    model = small_model(batchnorm=True)
    assert keras_ema.soup(paths[:3], model) is model
    soup = model.get_weights()
    # Every weight, BatchNorm's moving statistics included.
    _assert_bits(soup, _numpy_soup(weights[:3]))
    for value, *each in zip(soup, *weights[:3]):
        np.testing.assert_allclose(value, np.mean(each, axis=0), rtol=1e-6,
                                   atol=1e-7)
        assert not np.array_equal(value, each[0])


def test_weighted_soup_weighs_each_file(files):
    paths, weights = files
    model = small_model(batchnorm=True)
    keras_ema.soup(paths[:3], model, weights=[1, 0, 3.5])
    _assert_bits(model.get_weights(),
                 _numpy_soup(weights[:3], [1.0, 0.0, 3.5]))


def test_a_file_with_an_ema_optimizer_gives_its_model_weights_not_averages(
    files
):
    paths, weights = files
    trained = keras.models.load_model(paths[0])
    opt = trained.optimizer
    with opt.averaged_weights():
        averages = trained.get_weights()
    assert not np.array_equal(averages[0], weights[0][0])
    model = small_model(batchnorm=True)
    keras_ema.soup(paths[:1], model)
    _assert_bits(model.get_weights(), weights[0])


def _greedy_in_numpy(paths, weights, metric, higher):
    """Wortsman et al.'s greedy soup, scored on a model of its own."""
    judge = _compiled(small_model(batchnorm=True))

    def score(values):
        judge.set_weights(values)
        return judge.evaluate(X_VAL, Y_VAL, verbose=0,
                              return_dict=True)[metric]

    scores = [score(w) for w in weights]
    order = sorted(range(len(paths)), key=lambda i: -scores[i] if higher
                   else scores[i])
    kept, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        tried = score(_numpy_soup([weights[j] for j in kept + [i]]))
        if (tried >= best) if higher else (tried <= best):
            kept, best = kept + [i], tried
    return [paths[i] for i in kept], scores, best, _numpy_soup(
        [weights[j] for j in kept])


@pytest.mark.parametrize("metric, higher", [("loss", False),
                                            ("r2_score", True)])
def test_greedy_soup_keeps_what_the_rule_in_numpy_keeps(
    files, metric, higher, capsys
):
    paths, weights = files
    kept, scores, best, soup = _greedy_in_numpy(paths, weights, metric,
                                                higher)
    # The test means something only if the rule both keeps and refuses.
    assert 1 < len(kept) < len(paths)
    model = _compiled(small_model(batchnorm=True))
    result = keras_ema.greedy_soup(paths, model, (X_VAL, Y_VAL), metric)
    assert result.kept == kept
    assert [row["file"] for row in result.results][: len(kept)][0] == kept[0]
    for row in result.results:
        np.testing.assert_allclose(row["score"], scores[paths.index(
            row["file"])], rtol=1e-6)
        assert row["kept"] == (row["file"] in kept)
    np.testing.assert_allclose(result.score, best, rtol=1e-6)
    _assert_bits(model.get_weights(), soup)
    table = capsys.readouterr().out
    assert table == result.table() + "\n"
    assert f"soup of {len(kept)}" in table
    assert len(table.splitlines()) == len(paths) + 2


def test_greedy_soup_with_update_bn_ends_with_the_soup_s_statistics(files):
    paths, _ = files
    model = _compiled(small_model(batchnorm=True))
    result = keras_ema.greedy_soup(paths, model, (X_VAL, Y_VAL),
                                   update_bn=X, verbose=0)
    expected = keras_ema.soup(result.kept, small_model(batchnorm=True),
                              update_bn=X)
    _assert_bits(model.get_weights(), expected.get_weights())
    judge = _compiled(small_model(batchnorm=True))
    judge.set_weights(expected.get_weights())
    np.testing.assert_allclose(
        result.score,
        judge.evaluate(X_VAL, Y_VAL, verbose=0, return_dict=True)["loss"],
        rtol=1e-6)


def test_greedy_soup_restores_the_model_after_an_interrupt(files):
    paths, _ = files
    model = _compiled(small_model(batchnorm=True))
    before = [bits(v) for v in model.get_weights()]
    calls = []

    def validation_data():
        calls.append(1)
        if len(calls) == 6:  # while trying the second soup
            raise KeyboardInterrupt
        return X_VAL, Y_VAL

    with pytest.raises(KeyboardInterrupt):
        keras_ema.greedy_soup(paths, model, validation_data, verbose=0)
    assert len(calls) == 6
    _assert_bits(model.get_weights(), before)
    with pytest.raises(ValueError, match="does not know metric='nope'"):
        keras_ema.greedy_soup(paths, model, (X_VAL, Y_VAL), "nope")
    _assert_bits(model.get_weights(), before)
    # Every evaluation would need a pass over it.
    with pytest.raises(ValueError, match="does not support an iterator"):
        keras_ema.greedy_soup(paths, model, (X_VAL, Y_VAL),
                              update_bn=iter([X]))


def test_update_bn_recomputes_the_soup_s_statistics(files):
    paths, _ = files
    expected = small_model(batchnorm=True)
    keras_ema.soup(paths[:3], expected)
    averaged = expected.get_weights()
    keras_ema.update_bn(expected, X)
    model = small_model(batchnorm=True)
    keras_ema.soup(paths[:3], model, update_bn=X)
    _assert_bits(model.get_weights(), expected.get_weights())
    # Moving mean, moving variance: recomputed, no longer the averages.
    for i in (4, 5):
        assert not np.array_equal(model.get_weights()[i], averaged[i])

    def interrupted():
        yield X[:16]
        raise KeyboardInterrupt

    fresh = small_model(batchnorm=True)
    before = [bits(v) for v in fresh.get_weights()]
    with pytest.raises(KeyboardInterrupt):
        keras_ema.soup(paths[:3], fresh, update_bn=interrupted())
    _assert_bits(fresh.get_weights(), before)


def _write_mismatch(path, case):
    model = {
        "shape": keras.Sequential([
            keras.Input((4,)), keras.layers.Dense(9, activation="relu"),
            keras.layers.BatchNormalization(), keras.layers.Dense(1)]),
        "extra layer": keras.Sequential([
            keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
            keras.layers.BatchNormalization(), keras.layers.Dense(1),
            keras.layers.Dense(1)]),
        "missing": small_model(batchnorm=False),
    }[case]
    model.save(path) if path.endswith(".keras") else model.save_weights(path)


@pytest.mark.parametrize("case, message", [
    ("shape", r"layers/dense/vars/0 has shape \(4, 9\) where the model's "
              r"\S*dense\S*/kernel has \(4, 8\)"),
    ("extra layer", r"layers/dense_2/vars/0 is not in the model"),
    ("missing", r"layers/batch_normalization/vars/0 "
                r"\(\S*batch_normalization\S*/gamma\) is missing"),
])
def test_files_that_do_not_match_are_refused_before_anything_is_written(
    files, tmp_path, case, message
):
    paths, _ = files
    name = "bad.keras" if case == "shape" else "bad.weights.h5"
    bad = str(tmp_path / name)
    _write_mismatch(bad, case)
    model = _compiled(small_model(batchnorm=True))
    before = [bits(v) for v in model.get_weights()]
    for call in (keras_ema.soup, lambda f, m: keras_ema.greedy_soup(
            f, m, (X_VAL, Y_VAL))):
        with pytest.raises(ValueError) as error:
            call([*paths[:2], bad], model)
        text = str(error.value)
        assert "does not support files whose variables differ" in text
        assert repr(bad) in text and "Instead," in text
        assert re.search(message, text), text
        _assert_bits(model.get_weights(), before)


@pytest.mark.parametrize("case, message", [
    ("empty", "an empty list of files"),
    ("string", "requires a list of files"),
    ("missing file", "found no file"),
    ("kind", "does not support the file type"),
    ("not a zip", "not Keras archives"),
    ("not hdf5", "not HDF5 weights"),
    ("npz", "weights_format='npz'"),
    ("unbuilt", "not a built `keras.Model`"),
    ("weights length", "one non-negative number per file"),
    ("negative weight", "one non-negative number per file"),
    ("nan weight", "one non-negative number per file"),
    ("zero weights", "not all zero"),
    ("bool weight", "one non-negative number per file"),
    ("update_bn without BatchNorm", "without BatchNormalization layers"),
])
def test_bad_input_is_refused_and_the_model_left_as_it_was(
    files, tmp_path, case, message
):
    paths = files[0][:2]
    model = small_model(batchnorm=case != "update_bn without BatchNorm")
    kwargs = {}
    if case == "empty":
        paths = []
    elif case == "string":
        paths = paths[0]
    elif case == "missing file":
        paths = [paths[0], str(tmp_path / "missing.keras")]
    elif case == "kind":
        paths = [paths[0], str(tmp_path / "model.h5")]
    elif case in ("not a zip", "not hdf5"):
        name = "x.keras" if case == "not a zip" else "x.weights.h5"
        path = tmp_path / name
        path.write_bytes(b"not a model")
        paths = [paths[0], str(path)]
    elif case == "npz":
        path = tmp_path / "npz.keras"
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("config.json", "{}")
            archive.writestr("model.weights.npz", b"")
        paths = [paths[0], str(path)]
    elif case == "unbuilt":
        model = keras.Sequential([keras.layers.Dense(1)])
    elif case == "update_bn without BatchNorm":
        kwargs["update_bn"] = X
    else:
        kwargs["weights"] = {
            "weights length": [1.0], "negative weight": [1.0, -1.0],
            "nan weight": [1.0, float("nan")], "zero weights": [0, 0.0],
            "bool weight": [True, 1.0],
        }[case]
    before = [bits(v) for v in model.get_weights()]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        keras_ema.soup(paths, model, **kwargs)
    _assert_bits(model.get_weights(), before)


class _Counted(keras.layers.Layer):
    """A layer with an integer variable, as some preprocessing layers have."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones",
                                     name="scale")
        self.count = self.add_weight(shape=(2,), dtype="int32",
                                     initializer="zeros", trainable=False,
                                     name="count")

    def call(self, x):
        return x * self.scale


def _counted(scale, count):
    model = keras.Sequential([keras.Input((3,)), _Counted()])
    model.set_weights([np.float32(scale), np.array(count, "int32")])
    return model


def test_integer_variables_are_taken_when_equal_and_refused_when_not(
    tmp_path
):
    paths = []
    for i, (scale, count) in enumerate([(1.0, [7, 8]), (2.0, [7, 8]),
                                        (4.5, [7, 9])]):
        paths.append(str(tmp_path / f"{i}.weights.h5"))
        _counted(scale, count).save_weights(paths[-1])
    model = _counted(0.0, [0, 0])
    keras_ema.soup(paths[:2], model)
    scale, count = model.get_weights()
    assert scale == np.float32(1.5) and count.tolist() == [7, 8]
    model = _counted(0.0, [0, 0])
    with pytest.raises(ValueError, match=r"vars/1 \(\S*/count, int32\) "
                       r"differs between .*1\.weights\.h5.* and .*2\."):
        keras_ema.soup(paths[1:], model)
    assert model.get_weights()[1].tolist() == [0, 0]


def test_memory_stays_under_four_copies_of_the_model(tmp_path):
    # 1M float32 parameters: 4 MB. Six files.
    model = keras.Sequential([keras.Input((1000,)), keras.layers.Dense(1000)])
    size = sum(w.nbytes for w in model.get_weights())
    paths = []
    for i in range(6):
        model.set_weights([w + i for w in model.get_weights()])
        paths.append(str(tmp_path / f"{i}.weights.h5"))
        model.save_weights(paths[-1])
    tracemalloc.start()
    try:
        keras_ema.soup(paths, model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * size, peak / size


def test_the_command_line_refuses_with_one_line_and_exit_code_2(
    files, tmp_path, capsys
):
    paths, _ = files
    bad = str(tmp_path / "bad.keras")
    _write_mismatch(bad, "shape")
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a model")
    out = str(tmp_path / "soup.keras")
    for argv, message in [
        ([out, *paths[:2], bad], "variables differ from the model's"),
        ([out, str(garbage), *paths[:2]], "not Keras archives"),
        ([out, paths[1], paths[3]], "`.weights.h5` files alone"),
        ([str(tmp_path / "soup.h5"), *paths[:2]], "file type of OUT"),
        ([paths[0], *paths[:2]], "writing over one of FILES"),
        ([out, paths[0], "--weights", "1", "-1"], "non-negative number"),
    ]:
        assert main(["soup", *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert len(captured.err.splitlines()) == 1
        assert captured.err.startswith("python -m keras_ema soup: error: ")
        assert message in captured.err
        assert not os.path.exists(out)
    assert sorted(os.listdir(tmp_path)) == ["bad.keras", "garbage.keras"]


@pytest.mark.skipif(
    BACKEND != "jax",
    reason="the command line in a process of its own, the same on every "
    "backend (JAX: TensorFlow's run of the suite is the longest)",
)
def test_the_command_line_writes_a_plain_model_that_loads(files, tmp_path):
    paths, weights = files
    out = str(tmp_path / "soup.keras")
    result = subprocess.run(
        [sys.executable, "-m", "keras_ema", "soup", out, *paths[:3],
         "--weights", "1", "2", "1"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"wrote {out}: the weighted soup of 3")
    loaded = keras.models.load_model(out)
    assert getattr(loaded, "optimizer", None) is None
    assert not loaded.compiled
    _assert_bits(loaded.get_weights(), _numpy_soup(weights[:3], [1, 2, 1]))
