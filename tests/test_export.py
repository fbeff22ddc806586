"""Every public function through ``jax.export`` with symbolic sizes (shape polymorphism).

An exported function is traced once, with symbolic sizes such as a batch ``b``
or a class count ``c``, and then runs at any sizes: a server loads one
serialized module for every batch size. The library chooses between forms by
size (blocks for long rows on XLA:CPU, a rarely taken branch a chunk of rows at
a time, the fused loss's chunks of rows), and with symbolic sizes it must take
forms that fit every size. Each case here is exported, serialized and loaded
back, run at sizes on both sides of those choices, and compared with the
float64 references, values and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental import checkify

import jsoftmax
from tests import reference as ref

TOL = 1e-5
# (rows, classes): one entry; fewer rows than any chunk; a remainder; rows of
# 40000 float32 logits, which XLA:CPU reduces in blocks when the size is known.
SIZES = [(1, 1), (5, 3), (37, 100), (3, 40000)]


def exported(fn, *specs, vjp_order=0):
    """``fn`` exported at ``(shape spec, dtype)`` pairs, serialized and loaded back.

    ``vjp_order=1`` serializes its VJP too, for ``jax.grad`` of the loaded module.
    """
    scope = export.SymbolicScope()
    args = [
        jax.ShapeDtypeStruct(export.symbolic_shape(spec, scope=scope), dtype)
        for spec, dtype in specs
    ]
    module = export.export(jax.jit(fn))(*args)
    return export.deserialize(module.serialize(vjp_order=vjp_order))


def class_spec(classes: str, c: int) -> str:
    return "c" if classes == "symbolic" else str(c)


def value_and_vjp(fn, argnums):
    """``fn``'s value alone, its value under ``jax.vjp`` and the VJP w.r.t. ``argnums`` at ``g``.

    The value alone and under a VJP are computed differently (the custom VJP's
    primal function and its forward pass), so both are checked.
    """

    def run(g, *args):
        def of_differentiated(*diff):
            full = list(args)
            for i, a in zip(argnums, diff, strict=True):
                full[i] = a
            return fn(*full)

        value, vjp = jax.vjp(of_differentiated, *(args[i] for i in argnums))
        return fn(*args), value, vjp(g)

    return run


def assert_close_with_infinities(actual, expected):
    """Infinities in the same places; the finite entries within ``TOL`` (norm-wise)."""
    actual, expected = ref.to64(actual), ref.to64(expected)
    np.testing.assert_array_equal(np.isposinf(actual), np.isposinf(expected))
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected))
    finite = np.isfinite(expected)
    assert ref.rel_err(actual[finite], expected[finite]) < TOL


@pytest.mark.parametrize("classes", ["known", "symbolic"])
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "mask"])
@pytest.mark.parametrize("name", ["softmax", "log_softmax", "logsumexp"])
def test_softmax_family(rng, name, masked, classes):
    fn = getattr(jsoftmax, name)
    module = None
    for n, c in SIZES:
        x = (rng.standard_normal((n, c)) * 4).astype(np.float32)
        mask = rng.random((n, c)) < 0.8
        mask[0] = False  # a fully masked row: softmax 0, log_softmax and logsumexp -inf
        out_spec = "b" if name == "logsumexp" else f"b, {class_spec(classes, c)}"
        in_spec = f"b, {class_spec(classes, c)}"
        g = rng.standard_normal((n,) if name == "logsumexp" else (n, c)).astype(np.float32)
        inputs = [g, x] + ([mask] if masked else [])
        if module is None or classes == "known":
            specs = [(out_spec, np.float32), (in_spec, np.float32)]
            specs += [(in_spec, np.bool_)] if masked else []
            module = exported(
                value_and_vjp(lambda x, *m: fn(x, where=m[0] if m else None), (0,)), *specs
            )
        plain, value, (dx,) = module.call(*inputs)
        mask64 = mask if masked else None
        with np.errstate(invalid="ignore"):  # SciPy on rows with no entry
            expected = ref.softmax_family(name, x, mask=mask64)
        if masked:  # SciPy's NaN for a row with no entry: -inf by SPEC §3
            no_entry = ~mask if name == "log_softmax" else ~mask.any(-1)
            expected = np.where(no_entry, -np.inf, expected) if name != "softmax" else expected
        assert_close_with_infinities(plain, expected)
        assert_close_with_infinities(value, expected)
        expected = ref.softmax_family_vjp(name, x, -1, g, mask=mask64)
        ref.assert_gradient_close(dx, expected, g)


@pytest.mark.parametrize("classes", ["known", "symbolic"])
@pytest.mark.parametrize("options", [False, True], ids=["plain", "options"])
def test_soft_label_cross_entropy(rng, options, classes):
    kwargs = {"label_smoothing": 0.1, "z_loss": 1e-3} if options else {}
    module = None
    for n, c in SIZES:
        x = (rng.standard_normal((n, c)) * 4).astype(np.float32)
        y = rng.dirichlet(np.ones(c), n).astype(np.float32)
        weight = rng.uniform(0.5, 2.0, c).astype(np.float32)
        if not options and c > 1:
            # a -inf logit with label 0 (the plain loss's rarely taken exact
            # branch redoes such rows) and, below, a row of -inf only
            x[:, 0], y[:, 0] = -np.inf, 0.0
            y /= y.sum(axis=-1, keepdims=True)
            x[-1] = -np.inf
        g = rng.standard_normal(n).astype(np.float32)
        spec = f"b, {class_spec(classes, c)}"
        if module is None or classes == "known":
            specs = [("b", np.float32), (spec, np.float32), (spec, np.float32)]
            specs += [(class_spec(classes, c), np.float32)] if options else []
            module = exported(
                value_and_vjp(
                    lambda x, y, *w: jsoftmax.softmax_cross_entropy(
                        x, y, class_weights=w[0] if w else None, **kwargs
                    ),
                    (0, 1) if options else (0,),
                ),
                *specs,
            )
        plain, value, grads = module.call(g, x, y, *([weight] if options else []))
        loss64, grad64 = ref.soft_cross_entropy_minus_inf_allowed(
            x,
            y,
            weight if options else None,
            kwargs.get("label_smoothing", 0.0),
            kwargs.get("z_loss", 0.0),
        )
        assert ref.rel_err(plain, loss64) < TOL
        assert ref.rel_err(value, loss64) < TOL
        ref.assert_gradient_close(grads[0], g[:, None] * grad64, g)
        if options:  # d loss / d labels = -(1 - smoothing) * weight * log_softmax
            log_p = ref.log_softmax(x)
            assert ref.rel_err(grads[1], -0.9 * g[:, None] * weight * log_p) < TOL


@pytest.mark.parametrize("classes", ["known", "symbolic"])
def test_soft_label_value_alone_with_class_weights(rng, classes):
    """The value alone with class weights: one fused loop, its edge rows redone a row at a time.

    Class 0 has weight 0 and a -inf logit in every row (the fast loop's
    ``0 * -inf``), and the last row is all -inf (loss 0).
    """
    module = None
    for n, c in SIZES[1:]:
        x = (rng.standard_normal((n, c)) * 4).astype(np.float32)
        y = rng.dirichlet(np.ones(c), n).astype(np.float32)
        weight = rng.uniform(0.5, 2.0, c).astype(np.float32)
        weight[0], x[:, 0], x[-1] = 0.0, -np.inf, -np.inf
        if module is None or classes == "known":
            spec = f"b, {class_spec(classes, c)}"
            module = exported(
                lambda x, y, w: jsoftmax.softmax_cross_entropy(
                    x, y, class_weights=w, label_smoothing=0.1, z_loss=1e-3
                ),
                (spec, np.float32),
                (spec, np.float32),
                (class_spec(classes, c), np.float32),
            )
        expected, _ = ref.soft_cross_entropy_minus_inf_allowed(x, y, weight, 0.1, 1e-3)
        assert ref.rel_err(module.call(x, y, weight), expected) < TOL


@pytest.mark.parametrize("classes", ["known", "symbolic"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_integer_label_cross_entropy_with_every_option(rng, reduction, classes):
    options = {"label_smoothing": 0.1, "z_loss": 1e-3, "ignore_index": -100}
    module = None
    for n, c in SIZES:
        x = (rng.standard_normal((n, c)) * 4).astype(np.float32)
        labels = rng.integers(0, c, n).astype(np.int32)
        labels[::4] = -100
        keep = rng.random(n) < 0.8
        weight = rng.uniform(0.5, 2.0, c).astype(np.float32)
        g = np.float32(0.7) if reduction == "mean" else rng.standard_normal(n).astype(np.float32)
        spec = class_spec(classes, c)
        if module is None or classes == "known":
            module = exported(
                value_and_vjp(
                    lambda x, y, w, m: jsoftmax.softmax_cross_entropy_with_integer_labels(
                        x, y, where=m, class_weights=w, reduction=reduction, **options
                    ),
                    (0,),
                ),
                ("" if reduction == "mean" else "b", np.float32),
                (f"b, {spec}", np.float32),
                ("b", np.int32),
                (spec, np.float32),
                ("b", np.bool_),
            )
        plain, value, (dx,) = module.call(g, x, labels, weight, keep)

        losses, example_weight = ref.cross_entropy_int(
            x, labels, weight, -100, options["label_smoothing"], options["z_loss"]
        )
        losses, example_weight = losses * keep, example_weight * keep
        counted = labels != -100
        safe = np.where(counted, labels, 0)
        row_grad = ref.soft_grad(
            x, np.eye(c)[safe], weight, options["label_smoothing"], options["z_loss"]
        )
        if reduction == "mean":
            denominator = example_weight.sum()
            expected = losses.sum() / denominator if denominator else 0.0
            row_coef = np.full(n, g / denominator if denominator else 0.0)
        else:
            expected, row_coef = losses, ref.to64(g)
        row_coef = np.where(keep & counted, row_coef, 0.0)
        assert ref.rel_err(plain, expected) < TOL
        assert ref.rel_err(value, expected) < TOL
        assert ref.rel_err(dx, row_coef[:, None] * row_grad) < TOL


@pytest.mark.parametrize("classes", ["known", "symbolic"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_loss_at_row_counts_around_the_chunk(rng, reduction, classes):
    d, c, chunk = 16, 50, 8
    options = {"label_smoothing": 0.1, "z_loss": 1e-3, "logit_softcap": 20.0}
    module = None
    # rows: 1; fewer than a chunk; a remainder; whole chunks
    for n in [1, 5, 37, 40]:
        x = rng.standard_normal((n, d)).astype(np.float32)
        w = (rng.standard_normal((d, c)) * 0.5).astype(np.float32)
        b = rng.standard_normal(c).astype(np.float32)
        labels = rng.integers(0, c, n).astype(np.int32)
        labels[1::5] = -1
        keep = rng.random(n) < 0.8
        g = np.float32(0.7) if reduction != "none" else rng.standard_normal(n).astype(np.float32)
        if module is None:
            dims = ("d, c", "c") if classes == "symbolic" else (f"{d}, {c}", str(c))
            module = exported(
                value_and_vjp(
                    lambda x, w, b, y, m: jsoftmax.linear_softmax_cross_entropy(
                        x,
                        w,
                        y,
                        b,
                        where=m,
                        ignore_index=-1,
                        reduction=reduction,
                        chunk_size=chunk,
                        **options,
                    ),
                    (0, 1, 2),
                ),
                ("b" if reduction == "none" else "", np.float32),
                (f"b, {dims[0].split(', ')[0]}", np.float32),
                (dims[0], np.float32),
                (dims[1], np.float32),
                ("b", np.int32),
                ("b", np.bool_),
            )
        plain, value, grads = module.call(g, x, w, b, labels, keep)
        expected = ref.linear_cross_entropy(
            x,
            w,
            labels,
            b,
            cotangent=g,
            where=keep,
            ignore_index=-1,
            reduction=reduction,
            **options,
        )
        for got, want in zip((plain, value, *grads), (expected[0], *expected), strict=True):
            assert ref.rel_err(got, want) < TOL


def test_fused_loss_default_chunk_and_two_batch_axes(rng):
    d, c = 8, 4096
    module = exported(
        value_and_vjp(
            lambda x, w, y: jsoftmax.linear_softmax_cross_entropy(x, w, y, reduction="none"),
            (0, 1),
        ),
        ("b, t", np.float32),
        (f"b, t, {d}", np.float32),
        (f"{d}, {c}", np.float32),
        ("b, t", np.int32),
    )
    for batch in [(1, 1), (3, 700)]:  # 2100 rows: more than the default chunk (2048)
        x = rng.standard_normal((*batch, d)).astype(np.float32)
        w = rng.standard_normal((d, c)).astype(np.float32)
        labels = rng.integers(0, c, batch).astype(np.int32)
        g = rng.standard_normal(batch).astype(np.float32)
        plain, value, grads = module.call(g, x, w, labels)
        expected = ref.linear_cross_entropy(x, w, labels, cotangent=g, reduction="none")
        for got, want in zip((plain, value, *grads), (expected[0], *expected[:3]), strict=True):
            assert got.shape == want.shape
            assert ref.rel_err(got, want) < TOL


def test_gradient_of_a_loaded_module(rng):
    """The closed-form VJPs are serialized with the module (``vjp_order=1``)."""
    n, c = 6, 5
    x = rng.standard_normal((n, c)).astype(np.float32)
    labels = rng.integers(0, c, n).astype(np.int32)
    module = exported(
        lambda x, y: jsoftmax.softmax_cross_entropy_with_integer_labels(x, y, reduction="sum"),
        ("b, c", np.float32),
        ("b", np.int32),
        vjp_order=1,
    )
    dx = jax.grad(module.call)(x, labels)
    expected = ref.softmax(x) - np.eye(c)[labels]
    assert ref.rel_err(dx, expected) < TOL


def test_checkify_reports_a_bad_label_through_export():
    def loss(x, y):
        return jsoftmax.softmax_cross_entropy_with_integer_labels(x, y, reduction="mean")

    # Not serialized: JAX cannot serialize a module with checkify's effect.
    b = export.symbolic_shape("b")[0]
    module = export.export(jax.jit(checkify.checkify(loss, errors=checkify.user_checks)))(
        jax.ShapeDtypeStruct((b, 6), np.float32), jax.ShapeDtypeStruct((b,), np.int32)
    )
    error, value = module.call(np.zeros((4, 6), np.float32), np.array([0, 1, 7, 2], np.int32))
    assert np.isnan(value)
    with pytest.raises(checkify.JaxRuntimeError, match=r"found 7 at flat position 2"):
        error.throw()
    error, value = module.call(np.zeros((3, 6), np.float32), np.array([0, 1, 5], np.int32))
    error.throw()  # in range: no error
    assert np.isclose(value, np.log(6.0))


def hessian_reference(grad64, x, v, h=1e-6):
    """``H v`` in float64: a central difference of the closed-form gradient ``grad64``."""
    x, v = ref.to64(x), ref.to64(v)
    return (grad64(x + h * v) - grad64(x - h * v)) / (2 * h)


# The fused loss's second-order case: 5 features, 10 classes.
FUSED_W = np.random.default_rng(1).standard_normal((5, 10)).astype(np.float32)


def second_order_case(name, rng, n, c):
    """``(f, grad64, y, weights)``: a scalar ``f(x, y, weights)`` of ``x [n, c]``, its
    float64 gradient in ``x`` (the references' closed forms), and ``y`` and ``weights``."""
    weights = rng.uniform(0.5, 1.5, (n, c)).astype(np.float32)
    rows = weights[:, 0]
    labels = rng.integers(0, c, n).astype(np.int32)
    onehot = np.eye(c, dtype=np.float32)[labels]
    if name in ("softmax", "log_softmax", "logsumexp"):
        fn = getattr(jsoftmax, name)
        g = rows if name == "logsumexp" else weights

        def family(x, y, weights):
            return jnp.sum(fn(x) * (weights[:, 0] if name == "logsumexp" else weights))

        return family, lambda x: ref.softmax_family_vjp(name, x, -1, g), labels, weights
    if name == "soft labels":

        def soft(x, y, weights):
            return jnp.sum(jsoftmax.softmax_cross_entropy(x, y) * weights[:, 0])

        return soft, lambda x: rows[:, None] * ref.soft_grad(x, onehot), onehot, weights
    if name == "integer labels":

        def integer(x, y, weights):
            losses = jsoftmax.softmax_cross_entropy_with_integer_labels(x, y)
            return jnp.sum(losses * weights[:, 0])

        return integer, lambda x: rows[:, None] * ref.soft_grad(x, onehot), labels, weights
    # the fused loss, x the features, in chunks of 2 rows
    fused_labels = rng.integers(0, FUSED_W.shape[1], n).astype(np.int32)

    def fused(x, y, weights):
        losses = jsoftmax.linear_softmax_cross_entropy(
            x, FUSED_W, y, reduction="none", chunk_size=2
        )
        return jnp.sum(losses * weights[:, 0])

    def fused_grad(x):
        return ref.linear_cross_entropy(x, FUSED_W, fused_labels, cotangent=rows, reduction="none")[
            1
        ]

    return fused, fused_grad, fused_labels, weights


@pytest.mark.parametrize(
    "name",
    ["softmax", "log_softmax", "logsumexp", "soft labels", "integer labels", "fused"],
)
def test_hessian_vector_products(rng, name):
    """Second derivatives (reverse over reverse) of a module exported at a symbolic batch."""
    c = 5
    module = None
    for n in [1, 7]:  # 7 rows: 4 chunks of 2 for the fused loss, the last one padded
        f, grad64, y, weights = second_order_case(name, rng, n, c)
        x = rng.standard_normal((n, c)).astype(np.float32)
        v = rng.standard_normal((n, c)).astype(np.float32)
        if module is None:

            def hvp(x, v, y, weights, f=f):
                return jax.grad(lambda z: jnp.vdot(jax.grad(f)(z, y, weights), v))(x)

            y_spec = "b, 5" if y.ndim == 2 else "b"
            specs = [("b, 5", np.float32)] * 2 + [(y_spec, y.dtype), ("b, 5", np.float32)]
            module = exported(hvp, *specs)
        assert ref.rel_err(module.call(x, v, y, weights), hessian_reference(grad64, x, v)) < TOL
