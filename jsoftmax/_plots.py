"""PNG plots for ``jsoftmax train``: training curves and the confusion matrix.

Uses matplotlib's object API with the Agg canvas directly, so it works headless
and never touches pyplot's global state or the user's chosen backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_curves(
    path: str | os.PathLike[str],
    loss: Sequence[float],
    accuracy: Sequence[float],
    val_loss: Sequence[float] = (),
    val_accuracy: Sequence[float] = (),
    title: str = "",
    xlabel: str = "epoch",
) -> None:
    """Loss (left) and accuracy (right) per epoch, train and test, saved as a PNG."""
    figure = _figure(10.0, 4.0)
    left, right = figure.subplots(1, 2)
    epochs = np.arange(1, len(loss) + 1)
    marker = "o" if len(epochs) <= 30 else None
    left.plot(epochs, loss, marker=marker, markersize=3, label="train")
    if len(val_loss):
        left.plot(epochs, val_loss, marker=marker, markersize=3, label="test")
    left.set_xlabel(xlabel)
    left.set_ylabel("loss (cross-entropy + L2)")
    if min(loss) > 0 and (len(val_loss) == 0 or min(val_loss) > 0):
        from matplotlib.ticker import FuncFormatter

        left.set_yscale("log")
        left.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        left.yaxis.set_minor_formatter(FuncFormatter(_minor_log_label))
    left.set_title("loss")
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    right.plot(epochs, accuracy, marker=marker, markersize=3, label="train")
    if len(val_accuracy):
        right.plot(epochs, val_accuracy, marker=marker, markersize=3, label="test")
    right.set_xlabel(xlabel)
    right.set_ylabel("accuracy")
    right.set_title("accuracy")
    right.grid(True, alpha=0.3)
    right.legend(loc="lower right")
    if title:
        figure.suptitle(title)
    figure.savefig(path, format="png")


def _minor_log_label(value: float, _position: int) -> str:
    """Labels the 2s, 3s and 5s between the powers of ten, so the log axis reads as numbers."""
    if value <= 0:
        return ""
    leading = round(value / 10.0 ** math.floor(math.log10(value)))
    return f"{value:g}" if leading in (2, 3, 5) else ""


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``[true class, predicted class]``, int64 ``[K, K]``."""
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return matrix


def plot_confusion_matrix(
    path: str | os.PathLike[str],
    matrix: np.ndarray,
    class_names: Sequence[str],
    title: str = "",
) -> None:
    """The confusion matrix as a heat map with the counts written in, saved as a PNG."""
    k = len(class_names)
    side = min(max(4.5, 0.45 * k + 2.5), 16.0)
    figure = _figure(side + 0.8, side)
    axes = figure.subplots()
    image = axes.imshow(matrix, cmap="Blues", interpolation="nearest")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="examples")
    labels = [name if len(name) <= 12 else name[:11] + "…" for name in class_names]
    if k <= 40:
        axes.set_xticks(
            range(k),
            labels,
            rotation=45 if max(map(len, labels)) > 3 else 0,
            ha="right" if max(map(len, labels)) > 3 else "center",
        )
        axes.set_yticks(range(k), labels)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    if k <= 25:
        threshold = matrix.max() / 2.0 if matrix.size else 0.0
        for i in range(k):
            for j in range(k):
                count = int(matrix[i, j])
                if count == 0 and i != j:
                    continue
                axes.text(
                    j,
                    i,
                    str(count),
                    ha="center",
                    va="center",
                    fontsize=8 if k > 12 else 10,
                    color="white" if count > threshold else "black",
                )
    if title:
        axes.set_title(title)
    figure.savefig(path, format="png")
