"""A linear classifier (multinomial logistic regression) trained with optax.

Everything here is a plain function of arrays: parameters are a dict of two
arrays, the loss is this library's softmax cross-entropy, and the train step is
an ordinary jitted function that any optax ``GradientTransformation`` can drive,
including full-batch :func:`optax.lbfgs`, which needs the objective itself.

Example:
    >>> import jax, optax
    >>> import jax.numpy as jnp
    >>> from jsoftmax import classifier
    >>> x = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    >>> y = jnp.array([0, 1, 0, 1])
    >>> params = classifier.init_params(jax.random.key(0), 2, 2)
    >>> params, history = classifier.fit(params, optax.adam(0.1), x, y, epochs=50)
    >>> float(classifier.accuracy(params, x, y))
    1.0

The train step can also be lifted into a loop of your own:

    >>> optimizer = optax.sgd(0.5, momentum=0.9)
    >>> step = classifier.make_train_step(optimizer, l2=1e-3)
    >>> params = classifier.init_params(jax.random.key(0), 2, 2)
    >>> opt_state = optimizer.init(params)
    >>> for _ in range(20):
    ...     params, opt_state, value = step(params, opt_state, x, y)
    >>> classifier.predict(params, x).tolist()
    [0, 1, 0, 1]
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

import jsoftmax

__all__ = [
    "FitHistory",
    "Params",
    "TrainStep",
    "accuracy",
    "fit",
    "init_params",
    "logits",
    "loss",
    "make_train_step",
    "predict",
    "predict_proba",
]

Params = dict[str, jax.Array]
"""Classifier parameters: ``{"w": [num_features, num_classes], "b": [num_classes]}``."""


class TrainStep(Protocol):
    """The jitted function :func:`make_train_step` returns."""

    def __call__(
        self,
        params: Params,
        opt_state: optax.OptState,
        x: ArrayLike,
        y: ArrayLike,
        where: ArrayLike | None = None,
    ) -> tuple[Params, optax.OptState, jax.Array]: ...


@dataclasses.dataclass
class FitHistory:
    """What :func:`fit` records, one entry per epoch.

    Attributes:
      loss: The training objective (mean cross-entropy plus the L2 penalty) on
        the whole training set at the end of each epoch.
      accuracy: Training accuracy at the end of each epoch.
      val_loss: The same objective on the validation data (empty without it).
      val_accuracy: Validation accuracy (empty without validation data).
      seconds: Cumulative training time at the end of each epoch, compilation
        excluded.
      compile_seconds: Time spent compiling the epoch and evaluation functions.
    """

    loss: list[float] = dataclasses.field(default_factory=list)
    accuracy: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[float] = dataclasses.field(default_factory=list)
    val_accuracy: list[float] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    compile_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The history as plain Python lists and floats (JSON-ready)."""
        return dataclasses.asdict(self)


def init_params(
    key: jax.Array,
    num_features: int,
    num_classes: int,
    *,
    scale: float = 0.01,
    dtype: jnp.dtype = jnp.float32,
) -> Params:
    """Initial parameters: small Gaussian weights and zero biases.

    The problem is convex, so the starting point does not change the optimum;
    ``scale=0.0`` starts from all zeros, as scikit-learn does.

    Args:
      key: A JAX PRNG key.
      num_features: ``D``, the number of input features.
      num_classes: ``C``, the number of classes (at least 2).
      scale: Standard deviation of the initial weights.
      dtype: A floating dtype for the parameters.

    Returns:
      ``{"w": [D, C], "b": [C]}``.

    Example:
      >>> import jax
      >>> p = init_params(jax.random.key(0), 4, 3)
      >>> p["w"].shape, p["b"].shape
      ((4, 3), (3,))
    """
    if int(num_features) < 1:
        raise ValueError(f"num_features must be at least 1, got {num_features!r}")
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype, got {dtype!r}")
    shape = (int(num_features), int(num_classes))
    w = jax.random.normal(key, shape, dtype) * jnp.asarray(scale, dtype)
    return {"w": w, "b": jnp.zeros((shape[1],), dtype)}


def _check_params(params: Params) -> tuple[jax.Array, jax.Array]:
    try:
        w, b = params["w"], params["b"]
    except (KeyError, TypeError):
        raise TypeError(
            'params must be a dict with "w" [num_features, num_classes] and "b" [num_classes]'
        ) from None
    w, b = jnp.asarray(w), jnp.asarray(b)
    if w.ndim != 2 or b.ndim != 1 or b.shape[0] != w.shape[1]:
        raise ValueError(
            f'params["w"] must be [num_features, num_classes] and params["b"] [num_classes], '
            f"got shapes {w.shape} and {b.shape}"
        )
    return w, b


