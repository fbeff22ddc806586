"""jsoftmax: numerically stable softmax and softmax cross-entropy for JAX."""

from jsoftmax import classifier
from jsoftmax._cross_entropy import (
    softmax_cross_entropy,
    softmax_cross_entropy_with_integer_labels,
)
from jsoftmax._linear_cross_entropy import linear_softmax_cross_entropy
from jsoftmax._softmax import log_softmax, logsumexp, softmax

__all__ = [
    "classifier",
    "linear_softmax_cross_entropy",
    "log_softmax",
    "logsumexp",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
