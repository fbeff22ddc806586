"""Dataset loading, checking, splitting and standardising for ``jsoftmax train``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")

from jsoftmax import _data  # noqa: E402
from jsoftmax._data import DataError  # noqa: E402


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


# --- built-in datasets --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [
        ("digits", (1797, 64), 10),
        ("iris", (150, 4), 3),
        ("wine", (178, 13), 3),
        ("breast_cancer", (569, 30), 2),
    ],
)
def test_builtin_datasets_load_without_download(name, shape, classes):
    ds = _data.load_builtin(name)
    assert ds.x.shape == shape
    assert ds.x.dtype == np.float64
    assert ds.y.shape == (shape[0],)
    assert ds.num_classes == classes
    assert set(np.unique(ds.y)) == set(range(classes))
    assert len(ds.feature_names) == shape[1]
    assert ds.source == name


def test_unknown_builtin_dataset():
    with pytest.raises(DataError, match="unknown dataset"):
        _data.load_builtin("mnist")


# --- CSV ----------------------------------------------------------------------------------


def test_csv_with_string_labels(tmp_path):
    path = write(
        tmp_path / "pets.csv",
        "weight,label,height\n4.5,cat,30\n30,dog,60\n5,cat,25\n25,dog,55\n",
    )
    ds = _data.load_file(path)
    assert ds.class_names == ("cat", "dog")
    np.testing.assert_array_equal(ds.y, [0, 1, 0, 1])
    assert ds.feature_names == ("weight", "height")
    np.testing.assert_array_equal(ds.x, [[4.5, 30], [30, 60], [5, 25], [25, 55]])
    assert ds.source == str(path)


def test_csv_integer_labels_sort_numerically_and_custom_label_column(tmp_path):
    path = write(tmp_path / "d.csv", "y,a\n10,1\n2,2\n1,3\n10,4\n 2 ,5\n")
    ds = _data.load_file(path, label_column="y")
    assert ds.class_names == ("1", "2", "10")
    np.testing.assert_array_equal(ds.y, [2, 1, 0, 2, 1])


def test_csv_tolerates_bom_blank_lines_and_scientific_notation(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbfa,label\n1e3,0\n\n-2.5E-1,1\n")
    ds = _data.load_file(path)
    np.testing.assert_array_equal(ds.x[:, 0], [1000.0, -0.25])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("a,label\n", "has a header but no data rows"),
        ("a,b,target\n1,2,0\n", "no label column 'label'; the columns are 'a', 'b', 'target'"),
        ("label\n0\n1\n", "no feature columns"),
        ("a,a,label\n1,2,0\n", "names column 'a' twice"),
        ("a,label\n1,0\n2\n", "line 3 has 1 fields but the header has 2"),
        ("a,color,label\n1,red,0\n2,3,1\n", "column 'color' is not numeric (line 2 holds 'red')"),
        ("a,b,label\n1,2,0\n3,,1\n4,NA,1\n", "missing value in column 'b' on line 3"),
        ("a,label\n1,0\n2,\n", "missing label in column 'label' on line 3"),
        ("a,label\n1,0\ninf,1\n", "column 'a' holds 'inf' on line 3"),
        ("a,label\n1,x\n2,x\n3,x\n", "only one class ('x')"),
    ],
)
def test_csv_problems_name_file_and_problem(tmp_path, text, message):
    path = write(tmp_path / "bad.csv", text)
    with pytest.raises(DataError) as info:
        _data.load_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_csv_not_utf8(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"a,label\n\xff\xfe,0\n")
    with pytest.raises(DataError, match="not UTF-8"):
        _data.load_file(path)


# --- files in general ---------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        _data.load_file(tmp_path / "nope.csv")


def test_unsupported_extension(tmp_path):
    path = write(tmp_path / "data.json", "{}")
    with pytest.raises(DataError, match=r"unsupported file type '\.json'"):
        _data.load_file(path)


def test_a_directory_is_not_a_file(tmp_path):
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(DataError, match="not a regular file"):
        _data.load_file(tmp_path / "dir.csv")


# --- npz ----------------------------------------------------------------------------------


def test_npz_with_integer_and_string_labels(tmp_path):
    x = np.arange(12, dtype=np.int64).reshape(6, 2)
    np.savez(tmp_path / "a.npz", X=x, y=np.array([3, 5, 3, 5, 3, 5]))
    ds = _data.load_file(tmp_path / "a.npz")
    assert ds.class_names == ("3", "5")
    np.testing.assert_array_equal(ds.y, [0, 1, 0, 1, 0, 1])
    np.testing.assert_array_equal(ds.x, x)
    assert ds.x.dtype == np.float64

    np.savez(tmp_path / "b.npz", X=x, y=np.array(["b", "a", "b", "a", "b", "a"]))
    ds = _data.load_file(tmp_path / "b.npz")
    assert ds.class_names == ("a", "b")
    np.testing.assert_array_equal(ds.y, [1, 0, 1, 0, 1, 0])

    np.savez(tmp_path / "c.npz", X=x, y=np.array([[0.0], [1.0], [0.0], [1.0], [0.0], [1.0]]))
    ds = _data.load_file(tmp_path / "c.npz")
    assert ds.class_names == ("0", "1")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.ones((4, 2))}, "has no array 'y' (it holds 'X')"),
        ({"features": np.ones((4, 2)), "y": np.zeros(4)}, "has no array 'X'"),
        ({"X": np.ones((4, 2)), "y": np.array([0, 1, 0])}, "X has 4 rows but y has 3 labels"),
        ({"X": np.ones(4), "y": np.array([0, 1, 0, 1])}, "X must be 2-D"),
        ({"X": np.ones((4, 2)), "y": np.ones((4, 2))}, "y must be 1-D"),
        ({"X": np.array([["a", "b"]] * 2), "y": np.array([0, 1])}, "X is not numeric"),
        (
            {"X": np.array([[1.0, 2.0], [np.nan, 3.0]]), "y": np.array([0, 1])},
            "missing value (NaN) in X at row 1, column 0",
        ),
        (
            {"X": np.array([[1.0, np.inf], [2.0, 3.0]]), "y": np.array([0, 1])},
            "non-finite value in X at row 0, column 1",
        ),
        ({"X": np.ones((2, 2)), "y": np.array([0.0, np.nan])}, "missing label (NaN) in y"),
        ({"X": np.ones((2, 2)), "y": np.array([0.0, 0.5])}, "non-integer label"),
        ({"X": np.ones((3, 2)), "y": np.array([7, 7, 7])}, "y holds only one class ('7')"),
        ({"X": np.ones((0, 2)), "y": np.zeros(0, np.int64)}, "holds no examples"),
    ],
)
def test_npz_problems(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        _data.load_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_npz_with_object_array_is_not_unpickled(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, X=np.array([[1, "a"], [2, "b"]], dtype=object), y=np.array([0, 1]))
    with pytest.raises(DataError, match="object arrays"):
        _data.load_file(path)


def test_npz_that_is_not_an_archive(tmp_path):
    path = write(tmp_path / "fake.npz", "not a zip file")
    with pytest.raises(DataError, match="not a valid .npz"):
        _data.load_file(path)


# --- split and standardise ----------------------------------------------------------------


def test_split_is_stratified_deterministic_and_standardised():
    ds = _data.load_builtin("iris")
    a = _data.split(ds, 0.2, seed=0)
    b = _data.split(ds, 0.2, seed=0)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert a.x_train.shape == (120, 4) and a.x_test.shape == (30, 4)
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(a.y_test), [10, 10, 10])
    np.testing.assert_allclose(a.x_train.mean(axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(a.x_train.std(axis=0), 1.0, atol=1e-5)
    c = _data.split(ds, 0.2, seed=1)
    assert not np.array_equal(a.x_test, c.x_test)


def test_standardise_constant_features_give_zeros_not_nan():
    x_train = np.array([[1.0, 5.0, 0.1], [3.0, 5.0, 0.1], [5.0, 5.0, 0.1]])
    x_test = np.array([[2.0, 5.0, 0.1], [0.0, 7.0, 0.1]])
    train, test, mean, scale = _data.standardise(x_train, x_test)
    assert np.all(np.isfinite(train)) and np.all(np.isfinite(test))
    np.testing.assert_array_equal(train[:, 1:], 0.0)
    np.testing.assert_array_equal(scale[1:], 1.0)
    np.testing.assert_allclose(test[:, 1], [0.0, 2.0])


def test_digits_has_constant_features_and_split_stays_finite():
    split = _data.split(_data.load_builtin("digits"), 0.2, seed=42)
    assert np.any(split.scale == 1.0)
    assert np.all(np.isfinite(split.x_train)) and np.all(np.isfinite(split.x_test))


def make(y, source="d.csv"):
    y = np.asarray(y)
    return _data.Dataset(
        x=np.arange(len(y), dtype=np.float64)[:, None],
        y=y,
        class_names=tuple(f"c{k}" for k in range(y.max() + 1)),
        feature_names=("a",),
        source=source,
    )


def test_split_rejects_a_class_with_one_example():
    with pytest.raises(DataError, match=r"d\.csv: class 'c1' has only 1 example"):
        _data.split(make([0, 0, 0, 1, 2, 2]), 0.5, seed=0)


def test_split_rejects_a_test_side_smaller_than_the_classes():
    with pytest.raises(DataError, match="the test split would hold 2 of 9 examples"):
        _data.split(make([0, 0, 0, 1, 1, 1, 2, 2, 2]), 0.2, seed=0)
    with pytest.raises(DataError, match="the train split would hold 1 of 9 examples"):
        _data.split(make([0, 0, 0, 1, 1, 1, 2, 2, 2]), 0.85, seed=0)


def test_load_dispatches_to_file_or_builtin(tmp_path):
    path = write(tmp_path / "d.csv", "a,label\n1,0\n2,1\n")
    assert _data.load(None, str(path)).source == str(path)
    assert _data.load("iris", None).source == "iris"