def logits(params: Params, x: ArrayLike) -> jax.Array:
    """The class scores ``x @ w + b``.

    Args:
      params: ``{"w": [D, C], "b": [C]}``.
      x: Features ``[N, D]`` (or a single example ``[D]``); cast to the
        parameters' dtype.

    Returns:
      Logits ``[N, C]`` (or ``[C]``).

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"w": jnp.eye(2), "b": jnp.array([0.0, 1.0])}
      >>> logits(p, jnp.array([[2.0, 3.0]])).tolist()
      [[2.0, 4.0]]
    """
    w, b = _check_params(params)
    x = jnp.asarray(x)
    if x.ndim not in (1, 2) or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"x must be [N, {w.shape[0]}] to match params['w'] of shape {w.shape}, "
            f"got shape {x.shape}"
        )
    return x.astype(w.dtype) @ w + b


def _check_l2(l2: float) -> float:
    try:
        value = float(l2)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
        raise TypeError(f"l2 must be a Python number, got {l2!r}") from None
    if not value >= 0.0 or math.isinf(value):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    return value


def loss(
    params: Params,
    x: ArrayLike,
    y: ArrayLike,
    l2: float = 0.0,
    where: ArrayLike | None = None,
) -> jax.Array:
    """The regularised objective: mean cross-entropy plus ``0.5 * l2 * ||w||^2``.

    The cross-entropy is :func:`jsoftmax.softmax_cross_entropy_with_integer_labels`
    with ``reduction="mean"``. The bias is not penalised. With
    ``l2 = 1 / (C * n)`` this is scikit-learn's ``LogisticRegression(C=C)``
    objective divided by ``C * n``, so the two have the same minimiser.

    Args:
      params: ``{"w": [D, C], "b": [C]}``.
      x: Features ``[N, D]``.
      y: Integer class labels ``[N]`` in ``[0, C)``.
      l2: The L2 strength, a Python number >= 0.
      where: Optional boolean mask ``[N]``: the mean runs over the examples
        where it is True (padding rows contribute nothing).

    Returns:
      A scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"w": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
      >>> round(float(loss(p, jnp.ones((4, 2)), jnp.array([0, 1, 2, 0]))), 4)  # log(3)
      1.0986
    """
    l2 = _check_l2(l2)
    z = logits(params, x)
    y = jnp.asarray(y)
    if y.shape != z.shape[:-1]:
        raise ValueError(f"y must have shape {z.shape[:-1]} to match x, got shape {y.shape}")
    if where is not None:
        where = jnp.asarray(where)
        if where.shape != y.shape:
            raise ValueError(f"where must have shape {y.shape} like y, got shape {where.shape}")
    value = jsoftmax.softmax_cross_entropy_with_integer_labels(z, y, where=where, reduction="mean")
    if l2:
        w = params["w"]
        value = value + (0.5 * l2) * jnp.sum(jnp.square(w)).astype(value.dtype)
    return value


