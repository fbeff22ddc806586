"""``jsoftmax train`` end to end, its bad-data and bad-argument errors, and ``jsoftmax bench``.

The command runs in-process through ``main([...])`` (fast, output captured by
capsys) and once as ``python -m jsoftmax`` for the real entry point. The
default optimiser is optax's adam, which is not clean under the strict dtype
promotion conftest.py turns on, so these tests run under standard promotion.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from jsoftmax import _cli, _data  # noqa: E402
from jsoftmax._cli import main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


def three_class_table(n_per_class=20, seed=0):
    """A small, nearly separable 3-class problem with string labels."""
    rng = np.random.default_rng(seed)
    centers = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    x = np.concatenate([c + 0.7 * rng.standard_normal((n_per_class, 3)) for c in centers])
    labels = np.repeat(np.array(["bird", "cat", "dog"]), n_per_class)
    return x, labels


def check_outputs(out):
    assert sorted(p.name for p in out.iterdir() if p.name in _cli.OUTPUT_FILES) == sorted(
        _cli.OUTPUT_FILES
    )
    for png in ("loss_curve.png", "confusion_matrix.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    return json.loads((out / "metrics.json").read_text())


# --- end to end -----------------------------------------------------------------------------


def test_default_run_on_digits_meets_the_accuracy_goal(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    metrics = check_outputs(out)

    for key in ("train_accuracy", "test_accuracy", "final_loss", "epochs", "seconds"):
        assert key in metrics
    assert metrics["dataset"] == "digits" and metrics["optimizer"] == "adam"
    assert (metrics["n_train"], metrics["n_test"]) == (1437, 360)
    assert metrics["test_accuracy"] >= 0.97  # scikit-learn: 0.9722 on this split
    assert metrics["train_accuracy"] >= 0.99
    assert 0 < metrics["final_loss"] < 0.2 and 0 < metrics["test_loss"] < 0.3
    assert metrics["epochs"] == len(metrics["history"]["loss"]) == 50
    assert 0 < metrics["seconds"] < 10  # training after compilation; about 0.2 s
    assert metrics["compile_seconds"] > 0 and metrics["total_seconds"] >= metrics["seconds"]
    assert np.sum(metrics["confusion_matrix"]) == 360
    assert metrics["sklearn"] is None

    assert f"accuracy {metrics['test_accuracy']:.4f}" in stdout
    assert "s training" in stdout and "compiling" in stdout and str(out) in stdout

    # the saved parameters and standardisation reproduce the test accuracy
    saved = np.load(out / "params.npz")
    assert saved["w"].shape == (64, 10) and saved["b"].shape == (10,)
    split = _data.split(_data.load_builtin("digits"), 0.2, seed=42)
    np.testing.assert_allclose(saved["mean"], split.mean)
    predicted = np.argmax(split.x_test @ saved["w"] + saved["b"], axis=1)
    assert np.mean(predicted == split.y_test) == pytest.approx(metrics["test_accuracy"])
    assert list(saved["class_names"]) == [str(k) for k in range(10)]


def test_csv_with_lbfgs_and_compare_sklearn_into_an_existing_out(tmp_path, capsys):
    x, labels = three_class_table()
    rows = [f"{a},{b},{c},{label}" for (a, b, c), label in zip(x, labels, strict=True)]
    data = tmp_path / "animals.csv"
    data.write_text("f1,f2,f3,species\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "metrics.json").write_text("{}")

    argv = ["train", "--data", str(data), "--label-column", "species", "--optimizer", "lbfgs"]
    argv += ["--epochs", "40", "--l2", "0.01", "--seed", "3", "--test-size", "0.25"]
    argv += ["--compare-sklearn", "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    metrics = check_outputs(out)
    assert (out / "notes.txt").read_text() == "mine"  # other files are left alone

    assert metrics["dataset"] == str(data)
    assert metrics["class_names"] == ["bird", "cat", "dog"]
    assert (metrics["n_train"], metrics["n_test"]) == (45, 15)
    assert metrics["optimizer"] == "lbfgs" and metrics["batch_size"] == 0
    assert metrics["test_accuracy"] >= 0.8
    sk = metrics["sklearn"]
    assert sk["C"] == pytest.approx(1.0 / (0.01 * 45))
    assert 0.0 <= sk["test_accuracy"] <= 1.0 and sk["seconds"] > 0
    # same objective, same optimum: the two fits agree
    assert sk["final_loss"] == pytest.approx(metrics["final_loss"], rel=1e-3)
    assert sk["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1 / 15 + 1e-9)
    assert "scikit-learn" in stdout and "test accuracy" in stdout and "fit seconds" in stdout


def test_python_dash_m_entry_point_with_npz(tmp_path):
    x, labels = three_class_table(n_per_class=10)
    data = tmp_path / "d.npz"
    np.savez(data, X=x, y=np.searchsorted(["bird", "cat", "dog"], labels))
    out = tmp_path / "nested" / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-m", "jsoftmax", "train", "--data", str(data), "--out", str(out)]
    argv += ["--optimizer", "sgd", "--epochs", "3", "--batch-size", "0", "--schedule", "constant"]
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout
    metrics = check_outputs(out)
    assert metrics["optimizer"] == "sgd" and metrics["epochs"] == 3
    assert metrics["momentum"] == 0.9 and metrics["batch_size"] == 0


# --- bad data: one line naming the file and the problem, status 2, nothing written ------------


def write_csv(path, text):
    path.write_text(text)
    return path


def csv_file(text):
    """A maker of ``d.csv`` holding ``text`` in a given folder."""
    return lambda folder: write_csv(folder / "d.csv", text)


def npz_file(**arrays):
    """A maker of ``d.npz`` holding ``arrays`` in a given folder."""

    def make(folder):
        np.savez(folder / "d.npz", **arrays)
        return folder / "d.npz"

    return make


BAD_DATA = {
    "missing file": (lambda d: d / "absent.csv", "no such file"),
    "unsupported extension": (lambda d: write_csv(d / "d.xlsx", "x"), "unsupported file type"),
    "non-numeric feature": (
        csv_file("a,color,label\n1,2,0\n3,blue,1\n"),
        "column 'color' is not numeric (line 3 holds 'blue')",
    ),
    "missing values": (
        csv_file("a,b,label\n1,2,0\n3,4,1\n5,,1\n"),
        "missing value in column 'b' on line 4",
    ),
    "one class only": (csv_file("a,label\n1,x\n2,x\n3,x\n"), "only one class ('x')"),
    "unknown label column": (
        csv_file("a,b,target\n1,2,0\n3,4,1\n"),
        "no label column 'label'; the columns are 'a', 'b', 'target'",
    ),
    "empty file": (csv_file(""), "is empty"),
    "npz without X": (npz_file(y=np.arange(4) % 2), "has no array 'X' (it holds 'y')"),
    "npz without y": (npz_file(X=np.ones((4, 2))), "has no array 'y' (it holds 'X')"),
    "X and y lengths differ": (
        npz_file(X=np.ones((4, 2)), y=np.arange(3)),
        "X has 4 rows but y has 3 labels",
    ),
    "too few examples of a class": (
        csv_file("a,label\n1,x\n2,x\n3,x\n4,y\n"),
        "class 'y' has only 1 example",
    ),
    "test split too small": (
        csv_file("a,label\n1,x\n2,x\n3,y\n4,y\n5,x\n"),
        "the test split would hold 1 of 5 examples",
    ),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_line_status_2_and_nothing_written(tmp_path, capsys, case):
    make, problem = BAD_DATA[case]
    path = make(tmp_path)
    out = tmp_path / "out"
    assert main(["train", "--data", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"jsoftmax train: error: {path}: ")
    assert problem in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({path.name} - {"absent.csv"})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--test-size", "1.5"], "argument --test-size: must be a fraction in (0, 1)"),
        (["--test-size", "0"], "argument --test-size"),
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1"),
        (["--epochs", "ten"], "argument --epochs: expected an integer"),
        (["--lr", "-1"], "argument --lr: must be a number > 0"),
        (["--lr", "nan"], "argument --lr: must be a number > 0"),
        (["--seed", str(2**32)], "argument --seed: must be an integer <= 4294967295"),
        (["--l2", "-0.1"], "argument --l2: must be a number >= 0"),
        (["--batch-size", "-1"], "argument --batch-size"),
        (["--momentum", "1"], "argument --momentum"),
        (["--optimizer", "rmsprop"], "argument --optimizer: invalid choice"),
        (["--dataset", "mnist"], "argument --dataset: invalid choice"),
        (["--dataset", "iris", "--data", "x.csv"], "not allowed with argument --dataset"),
        (["--optimizer", "lbfgs", "--lr", "0.1"], "--lr does not apply to lbfgs"),
        (["--optimizer", "lbfgs", "--batch-size", "32"], "--batch-size does not apply to lbfgs"),
        (["--label-column", "y"], "--label-column only applies to a --data CSV file"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["train", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_out_that_is_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("x")
    assert main(["train", "--out", str(out)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert out.read_text() == "x"


def test_no_command_and_help(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    help_text = capsys.readouterr().out
    for option in ("--dataset", "--data", "--optimizer", "--compare-sklearn", "--out", "--l2"):
        assert option in help_text


def test_a_diverging_run_says_so_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "--dataset", "iris", "--optimizer", "sgd", "--lr", "1e30"]
    argv += ["--schedule", "constant", "--epochs", "2", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "smaller --lr" in err and "Traceback" not in err
    assert not out.exists()


def test_default_epochs_give_small_data_enough_steps():
    assert _cli._default_epochs("adam", 1437, 64) == 50  # digits: 23 steps an epoch
    assert _cli._default_epochs("sgd", 120, 64) == 500  # iris: 2 steps an epoch
    assert _cli._default_epochs("adam", 120, 0) == 1000  # full batch: 1 step an epoch
    assert _cli._default_epochs("lbfgs", 120, 0) == 200
    assert _cli._default_epochs("adam", 100_000, 64) == 50


def test_metrics_json_is_strict_and_compact():
    text = _cli._to_json({"a": [1, 2.5, float("nan")], "m": [[1, 0], [0, 1]], "s": ["x]", "y"]})
    assert json.loads(text) == {"a": [1, 2.5, None], "m": [[1, 0], [0, 1]], "s": ["x]", "y"]}
    assert '"a": [1, 2.5, null]' in text and "[1, 0]," in text


# --- writing outputs ------------------------------------------------------------------------


def fake_run():
    dataset = _data.Dataset(
        x=np.zeros((4, 2)),
        y=np.array([0, 1, 0, 1]),
        class_names=("a", "b"),
        feature_names=("f", "g"),
        source="fake",
    )
    split = _data.Split(
        x_train=np.zeros((2, 2), np.float32),
        x_test=np.zeros((2, 2), np.float32),
        y_train=np.array([0, 1], np.int32),
        y_test=np.array([0, 1], np.int32),
        mean=np.zeros(2),
        scale=np.ones(2),
    )
    history = types.SimpleNamespace(
        loss=[0.7, 0.5], accuracy=[0.5, 1.0], val_loss=[0.8, 0.6], val_accuracy=[0.5, 1.0]
    )
    results = {"confusion_matrix": np.eye(2, dtype=np.int64), "test_accuracy": 1.0}
    metrics = {"optimizer": "adam", "epochs": 2}
    params = {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}
    return metrics, params, split, dataset, history, results


def test_a_failed_write_leaves_out_untouched_and_no_staging(tmp_path, monkeypatch):
    from jsoftmax import _plots

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(_plots, "plot_confusion_matrix", broken)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        _cli._write_outputs(out, *fake_run())
    assert list(tmp_path.iterdir()) == []  # no out, no half-written staging directory

    out.mkdir()
    (out / "metrics.json").write_text("old")
    with pytest.raises(OSError):
        _cli._write_outputs(out, *fake_run())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / "metrics.json").read_text() == "old"
    assert [p.name for p in out.iterdir()] == ["metrics.json"]


def test_write_outputs_creates_every_file(tmp_path):
    out = tmp_path / "a" / "b"
    _cli._write_outputs(out, *fake_run())
    assert sorted(p.name for p in out.iterdir()) == sorted(_cli.OUTPUT_FILES)
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b"]


# --- bench ----------------------------------------------------------------------------------


def test_bench_delegates_everything_after_bench(monkeypatch):
    seen = []
    fake = types.ModuleType("jsoftmax.bench")

    def fake_main(argv):
        seen.append(list(argv))
        return len(argv)

    fake.main = fake_main
    monkeypatch.setitem(sys.modules, "jsoftmax.bench", fake)
    assert main(["bench", "--quick", "--out", "x.json"]) == 3
    assert main(["bench", "--help"]) == 1
    assert main(["bench"]) == 0
    assert seen == [["--quick", "--out", "x.json"], ["--help"], []]
