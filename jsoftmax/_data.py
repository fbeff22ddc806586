"""Datasets for ``jsoftmax train``: loading, checking, splitting, standardising.

Bad data raises :class:`DataError`, whose message is one line that names the
file and the problem; the command line prints it and exits with status 2.
scikit-learn is imported only where it is needed (the built-in datasets and the
split), so this module imports without the ``train`` extra.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import zipfile
from pathlib import Path

import numpy as np

BUILTIN_DATASETS = ("digits", "iris", "wine", "breast_cancer")
FILE_SUFFIXES = (".csv", ".npz")

# Cells a CSV writer uses for "no value" (compared after stripping and lower-casing).
_MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})


class DataError(Exception):
    """A problem with a dataset; ``str(error)`` is ``"<source>: <problem>"``."""

    def __init__(self, source: str | os.PathLike[str], problem: str) -> None:
        self.source = str(source)
        self.problem = problem
        super().__init__(f"{self.source}: {problem}")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Features and integer labels, with the names to report them by.

    Attributes:
      x: Features, float64 ``[N, D]``, all finite.
      y: Labels, int64 ``[N]`` in ``[0, K)``.
      class_names: The original label of each class, ``K`` strings.
      feature_names: ``D`` strings.
      source: The dataset's name (a built-in) or the file path.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclasses.dataclass(frozen=True)
class Split:
    """A stratified train/test split with features standardised by train statistics.

    Attributes:
      x_train, x_test: Standardised features, float32.
      y_train, y_test: Labels, int32.
      mean, scale: The train mean and standard deviation (1 for constant
        features) used to standardise: ``(x - mean) / scale``.
    """

    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    scale: np.ndarray


def load_builtin(name: str) -> Dataset:
    """One of scikit-learn's bundled datasets (no download)."""
    if name not in BUILTIN_DATASETS:
        raise DataError(name, f"unknown dataset; choose one of {', '.join(BUILTIN_DATASETS)}")
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")()
    names = tuple(str(c) for c in bunch.target_names)
    features = tuple(str(f) for f in bunch.feature_names)
    return Dataset(
        x=np.asarray(bunch.data, np.float64),
        y=np.asarray(bunch.target, np.int64),
        class_names=names,
        feature_names=features,
        source=name,
    )