def make_train_step(optimizer: optax.GradientTransformation, l2: float = 0.0) -> TrainStep:
    """A jitted train step ``step(params, opt_state, x, y, where=None)``.

    The step returns ``(params, opt_state, loss)``. It computes the objective of
    :func:`loss` and its gradient on the batch ``(x, y)`` (on the examples where
    ``where`` is True, if a mask is given), asks ``optimizer`` for an update and
    applies it. The returned loss is the objective at the parameters passed in
    (before the update). Optimisers that take extra arguments
    (:class:`optax.GradientTransformationExtraArgs`) also receive ``value=``,
    ``grad=`` and ``value_fn=`` (the objective on this batch), which is what
    :func:`optax.lbfgs` and its line search need; the others simply ignore them.

    Args:
      optimizer: Any optax ``GradientTransformation``.
      l2: The L2 strength on the weights.

    Returns:
      The step, to call in any loop: a ``jax.jit``-compiled function (its
      ``.lower`` is jit's), behind a thin wrapper that makes weakly typed
      optimiser-state scalars strongly typed so the step compiles only once.

    Example:
      >>> import jax, optax
      >>> import jax.numpy as jnp
      >>> opt = optax.lbfgs()
      >>> step = make_train_step(opt, l2=0.01)
      >>> p = init_params(jax.random.key(0), 2, 2)
      >>> s = opt.init(p)
      >>> x, y = jnp.array([[1.0, 0.0], [0.0, 1.0]]), jnp.array([0, 1])
      >>> p, s, value = step(p, s, x, y)
      >>> value.shape
      ()
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}"
        )
    l2 = _check_l2(l2)
    extra_args = isinstance(optimizer, optax.GradientTransformationExtraArgs)

    def step(
        params: Params,
        opt_state: optax.OptState,
        x: ArrayLike,
        y: ArrayLike,
        where: ArrayLike | None = None,
    ) -> tuple[Params, optax.OptState, jax.Array]:
        def objective(p: Params) -> jax.Array:
            return loss(p, x, y, l2, where)

        value, grad = jax.value_and_grad(objective)(params)
        if extra_args:
            updates, opt_state = optimizer.update(
                grad, opt_state, params, value=value, grad=grad, value_fn=objective
            )
        else:
            updates, opt_state = optimizer.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    jitted = jax.jit(step)

    @functools.wraps(step)
    def train_step(
        params: Params,
        opt_state: optax.OptState,
        x: ArrayLike,
        y: ArrayLike,
        where: ArrayLike | None = None,
    ) -> tuple[Params, optax.OptState, jax.Array]:
        # Some initial states (optax.lbfgs's) hold weakly typed scalars that come
        # back strongly typed; making them strong up front saves a recompilation.
        return jitted(params, _strong(opt_state), x, y, where)

    train_step.lower = jitted.lower  # type: ignore[attr-defined]
    train_step.jitted = jitted  # type: ignore[attr-defined]
    return train_step


def predict_proba(params: Params, x: ArrayLike) -> jax.Array:
    """Class probabilities ``softmax(x @ w + b)``, ``[N, C]``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"w": jnp.zeros((2, 4)), "b": jnp.zeros(4)}
      >>> predict_proba(p, jnp.ones((1, 2))).tolist()
      [[0.25, 0.25, 0.25, 0.25]]
    """
    return jsoftmax.softmax(logits(params, x), axis=-1)


def predict(params: Params, x: ArrayLike) -> jax.Array:
    """The most probable class of each example, int32 ``[N]``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"w": jnp.eye(2), "b": jnp.zeros(2)}
      >>> predict(p, jnp.array([[3.0, 1.0], [0.0, 2.0]])).tolist()
      [0, 1]
    """
    return jnp.argmax(logits(params, x), axis=-1).astype(jnp.int32)


def accuracy(params: Params, x: ArrayLike, y: ArrayLike) -> jax.Array:
    """The fraction of examples whose predicted class is ``y``, a float32 scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {"w": jnp.eye(2), "b": jnp.zeros(2)}
      >>> float(accuracy(p, jnp.array([[3.0, 1.0], [0.0, 2.0]]), jnp.array([0, 0])))
      0.5
    """
    y = jnp.asarray(y)
    predicted = predict(params, x)
    if y.shape != predicted.shape:
        raise ValueError(f"y must have shape {predicted.shape} to match x, got shape {y.shape}")
    return jnp.mean((predicted == y).astype(jnp.float32))


def _as_features(name: str, x: ArrayLike, dtype: jnp.dtype) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {x.shape}")
    if not (jnp.issubdtype(x.dtype, jnp.number) or x.dtype == jnp.bool_):
        raise TypeError(f"{name} must be numeric, got dtype {x.dtype}")
    return x.astype(dtype)


def _as_labels(name: str, y: ArrayLike, n: int) -> jax.Array:
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"{name} must be integer class labels, got dtype {y.dtype}")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the features, got {y.shape}")
    return y.astype(jnp.int32)


def _strong(tree: Any) -> Any:
    """The same pytree with every array leaf strongly typed.

    Some optimiser states (optax.lbfgs's) start with weakly typed scalars that
    come back strongly typed after one step, which would make ``jit`` compile
    the step a second time.
    """

    def fix(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array) and jax.typeof(leaf).weak_type:
            return jnp.asarray(leaf, leaf.dtype)
        return leaf

    return jax.tree.map(fix, tree)


def fit(
    params: Params,
    optimizer: optax.GradientTransformation,
    x: ArrayLike,
    y: ArrayLike,
    *,
    epochs: int,
    batch_size: int | None = None,
    key: jax.Array | None = None,
    l2: float = 0.0,
    opt_state: optax.OptState | None = None,
    validation_data: tuple[ArrayLike, ArrayLike] | None = None,
    callback: Callable[[int, FitHistory], None] | None = None,
) -> tuple[Params, FitHistory]:
    """Trains ``params`` with ``optimizer`` for ``epochs`` passes over ``(x, y)``.

    With ``batch_size`` None (or at least the number of examples) every epoch
    is one full-batch step, which is how :func:`optax.lbfgs` should be run.
    Otherwise each epoch shuffles the examples with a fresh split of ``key`` and
    takes one :func:`make_train_step` step per mini-batch; the last batch holds
    the remainder (padded to the common shape, the padding masked out of the
    mean, so it is exactly a short batch). A whole epoch runs as one compiled function (a
    :func:`jax.lax.scan` over the batches), compiled once before the first
    epoch; the history's ``seconds`` leave that compilation out.

    After every epoch the objective and accuracy are measured on the whole
    training set (and on ``validation_data`` when given), recorded in the
    history, and ``callback(epoch, history)`` is called (``epoch`` counts
    from 1), e.g. to drive a progress bar.

    Args:
      params: Initial parameters, e.g. from :func:`init_params`.
      optimizer: Any optax ``GradientTransformation``.
      x: Training features ``[N, D]``; cast to the parameters' dtype.
      y: Integer training labels ``[N]``.
      epochs: Number of passes over the data (at least 1).
      batch_size: Mini-batch size, or None for full batch.
      key: PRNG key for the shuffling; ``jax.random.key(0)`` if None.
      l2: The L2 strength on the weights (see :func:`loss`).
      opt_state: An optimiser state to resume from; ``optimizer.init(params)``
        if None.
      validation_data: Optional ``(x_val, y_val)`` to evaluate each epoch.
      callback: Optional ``callback(epoch, history)`` called after each epoch.

    Returns:
      ``(params, history)``: the trained parameters and a :class:`FitHistory`.

    Example:
      >>> import jax, optax
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
      >>> y = jnp.array([0, 1, 0, 1])
      >>> p = init_params(jax.random.key(0), 2, 2)
      >>> p, hist = fit(p, optax.lbfgs(), x, y, epochs=10, l2=1e-2)
      >>> len(hist.loss), hist.accuracy[-1]
      (10, 1.0)
    """
    w, _ = _check_params(params)
    dtype = w.dtype
    if isinstance(epochs, bool) or not isinstance(epochs, int | np.integer) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    l2 = _check_l2(l2)
    x = _as_features("x", x, dtype)
    n = x.shape[0]
    if n == 0:
        raise ValueError("x must hold at least one example")
    if x.shape[1] != w.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features but params['w'] has shape {w.shape}")
    y = _as_labels("y", y, n)
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
            raise TypeError(f"batch_size must be an int or None, got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size!r}")
    full_batch = batch_size is None or batch_size >= n
    if validation_data is not None:
        x_val = _as_features("validation x", validation_data[0], dtype)
        y_val = _as_labels("validation y", validation_data[1], x_val.shape[0])
        if x_val.shape[1] != x.shape[1]:
            raise ValueError(
                f"validation x has {x_val.shape[1]} features, the training x {x.shape[1]}"
            )
    key = jax.random.key(0) if key is None else key

    step = make_train_step(optimizer, l2)
    if opt_state is None:
        opt_state = optimizer.init(params)
    params = _strong(jax.tree.map(jnp.asarray, params))
    opt_state = _strong(opt_state)

    if full_batch:

        def train_epoch(params, opt_state, key, x, y):
            params, opt_state, _ = step(params, opt_state, x, y)
            return params, opt_state

    else:
        # Every batch has the same shape, so one compiled step serves them all: a
        # short last batch is padded and its padding masked out of the mean.
        size = int(batch_size)
        num_batches = -(-n // size)
        padding = num_batches * size - n

        def train_epoch(params, opt_state, key, x, y):
            order = jax.random.permutation(key, n)
            if padding:
                order = jnp.concatenate([order, jnp.zeros((padding,), order.dtype)])
            batches = {
                "x": x[order].reshape(num_batches, size, x.shape[1]),
                "y": y[order].reshape(num_batches, size),
            }
            if padding:
                real = jnp.arange(num_batches * size) < n
                batches["where"] = real.reshape(num_batches, size)

            def body(carry, batch):
                p, s, _ = step(carry[0], carry[1], batch["x"], batch["y"], batch.get("where"))
                return (p, s), None

            (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), batches)
            return params, opt_state

    def run_epoch(params, opt_state, key, data):
        # One epoch and its evaluation in one compiled call with one transfer back.
        key, epoch_key = jax.random.split(key)
        params, opt_state = train_epoch(params, opt_state, epoch_key, data[0], data[1])
        metrics = [loss(params, data[0], data[1], l2), accuracy(params, data[0], data[1])]
        if len(data) == 4:
            metrics += [loss(params, data[2], data[3], l2), accuracy(params, data[2], data[3])]
        metrics = jnp.stack([m.astype(jnp.float32) for m in metrics])
        return params, _strong(opt_state), key, metrics

    data = (x, y) if validation_data is None else (x, y, x_val, y_val)
    history = FitHistory()
    start = time.perf_counter()
    epoch_fn = jax.jit(run_epoch).lower(params, opt_state, key, data).compile()
    history.compile_seconds = time.perf_counter() - start

    elapsed = 0.0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        params, opt_state, key, metrics = epoch_fn(params, opt_state, key, data)
        values = np.asarray(metrics).tolist()
        elapsed += time.perf_counter() - start
        history.loss.append(values[0])
        history.accuracy.append(values[1])
        if len(values) == 4:
            history.val_loss.append(values[2])
            history.val_accuracy.append(values[3])
        history.seconds.append(elapsed)
        if callback is not None:
            callback(epoch, history)
    return params, history