def load_file(path: str | os.PathLike[str], label_column: str = "label") -> Dataset:
    """A user's ``.csv`` (a header row, a label column, numeric features) or ``.npz``.

    A ``.npz`` holds the features as ``X`` ``[N, D]`` and the labels as ``y`` ``[N]``.
    Labels may be integers or strings; they are mapped to ``0..K-1`` in sorted
    order and the original values kept as the class names.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise DataError(
            path,
            f"unsupported file type {path.suffix or '(no extension)'!r}; "
            "use a .csv file (a header row and a label column) or a .npz file (arrays X and y)",
        )
    if not path.exists():
        raise DataError(path, "no such file")
    if not path.is_file():
        raise DataError(path, "not a regular file")
    try:
        if suffix == ".csv":
            return _load_csv(path, label_column)
        return _load_npz(path)
    except DataError:
        raise
    except OSError as error:
        raise DataError(path, f"cannot read the file ({error.strerror or error})") from None


def _is_missing(cell: str) -> bool:
    return cell.strip().lower() in _MISSING_TOKENS


def _load_csv(path: Path, label_column: str) -> Dataset:
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            rows: list[tuple[int, list[str]]] = []
            header: list[str] | None = None
            for row in reader:
                if not row or all(not cell.strip() for cell in row):
                    continue  # a blank line
                if header is None:
                    header = [cell.strip() for cell in row]
                else:
                    rows.append((reader.line_num, row))
    except UnicodeDecodeError:
        raise DataError(path, "is not UTF-8 text; is it really a CSV file?") from None
    except csv.Error as error:
        raise DataError(path, f"is not valid CSV ({error})") from None

    if header is None:
        raise DataError(path, "is empty; expected a header row and data rows")
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise DataError(path, f"the header names column {name!r} twice")
        seen.add(name)
    if label_column not in header:
        raise DataError(
            path,
            f"no label column {label_column!r}; the columns are "
            f"{', '.join(repr(h) for h in header)} (choose one with --label-column)",
        )
    if len(header) < 2:
        raise DataError(path, f"has no feature columns besides the label column {label_column!r}")
    if not rows:
        raise DataError(path, "has a header but no data rows")
    for line, row in rows:
        if len(row) != len(header):
            raise DataError(
                path, f"line {line} has {len(row)} fields but the header has {len(header)}"
            )

    lines = [line for line, _ in rows]
    label_index = header.index(label_column)
    feature_names = tuple(h for i, h in enumerate(header) if i != label_index)
    columns: list[np.ndarray] = []
    for j, name in enumerate(header):
        cells = [row[j] for _, row in rows]
        missing = [i for i, cell in enumerate(cells) if _is_missing(cell)]
        if missing:
            what = "label" if j == label_index else "value"
            more = f" ({len(missing)} missing in that column)" if len(missing) > 1 else ""
            raise DataError(
                path, f"missing {what} in column {name!r} on line {lines[missing[0]]}{more}"
            )
        if j == label_index:
            labels = [cell.strip() for cell in cells]
            continue
        values = np.empty(len(cells), np.float64)
        for i, cell in enumerate(cells):
            try:
                values[i] = float(cell)
            except ValueError:
                raise DataError(
                    path,
                    f"column {name!r} is not numeric (line {lines[i]} holds {cell.strip()!r}); "
                    "features must be numbers",
                ) from None
            if not math.isfinite(values[i]):
                raise DataError(
                    path,
                    f"column {name!r} holds {cell.strip()!r} on line {lines[i]}; "
                    "features must be finite numbers",
                )
        columns.append(values)

    x = np.stack(columns, axis=1)
    y, class_names = _encode_labels(path, labels, f"column {label_column!r}")
    return Dataset(x, y, class_names, feature_names, str(path))


def _encode_labels(
    source: Path, labels: list[str] | np.ndarray, where: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Maps labels to 0..K-1: numerically if they are all integers, else as text."""
    as_ints: list[int] | None = []
    for label in labels:
        try:
            value = float(label)
        except (TypeError, ValueError):
            as_ints = None
            break
        if not value.is_integer():
            as_ints = None
            break
        as_ints.append(int(value))
    if as_ints is not None:
        classes, y = np.unique(np.asarray(as_ints, np.int64), return_inverse=True)
        names = tuple(str(c) for c in classes)
    else:
        classes, y = np.unique(np.asarray([str(label) for label in labels]), return_inverse=True)
        names = tuple(str(c) for c in classes)
    if len(names) < 2:
        raise DataError(
            source,
            f"{where} holds only one class ({names[0]!r}); a classifier needs at least two",
        )
    return y.astype(np.int64).reshape(-1), names


def _load_npz(path: Path) -> Dataset:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(path, f"is not a valid .npz archive ({error})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(path, "is a single .npy array, not a .npz archive with X and y")
    with archive:
        names = list(archive.files)
        for key in ("X", "y"):
            if key not in names:
                held = ", ".join(repr(n) for n in names) or "nothing"
                raise DataError(
                    path,
                    f"has no array {key!r} (it holds {held}); save it with np.savez(f, X=, y=)",
                )
        try:
            x = archive["X"]
            y = archive["y"]
        except ValueError as error:
            if "allow_pickle" in str(error):
                raise DataError(
                    path, "holds object arrays, which are not loaded (pickle); save numeric arrays"
                ) from None
            raise DataError(path, f"is not a valid .npz archive ({error})") from None
        except (zipfile.BadZipFile, EOFError, OSError) as error:
            raise DataError(path, f"is not a valid .npz archive ({error})") from None

    if x.ndim != 2:
        raise DataError(path, f"X must be 2-D [examples, features], got shape {x.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(path, f"y must be 1-D [examples], got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            path, f"X has {x.shape[0]} rows but y has {y.shape[0]} labels; they must match"
        )
    if x.shape[0] == 0:
        raise DataError(path, "holds no examples")
    if x.shape[1] == 0:
        raise DataError(path, "X has no feature columns")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise DataError(path, f"X is not numeric (dtype {x.dtype}); features must be numbers")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        rows, cols = np.nonzero(bad)
        kind = "missing value (NaN)" if np.isnan(x[rows[0], cols[0]]) else "non-finite value"
        more = f" ({bad.sum()} non-finite values in all)" if bad.sum() > 1 else ""
        raise DataError(path, f"{kind} in X at row {rows[0]}, column {cols[0]}{more}")

    if y.dtype.kind == "f":
        nan = np.isnan(y)
        if nan.any():
            raise DataError(path, f"missing label (NaN) in y at index {np.flatnonzero(nan)[0]}")
        fractional = y != np.round(y)
        if fractional.any():
            i = np.flatnonzero(fractional)[0]
            raise DataError(
                path, f"y holds a non-integer label {y[i]!r} at index {i}; use integers or strings"
            )
        labels: list[str] | np.ndarray = [str(int(v)) for v in y]
    elif y.dtype.kind in "iub":
        labels = [str(int(v)) for v in y]
    elif y.dtype.kind in "US":
        labels = [v.decode() if isinstance(v, bytes) else str(v) for v in y.tolist()]
        empty = [i for i, v in enumerate(labels) if _is_missing(v)]
        if empty:
            raise DataError(path, f"missing label in y at index {empty[0]}")
    else:
        raise DataError(path, f"y has unsupported dtype {y.dtype}; use integers or strings")
    y_codes, class_names = _encode_labels(path, labels, "y")
    features = tuple(f"x{j}" for j in range(x.shape[1]))
    return Dataset(x, y_codes, class_names, features, str(path))


def load(dataset: str | None, data: str | None, label_column: str = "label") -> Dataset:
    """The dataset the command line asked for: a file if ``data`` is given, else a built-in."""
    if data is not None:
        return load_file(data, label_column)
    return load_builtin(dataset or "digits")


def split(dataset: Dataset, test_size: float, seed: int) -> Split:
    """A stratified split (scikit-learn's), then standardisation by train statistics.

    Raises:
      DataError: if a class has fewer than two examples, or either side of the
        split would be too small to hold every class.
    """
    counts = np.bincount(dataset.y, minlength=dataset.num_classes)
    n = int(dataset.y.shape[0])
    for k, count in enumerate(counts):
        if count < 2:
            raise DataError(
                dataset.source,
                f"class {dataset.class_names[k]!r} has only {count} example; "
                "a stratified train/test split needs at least 2 per class",
            )
    num_classes = dataset.num_classes
    n_test = math.ceil(test_size * n)
    n_train = n - n_test
    for side, size in (("test", n_test), ("train", n_train)):
        if size < num_classes:
            raise DataError(
                dataset.source,
                f"the {side} split would hold {size} of {n} examples (--test-size {test_size}), "
                f"fewer than the {num_classes} classes; change --test-size or add data",
            )

    from sklearn.model_selection import train_test_split

    try:
        x_train, x_test, y_train, y_test = train_test_split(
            dataset.x, dataset.y, test_size=test_size, stratify=dataset.y, random_state=seed
        )
    except ValueError as error:
        raise DataError(dataset.source, f"cannot split the data ({error})") from None
    x_train, x_test, mean, scale = standardise(x_train, x_test)
    return Split(
        x_train=x_train.astype(np.float32),
        x_test=x_test.astype(np.float32),
        y_train=y_train.astype(np.int32),
        y_test=y_test.astype(np.int32),
        mean=mean,
        scale=scale,
    )


def standardise(
    x_train: np.ndarray, x_test: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Zero mean, unit variance by the train statistics; constant features get scale 1.

    Returns:
      ``(x_train, x_test, mean, scale)`` in float64.
    """
    x_train = np.asarray(x_train, np.float64)
    x_test = np.asarray(x_test, np.float64)
    mean = x_train.mean(axis=0)
    scale = x_train.std(axis=0)
    # A constant feature becomes exactly 0 (its mean can be off by a rounding
    # error); one whose spread is only rounding noise is left unscaled.
    constant = np.ptp(x_train, axis=0) == 0.0
    mean = np.where(constant, x_train[0], mean)
    tiny = 10.0 * np.finfo(np.float64).eps * np.maximum(np.abs(mean), 1.0)
    scale = np.where(constant | (scale <= tiny), 1.0, scale)
    return (x_train - mean) / scale, (x_test - mean) / scale, mean, scale
