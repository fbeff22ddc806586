"""Writes the teaching notebooks in ``notebooks/`` from the cell sources below.

The notebooks are generated so that their source is reviewable as ordinary Python:
edit the cells here, then run

    python scripts/build_notebooks.py        # writes the notebooks, without outputs
    python scripts/regenerate_notebooks.py   # executes them and saves the outputs

(``python scripts/regenerate_notebooks.py --build`` does both.)

Every code cell is kept ``ruff format``-clean (``ruff`` also lints the notebooks).
"""

# The cell sources are indented inside this file, so their lines may run past the
# limit here; the notebooks themselves are linted with the normal line length.
# ruff: noqa: E501

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"

# The repository the Colab install cell installs from. The project's public URL
# is not fixed yet: change it here and rebuild.
GIT_URL = "https://github.com/jsoftmax/jsoftmax"

INSTALL_CELL = f'''
# Colab setup: install jsoftmax when it is not importable. Where jsoftmax is
# already installed (a local checkout, CI) this cell does nothing.
# The project's public repository (a placeholder until its address is fixed):
JSOFTMAX_GIT_URL = "{GIT_URL}"
try:
    import jsoftmax  # noqa: F401
except ImportError:
    %pip install -q "jsoftmax[train] @ git+{{JSOFTMAX_GIT_URL}}"
'''

# Marks the install cell, so that tests can find it.
INSTALL_TAG = "install"


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, tags: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_code_cell(textwrap.dedent(text).strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def install() -> nbformat.NotebookNode:
    return code(INSTALL_CELL, tags=(INSTALL_TAG,))


# ---------------------------------------------------------------------------
# 1. Softmax and its stability
# ---------------------------------------------------------------------------


def softmax_stability() -> list[nbformat.NotebookNode]:
    return [
        md(r"""
        # Softmax and its stability

        Softmax turns a vector of real numbers (*logits*) into a probability
        distribution. Written down naively it overflows to `NaN` on perfectly
        reasonable inputs. This notebook shows why, and how the **max-shift
        trick** fixes it without approximating anything. Then it looks at the
        cases real models hit: masks and `-inf`, 16-bit floats, and temperature.

        Every claim below is checked by the code next to it: against a float64
        reference, with an `assert`, or by printing both sides.
        """),
        install(),
        code("""
        %matplotlib inline
        import math

        import jax
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np
        import optax

        import jsoftmax

        plt.rcParams["figure.dpi"] = 80
        plt.rcParams["savefig.dpi"] = 80
        print("jax", jax.__version__, "on", jax.devices()[0].platform)
        """),
        md(r"""
        ## 1. The definition

        For logits $x \in \mathbb{R}^n$,

        $$\mathrm{softmax}(x)_i = \frac{e^{x_i}}{\sum_{j=1}^{n} e^{x_j}}.$$

        Every output is positive, the outputs sum to 1, the largest logit gets
        the largest probability, and adding the same constant to every logit
        changes nothing (the factor $e^c$ cancels). Here is the formula, typed
        in directly:
        """),
        code("""
        def naive_softmax(x):
            e = jnp.exp(x)
            return e / jnp.sum(e, axis=-1, keepdims=True)


        x = jnp.array([1.0, 2.0, 3.0, 4.0])
        p = naive_softmax(x)
        print("logits          ", x)
        print("naive softmax   ", p, " sum =", p.sum())
        print("jsoftmax.softmax", jsoftmax.softmax(x))
        print("naive, x + 10   ", naive_softmax(x + 10.0))
        np.testing.assert_allclose(jsoftmax.softmax(x), p, rtol=1e-6)
        np.testing.assert_allclose(naive_softmax(x + 10.0), p, rtol=1e-6)
        """),
        md(r"""
        With two classes, softmax is the logistic sigmoid of the difference of the
        logits: $\mathrm{softmax}([t, 0])_0 = e^t / (e^t + 1) = \sigma(t)$.
        """),
        code("""
        t = jnp.linspace(-8.0, 8.0, 201)
        p0 = jsoftmax.softmax(jnp.stack([t, jnp.zeros_like(t)], axis=-1))[:, 0]
        np.testing.assert_allclose(p0, jax.nn.sigmoid(t), atol=1e-6)

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(t, p0, label="softmax([t, 0])[0]")
        ax.plot(t[::10], jax.nn.sigmoid(t[::10]), "o", ms=4, label="sigmoid(t)")
        ax.set_xlabel("t")
        ax.set_ylabel("probability of class 0")
        ax.legend()
        plt.show()
        """),
        md(r"""
        ## 2. The naive version overflows

        A float32 holds numbers up to about $3.4 \times 10^{38}$, so $e^{x}$
        overflows to `inf` as soon as $x > \ln(3.4 \times 10^{38}) \approx 88.7$.
        Then the formula computes $\infty / \infty$, which is `NaN`. On the other
        side, $e^{x}$ underflows to 0 below about $-87.3$ (the smallest normal
        float32 is $1.2 \times 10^{-38}$, and XLA on CPU flushes the smaller,
        subnormal numbers to zero), and the formula computes $0 / 0$, also
        `NaN`. Logits of a few hundred are not exotic: an untrained network, a
        small temperature or an attention score of two long vectors produce
        them.
        """),
        code("""
        print("largest float32:", jnp.finfo(jnp.float32).max)
        print("its log:        ", math.log(jnp.finfo(jnp.float32).max))

        big = jnp.array([1000.0, 1001.0, 1002.0])
        print("exp(big)              ", jnp.exp(big))
        print("naive_softmax(big)    ", naive_softmax(big))
        print("naive_softmax(-big)   ", naive_softmax(-big))
        print("jsoftmax.softmax(big) ", jsoftmax.softmax(big))
        print("jsoftmax.softmax(-big)", jsoftmax.softmax(-big))
        """),
        md(r"""
        The answer should not depend on where the logits sit, only on their
        differences. Sliding $[0, 1, 2]$ along the real line by a shift $c$ shows
        exactly where the naive formula stops working (shaded: `NaN`):
        """),
        code("""
        shifts = jnp.linspace(-150.0, 150.0, 601)
        logits = jnp.array([0.0, 1.0, 2.0]) + shifts[:, None]
        naive = naive_softmax(logits)[:, 2]
        stable = jsoftmax.softmax(logits)[:, 2]

        fig, ax = plt.subplots(figsize=(7, 3))
        ax.fill_between(shifts, 0, 1, where=np.isnan(naive), color="tab:red", alpha=0.15)
        ax.plot(shifts, stable, lw=3, label="jsoftmax.softmax")
        ax.plot(shifts, naive, "--", lw=2, label="naive (NaN is not drawn)")
        ax.set_xlabel("shift c added to the logits [0, 1, 2]")
        ax.set_ylabel("probability of the last class")
        ax.set_ylim(0, 1)
        ax.legend(loc="center")
        plt.show()
        nan_at = np.asarray(shifts)[np.isnan(naive)]
        print(f"naive is NaN for c < {nan_at[nan_at < 0].max()} and c > {nan_at[nan_at > 0].min()}")
        """),
        md(r"""
        Look at the spikes at the edges of the valid region: just before it
        turns `NaN`, the naive formula returns *confidently wrong* numbers.
        On the right, the sum overflows before its largest term does, so every
        probability is a finite number divided by `inf`: zero. On the left, the
        two smaller terms underflow to 0 first, and the largest class gets
        everything.
        """),
        code("""
        for c in [86.5, -89.0]:
            x = jnp.array([0.0, 1.0, 2.0]) + c
            print(f"c = {c:>5}: naive {naive_softmax(x)}, jsoftmax {jsoftmax.softmax(x)}")
        """),
        md(r"""
        ## 3. The max-shift trick, and why it is exact

        For any constant $c$,

        $$\frac{e^{x_i - c}}{\sum_j e^{x_j - c}}
          = \frac{e^{-c}\, e^{x_i}}{e^{-c} \sum_j e^{x_j}}
          = \frac{e^{x_i}}{\sum_j e^{x_j}}.$$

        This is an identity, not an approximation: we are free to evaluate
        whichever of these equal fractions is easiest for the computer. Choose
        $c = m = \max_j x_j$. Then

        * every exponent $x_i - m \le 0$, so every $e^{x_i - m} \in (0, 1]$:
          nothing can overflow;
        * the largest term is exactly $e^0 = 1$, so the denominator lies in
          $[1, n]$: no division by zero, no $0/0$;
        * a term that underflows to 0 has a true probability below
          $e^{-87} \approx 10^{-38}$, too small for a normal float32 anyway.

        The only new rounding is in the subtraction $x_i - m$, which is exact
        whenever $x_i$ is within a factor of two of $m$ (Sterbenz's lemma) and
        otherwise rounded like any float32 operation.
        """),
        code("""
        def stable_softmax(x):
            m = jnp.max(x, axis=-1, keepdims=True)
            e = jnp.exp(x - m)
            return e / jnp.sum(e, axis=-1, keepdims=True)


        print("stable_softmax(big)", stable_softmax(big))
        print("stable_softmax(-big)", stable_softmax(-big))
        """),
        md(r"""
        How accurate is it? Compare with a float64 reference computed from the
        same float32 logits, for logits spread around larger and larger offsets.
        The relative error of the stable versions stays around $10^{-6}$ or
        below at every offset, while the naive version gives up.

        (The small probabilities dominate these numbers. A probability of
        $10^{-20}$ is $e^{-46}$, and rounding an exponent of size 46 to float32
        already moves it by up to $2 \times 10^{-6}$ in relative terms. jsoftmax
        computes each probability as $e^{x_i - m - \log S}$ instead of dividing
        by $S$, which puts one more rounding into that exponent. The library
        promises a relative error below $10^{-5}$ in float32.)
        """),
        code("""
        def reference_softmax(x):
            x = np.asarray(x, np.float64)
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)


        def max_relative_error(p, ref):
            ref = np.asarray(ref)
            keep = ref > 1e-30  # compare the entries float32 can hold
            return np.max(np.abs(np.asarray(p, np.float64)[keep] - ref[keep]) / ref[keep])


        rng = np.random.default_rng(0)
        print(f"{'offset':>8} | {'naive':>10} | {'stable_softmax':>14} | {'jsoftmax':>10}")
        for offset in [0.0, 50.0, 100.0, 1e3, 1e4]:
            x = jnp.asarray(rng.normal(size=(64, 100)) * 5 + offset, jnp.float32)
            ref = reference_softmax(x)
            errors = [max_relative_error(f(x), ref) for f in (naive_softmax, stable_softmax)]
            ours = max_relative_error(jsoftmax.softmax(x), ref)
            assert ours < 1e-5  # the library's float32 promise
            print(f"{offset:>8g} | {errors[0]:>10.2e} | {errors[1]:>14.2e} | {ours:>10.2e}")
        """),
        md(r"""
        ### In log space: `log_softmax` and `logsumexp`

        The same shift gives the logarithms directly:

        $$\mathrm{logsumexp}(x) = \log \sum_j e^{x_j} = m + \log \sum_j e^{x_j - m},
          \qquad \log \mathrm{softmax}(x)_i = x_i - \mathrm{logsumexp}(x).$$

        Taking the log of a computed softmax is *not* the same thing: a
        probability below $10^{-45}$ has already underflowed to 0, and its log is
        `-inf`. `log_softmax` never forms the probability, so it keeps the
        exact answer. This is why cross-entropy losses are computed from
        `log_softmax`, never from `log(softmax)`.
        """),
        code("""
        x = jnp.array([0.0, -50.0, -200.0])
        print("log(softmax(x))", jnp.log(jsoftmax.softmax(x)))
        print("log_softmax(x) ", jsoftmax.log_softmax(x))
        print("logsumexp(x)   ", jsoftmax.logsumexp(x))
        print("logsumexp(big) ", jsoftmax.logsumexp(big))
        print("naive, big     ", jnp.log(jnp.sum(jnp.exp(big))))
        """),
        md(r"""
        ## 4. Masks and `-inf`

        Models often have to rule some classes out: padding tokens, illegal
        moves, future positions in causal attention. Two equivalent ways to say
        so: set those logits to `-inf` (since $e^{-\infty} = 0$ exactly), or pass
        a boolean mask `where` (`True` = keep). The kept entries are then a
        softmax over themselves alone.
        """),
        code("""
        x = jnp.array([2.0, 1.0, 0.5, 3.0])
        keep = jnp.array([True, True, True, False])
        with_mask = jsoftmax.softmax(x, where=keep)
        with_inf = jsoftmax.softmax(jnp.where(keep, x, -jnp.inf))
        print("where=keep    ", with_mask)
        print("-inf logits   ", with_inf)
        print("softmax(x[:3])", jsoftmax.softmax(x[:3]))
        np.testing.assert_allclose(with_mask, with_inf)
        np.testing.assert_allclose(with_mask[:3], jsoftmax.softmax(x[:3]), rtol=1e-6)
        """),
        md(r"""
        The interesting case is a row where **everything** is masked, such as a
        padding query in attention. Its maximum is $-\infty$, the shift computes
        $-\infty - (-\infty) = $ `NaN`, and the `NaN` then spreads through the
        rest of the model (and its gradients) on the next step. There is no
        probability to share in such a row, so jsoftmax returns all zeros
        (`log_softmax` and `logsumexp` give `-inf`), with zero gradient.

        A causal attention pattern where the last two query positions are
        padding and see nothing. `stable_softmax` on `-inf` scores fills those
        rows with `NaN` (drawn blank); jsoftmax gives zeros:
        """),
        code("""
        n = 6
        scores = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)), jnp.float32)
        causal = jnp.tril(jnp.ones((n, n), bool))
        padded_query = jnp.arange(n) >= n - 2
        keep = causal & ~padded_query[:, None]

        hand_written = stable_softmax(jnp.where(keep, scores, -jnp.inf))
        ours = jsoftmax.softmax(scores, where=keep)
        nan_rows = np.flatnonzero(np.isnan(hand_written).any(axis=1))
        print("rows that are NaN (hand-written):", nan_rows)
        print("row sums (jsoftmax):", ours.sum(axis=1))

        fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
        titles = ["stable_softmax", "jsoftmax.softmax"]
        for ax, weights, title in zip(axes, [hand_written, ours], titles, strict=True):
            image = ax.imshow(weights, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(title)
            ax.set_xlabel("key")
            ax.set_ylabel("query")
        fig.colorbar(image, ax=axes, shrink=0.8)
        plt.show()
        """),
        code("""
        def weighted_sum(x, mask):
            return jnp.sum(jsoftmax.softmax(x, where=mask) * jnp.arange(3.0))


        nothing = jnp.array([False, False, False])
        x = jnp.array([1.0, 2.0, 3.0])
        print("softmax, fully masked   ", jsoftmax.softmax(x, where=nothing))
        print("log_softmax, fully masked", jsoftmax.log_softmax(x, where=nothing))
        print("logsumexp, fully masked ", jsoftmax.logsumexp(x, where=nothing))
        print("gradient, fully masked  ", jax.grad(weighted_sum)(x, nothing))
        print("softmax, all -inf       ", jsoftmax.softmax(jnp.full(3, -jnp.inf)))
        """),
        md(r"""
        ### Extreme inputs: `jax.nn` and `optax` next to jsoftmax

        The same inputs through `jax.nn.softmax`, `optax`'s cross-entropy and
        jsoftmax. (`jax.nn.softmax` handles a fully masked `where` fine; it is an
        all-`-inf` row that it turns into `NaN`.) The limits jsoftmax returns:
        a logit of `+inf` takes all the probability, a `NaN` logit poisons its
        row so the bug is visible rather than hidden.
        """),
        code("""
        inf = jnp.inf
        cases = {
            "[1e30, -1e30, 0]": jnp.array([1e30, -1e30, 0.0]),
            "[inf, 0, 0]": jnp.array([inf, 0.0, 0.0]),
            "[-inf, -inf, -inf]": jnp.array([-inf, -inf, -inf]),
            "[nan, 0, 0]": jnp.array([jnp.nan, 0.0, 0.0]),
        }
        print(f"{'softmax of':<20} | {'jax.nn.softmax':<24} | {'jsoftmax.softmax':<24}")
        for name, x in cases.items():
            print(f"{name:<20} | {str(jax.nn.softmax(x)):<24} | {str(jsoftmax.softmax(x)):<24}")
        """),
        md(r"""
        For the loss, the question is what happens to a class that is impossible
        (`-inf` logit) and also not the target (label 0). The true contribution
        is $0 \cdot \log 0 = 0$, but a formula that multiplies
        `labels * log_softmax` computes $0 \cdot (-\infty) = $ `NaN`. A padding
        row (all logits `-inf`, all labels 0) should cost nothing.
        """),
        code("""
        def optax_loss_and_grad(logits, labels):
            return jax.value_and_grad(optax.softmax_cross_entropy)(logits, labels)


        def jsoftmax_loss_and_grad(logits, labels):
            return jax.value_and_grad(jsoftmax.softmax_cross_entropy)(logits, labels)


        loss_cases = {
            "-inf logit, label 0": (jnp.array([0.0, -inf, 1.0]), jnp.array([1.0, 0.0, 0.0])),
            "padding row": (jnp.full(3, -inf), jnp.zeros(3)),
            "1e30 logits": (jnp.array([1e30, -1e30, 0.0]), jnp.array([0.0, 1.0, 0.0])),
        }
        for name, (logits, labels) in loss_cases.items():
            print(name)
            for library, fn in [("optax", optax_loss_and_grad), ("jsoftmax", jsoftmax_loss_and_grad)]:
                loss, grad = fn(logits, labels)
                print(f"  {library:<9} loss {float(loss):<10.4g} grad {grad}")
        """),
        md(r"""
        ## 5. Low precision: float16 and bfloat16

        The 16-bit formats fail in different ways.

        * **float16** has a tiny range: its largest value is 65504, so $e^x$
          overflows already for $x > \ln 65504 \approx 11.1$.
        * **bfloat16** has float32's range (no early overflow) but only 8
          significant bits, about 2 to 3 decimal digits. Computing the
          exponentials and their sum in bfloat16 adds several bfloat16 roundings
          on top of the unavoidable last one.

        jsoftmax computes 16-bit inputs in float32 inside and rounds once, at
        the end, to the input's dtype: its result is within one bfloat16
        rounding of the exact softmax.
        """),
        code("""
        x16 = jnp.array([10.0, 11.0, 12.0], jnp.float16)
        f16_max = float(jnp.finfo(jnp.float16).max)
        print("float16 max:", f16_max, " its log:", math.log(f16_max))
        print("exp(x16)              ", jnp.exp(x16))
        print("naive_softmax(x16)    ", naive_softmax(x16))
        print("jsoftmax.softmax(x16) ", jsoftmax.softmax(x16), jsoftmax.softmax(x16).dtype)
        """),
        md(r"""
        For bfloat16, measure the largest relative error against the exact
        (float64) softmax of the same bfloat16 logits, as the number of classes
        grows. The dashed line is $2^{-8}$, the relative error of rounding a
        single number to bfloat16: nothing stored in bfloat16 can do better.
        """),
        code("""
        rng = np.random.default_rng(0)
        sizes = [10, 100, 1_000, 10_000, 100_000]
        errors = {"stable_softmax in bfloat16": [], "jax.nn.softmax": [], "jsoftmax.softmax": []}
        for n in sizes:
            xb = jnp.asarray(rng.normal(size=n) * 3, jnp.bfloat16)
            ref = reference_softmax(np.asarray(xb, np.float64))
            for name, f in [
                ("stable_softmax in bfloat16", stable_softmax),
                ("jax.nn.softmax", jax.nn.softmax),
                ("jsoftmax.softmax", jsoftmax.softmax),
            ]:
                p = f(xb)
                assert p.dtype == jnp.bfloat16
                errors[name].append(max_relative_error(p, ref))
        assert max(errors["jsoftmax.softmax"]) <= 2.0**-8

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for (name, errs), marker in zip(errors.items(), "os^", strict=True):
            ax.loglog(sizes, errs, marker=marker, label=name)
        ax.axhline(2.0**-8, color="gray", ls="--", label="one bfloat16 rounding")
        ax.set_xlabel("number of classes")
        ax.set_ylabel("max relative error")
        ax.legend()
        plt.show()
        for name, errs in errors.items():
            print(f"{name:<28}", " ".join(f"{e:.1e}" for e in errs))
        """),
        md(r"""
        Gradients come back in the input's dtype too, so a bfloat16 model stays
        bfloat16:
        """),
        code("""
        xb = jnp.array([1.0, 2.0, 3.0], jnp.bfloat16)
        g = jax.grad(lambda x: jsoftmax.log_softmax(x)[0])(xb)
        print(g, g.dtype)
        """),
        md(r"""
        ## 6. Temperature

        Dividing the logits by a temperature $T > 0$ before the softmax,
        $\mathrm{softmax}(x / T)$, controls how peaked the distribution is:
        $T < 1$ sharpens it, $T > 1$ flattens it. As $T \to 0$ it tends to a
        one-hot vector on the largest logit; as $T \to \infty$, to the uniform
        distribution. Sampling from language models, knowledge distillation and
        contrastive losses all use it.
        """),
        code("""
        x = jnp.array([2.0, 1.0, 0.5, -1.0, 0.0])
        temperatures = [0.1, 0.5, 1.0, 2.0, 10.0]

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        width = 0.8 / len(temperatures)
        for k, temp in enumerate(temperatures):
            axes[0].bar(np.arange(5) + k * width, jsoftmax.softmax(x / temp), width, label=f"T = {temp}")
        axes[0].set_xticks(np.arange(5) + 0.4 - width / 2, [f"x={v:g}" for v in x])
        axes[0].set_ylabel("probability")
        axes[0].legend()

        ts = jnp.logspace(-2, 2, 200)
        p = jsoftmax.softmax(x[None, :] / ts[:, None])
        entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(p), 0.0), axis=-1)
        axes[1].semilogx(ts, entropy)
        axes[1].axhline(math.log(5), color="gray", ls="--", label="log 5 (uniform)")
        axes[1].set_xlabel("temperature T")
        axes[1].set_ylabel("entropy (nats)")
        axes[1].legend()
        plt.show()
        """),
        md(r"""
        A small temperature multiplies the logits by a large number, which is
        exactly the regime where the naive formula overflows. The max-shift
        version reaches the one-hot limit cleanly, even for an absurd $T$:
        """),
        code("""
        for temp in [0.01, 1e-30]:
            print(f"T = {temp:g}")
            print("  naive   ", naive_softmax(x / temp))
            print("  jsoftmax", jsoftmax.softmax(x / temp))
        np.testing.assert_array_equal(jsoftmax.softmax(x / 1e-30), jax.nn.one_hot(0, 5))
        """),
        md(r"""
        ## Summary

        * Softmax is shift invariant, so subtracting the row maximum is exact
          algebra that keeps every exponential in $(0, 1]$: no overflow, no
          $0/0$.
        * Work in log space (`log_softmax`, `logsumexp`) when you need logs:
          `log(softmax(x))` underflows.
        * Masked entries take no probability. A fully masked or all-`-inf` row
          is where hand-written code produces `NaN`; jsoftmax returns zeros and
          zero gradients, and the loss treats $0 \cdot \log 0$ as 0.
        * 16-bit inputs are computed in float32 inside: float16 no longer
          overflows at 11, bfloat16 loses only its final rounding.
        * Temperature rescales the logits; small $T$ needs the stable form.

        Next: [the cross-entropy gradient](02_cross_entropy_gradient.ipynb).
        """),
    ]


# ---------------------------------------------------------------------------
# 2. The cross-entropy gradient
# ---------------------------------------------------------------------------


def cross_entropy_gradient() -> list[nbformat.NotebookNode]:
    return [
        md(r"""
        # The cross-entropy gradient

        The gradient of softmax cross-entropy with respect to the logits is
        famously simple: **prediction minus target**. This notebook derives it
        step by step and checks every step numerically, twice: against JAX's
        autodiff and against finite differences, in float64 so the comparison
        is sharp. Then it looks at what jsoftmax gains by coding the result as a
        `jax.custom_vjp` instead of letting autodiff trace the forward pass, and
        at soft labels that do not sum to 1, where the famous shortcut is wrong.
        """),
        install(),
        code("""
        import jax

        jax.config.update("jax_enable_x64", True)  # before any array is created
        """),
        code("""
        %matplotlib inline
        import contextlib
        import io
        import re

        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np
        import optax
        from jax.ad_checkpoint import print_saved_residuals

        import jsoftmax

        plt.rcParams["figure.dpi"] = 80
        plt.rcParams["savefig.dpi"] = 80
        print("jax", jax.__version__, "| default float:", jnp.zeros(()).dtype)
        """),
        md(r"""
        Two helpers: central finite differences, and the largest absolute
        difference between two arrays. With $h = 10^{-6}$ in float64 the finite
        differences are accurate to about $10^{-9}$, so agreement to $10^{-8}$
        confirms a formula independently of JAX.
        """),
        code("""
        def finite_differences(f, z, h=1e-6):
            \"\"\"Jacobian of f at z by central differences: result[..., j] = df/dz_j.\"\"\"
            z = np.asarray(z, np.float64)
            columns = []
            for j in range(z.size):
                step = np.zeros_like(z)
                step.flat[j] = h
                columns.append((np.asarray(f(z + step)) - np.asarray(f(z - step))) / (2 * h))
            return np.stack(columns, axis=-1)


        def check(name, got, want, tol=1e-8):
            diff = float(np.max(np.abs(np.asarray(got) - np.asarray(want))))
            print(f"{name:<50} max |difference| = {diff:.1e}")
            assert diff < tol, name
        """),
        md(r"""
        ## Notation

        Logits $z \in \mathbb{R}^C$, probabilities $a = \mathrm{softmax}(z)$,
        labels $y \in \mathbb{R}^C$ with $y_i \ge 0$ (a probability distribution,
        a one-hot vector, or anything else) and $s = \sum_i y_i$. The loss is

        $$L(z, y) = -\sum_i y_i \log a_i .$$

        We want $\partial L / \partial z$. The plan: the Jacobian of softmax,
        then of log-softmax, then the chain rule.
        """),
        code("""
        rng = np.random.default_rng(0)
        C = 5
        z = jnp.asarray(rng.normal(size=C))
        y = jnp.asarray(rng.dirichlet(np.ones(C)))  # a probability distribution
        a = jsoftmax.softmax(z)
        print("z =", z)
        print("a =", a)
        print("y =", y, " sum(y) =", y.sum())
        """),
        md(r"""
        ## Step 1: the softmax Jacobian

        Write $a_i = e^{z_i} / S$ with $S = \sum_k e^{z_k}$, so
        $\partial S / \partial z_j = e^{z_j}$. The quotient rule gives

        $$\frac{\partial a_i}{\partial z_j}
          = \frac{[i = j]\, e^{z_i} S - e^{z_i} e^{z_j}}{S^2}
          = [i = j]\, a_i - a_i a_j .$$

        So the diagonal is $a_i (1 - a_i)$ and the off-diagonal entries are
        $-a_i a_j$; as a matrix, $J = \mathrm{diag}(a) - a a^\top$. It is
        symmetric, and each row sums to $a_i - a_i \sum_j a_j = 0$: moving all
        logits together changes nothing.

        (jsoftmax functions are `custom_vjp`s, which support reverse mode only,
        so their Jacobians are taken with `jax.jacrev`.)
        """),
        code("""
        J_formula = jnp.diag(a) - jnp.outer(a, a)
        check("formula vs jax.jacrev(jax.nn.softmax)", J_formula, jax.jacrev(jax.nn.softmax)(z))
        check("formula vs jax.jacrev(jsoftmax.softmax)", J_formula, jax.jacrev(jsoftmax.softmax)(z))
        check("formula vs finite differences", J_formula, finite_differences(jsoftmax.softmax, z))
        check("diagonal is a(1 - a)", jnp.diag(J_formula), a * (1 - a))
        check("symmetric", J_formula, J_formula.T)
        check("rows sum to 0", J_formula.sum(axis=1), 0.0)

        fig, ax = plt.subplots(figsize=(3.6, 3))
        image = ax.imshow(J_formula, cmap="RdBu_r", vmin=-0.25, vmax=0.25)
        ax.set_title("softmax Jacobian: diag(a) - a a$^T$")
        ax.set_xlabel("j (logit)")
        ax.set_ylabel("i (probability)")
        fig.colorbar(image)
        plt.show()
        """),
        md(r"""
        ## Step 2: the log-softmax Jacobian

        Dividing row $i$ by $a_i$:

        $$\frac{\partial \log a_i}{\partial z_j} = \frac{1}{a_i}\frac{\partial a_i}{\partial z_j}
          = [i = j] - a_j .$$

        Or directly from $\log a_i = z_i - \log \sum_k e^{z_k}$: the gradient of
        logsumexp is softmax.
        """),
        code("""
        J_log = jnp.eye(C) - a[None, :]
        check("formula vs jax.jacrev(jax.nn.log_softmax)", J_log, jax.jacrev(jax.nn.log_softmax)(z))
        check("formula vs jax.jacrev(jsoftmax.log_softmax)", J_log, jax.jacrev(jsoftmax.log_softmax)(z))
        check("formula vs finite differences", J_log, finite_differences(jsoftmax.log_softmax, z))
        check("grad logsumexp = softmax", jax.grad(jsoftmax.logsumexp)(z), a)
        """),
        md(r"""
        ## Step 3: the chain rule

        $$\frac{\partial L}{\partial z_j}
          = -\sum_i y_i \frac{\partial \log a_i}{\partial z_j}
          = -\sum_i y_i \left([i = j] - a_j\right)
          = -y_j + a_j \sum_i y_i
          = a_j\, s - y_j .$$

        For labels that sum to 1 this is $a - y$: prediction minus target. Each
        component lies in $[-1, 1]$ and the components sum to $s - s = 0$.
        """),
        code("""
        def naive_cross_entropy(z, y):
            return -jnp.sum(y * jnp.log(jax.nn.softmax(z)))


        grad_formula = a * y.sum() - y
        fd_grad = finite_differences(lambda v: jsoftmax.softmax_cross_entropy(v, y), z)
        check("formula vs autodiff of the naive formula", grad_formula, jax.grad(naive_cross_entropy)(z, y))
        check("formula vs jax.grad(optax)", grad_formula, jax.grad(optax.softmax_cross_entropy)(z, y))
        check("formula vs jax.grad(jsoftmax)", grad_formula, jax.grad(jsoftmax.softmax_cross_entropy)(z, y))
        check("formula vs finite differences", grad_formula, fd_grad)
        check("formula vs the chain rule -J_log^T y", grad_formula, -J_log.T @ y)
        check("components sum to 0", grad_formula.sum(), 0.0)
        """),
        md(r"""
        ### A class label

        For an integer label $k$, $y$ is the one-hot vector $e_k$, $s = 1$, and
        the gradient is $a - e_k$: every class gets its probability, except the
        true one, which gets its probability minus 1.
        """),
        code("""
        k = 3
        grad_int = jax.grad(jsoftmax.softmax_cross_entropy_with_integer_labels)(z, k)
        grad_optax = jax.grad(optax.softmax_cross_entropy_with_integer_labels)(z, k)
        grad_one_hot = jax.grad(jsoftmax.softmax_cross_entropy)(z, jax.nn.one_hot(k, C))
        check("a - one_hot(k) vs jsoftmax, integer label", a - jax.nn.one_hot(k, C), grad_int)
        check("a - one_hot(k) vs optax, integer label", a - jax.nn.one_hot(k, C), grad_optax)
        check("jsoftmax: integer label vs one-hot label", grad_int, grad_one_hot)
        print("gradient:", grad_int)
        """),
        md(r"""
        ### The gradient with respect to the labels

        $L$ is linear in $y$, so $\partial L / \partial y_i = -\log a_i$. That
        matters when the labels are themselves computed, as in distillation
        where they are a teacher model's probabilities.
        """),
        code("""
        grad_labels = jax.grad(jsoftmax.softmax_cross_entropy, argnums=1)(z, y)
        check("-log_softmax(z) vs jax.grad w.r.t. labels", -jsoftmax.log_softmax(z), grad_labels)
        fd_labels = finite_differences(lambda v: jsoftmax.softmax_cross_entropy(z, v), y)
        check("-log_softmax(z) vs finite differences", -jsoftmax.log_softmax(z), fd_labels)
        """),
        md(r"""
        ## What reverse mode actually needs: vector-Jacobian products

        Backpropagation never builds a $C \times C$ Jacobian. Given the cotangent
        $g = \partial(\text{final loss}) / \partial a$ of the output, it needs
        $J^\top g$. With $J = \mathrm{diag}(a) - a a^\top$:

        $$J^\top g = a \odot g - a\,(a^\top g) = a \odot \left(g - \langle g, a \rangle\right),$$

        which costs $O(C)$ and needs only the output $a$. For the per-example
        loss, the cotangent $g$ is a scalar and the product is
        $g\,(a\,s - y)$. These closed forms are what jsoftmax's `custom_vjp`
        rules compute.
        """),
        code("""
        g = jnp.asarray(rng.normal(size=C))
        _, softmax_vjp = jax.vjp(jsoftmax.softmax, z)
        check("a * (g - <g, a>) vs jsoftmax's vjp", a * (g - g @ a), softmax_vjp(g)[0])
        check("a * (g - <g, a>) vs J^T g", a * (g - g @ a), J_formula.T @ g)

        Z = jnp.asarray(rng.normal(size=(4, C)))
        Y = jnp.asarray(rng.dirichlet(np.ones(C), size=4))
        per_example_g = jnp.asarray(rng.normal(size=4))
        _, loss_vjp = jax.vjp(jsoftmax.softmax_cross_entropy, Z, Y)
        want = per_example_g[:, None] * (jsoftmax.softmax(Z) * Y.sum(-1, keepdims=True) - Y)
        check("g (a s - y) vs jsoftmax's vjp, a batch", want, loss_vjp(per_example_g)[0])
        """),
        md(r"""
        ## What `custom_vjp` saves compared with plain autodiff

        To run the backward pass, reverse mode keeps *residuals* from the
        forward pass in memory until the gradient is computed. Plain autodiff
        keeps whatever intermediates the backward of each primitive needs;
        a `custom_vjp` keeps exactly what its forward rule returns.

        `jax.ad_checkpoint.print_saved_residuals` lists them. For a batch of 128
        examples over 1000 classes, in float32:
        """),
        code("""
        def show_saved_residuals(name, f, *args):
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                print_saved_residuals(f, *args)
            print(name)
            for line in buffer.getvalue().splitlines():
                line = re.sub(r"from \\S*ipykernel\\S*\\.py", "from this notebook", line)
                print("   ", re.sub(r"from \\S*/(\\S+\\.py)", r"from \\1", line))  # shorter paths


        def mean_loss(loss_fn):
            return lambda logits, labels: jnp.mean(loss_fn(logits, labels))


        def by_hand(logits, labels):
            return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


        logits = jnp.asarray(rng.normal(size=(128, 1000)), jnp.float32)
        labels = jax.nn.softmax(jnp.asarray(rng.normal(size=(128, 1000)), jnp.float32))
        for name, loss_fn in [
            ("plain autodiff of -sum(labels * log_softmax(logits))", by_hand),
            ("optax.softmax_cross_entropy (plain autodiff)", optax.softmax_cross_entropy),
            ("jsoftmax.softmax_cross_entropy (custom_vjp)", jsoftmax.softmax_cross_entropy),
        ]:
            show_saved_residuals(name, mean_loss(loss_fn), logits, labels)
        """),
        md(r"""
        Plain autodiff keeps two new `[128, 1000]` arrays computed inside
        `log_softmax`, besides the labels. jsoftmax keeps the two inputs as
        they are and adds only `[128, 1]` row statistics (the pieces of the
        log-sum-exp): no new array of the logits' size. Its backward recomputes
        the probabilities from the logits and those statistics in one pass.
        With a large vocabulary, where one `[batch, classes]` array can be
        gigabytes, that is one such array held for the backward pass instead of
        two.

        The results are the same:
        """),
        code("""
        ours = jax.value_and_grad(mean_loss(jsoftmax.softmax_cross_entropy))(logits, labels)
        for name, loss_fn in [("by hand", by_hand), ("optax", optax.softmax_cross_entropy)]:
            theirs = jax.value_and_grad(mean_loss(loss_fn))(logits, labels)
            check(f"float32 loss: jsoftmax vs {name}", ours[0], theirs[0], tol=1e-5)
            check(f"float32 gradient: jsoftmax vs {name}", ours[1], theirs[1], tol=1e-7)
        """),
        md(r"""
        ### Higher derivatives, and no forward mode

        jsoftmax's backward rules are themselves written in differentiable
        `jax.numpy`, so the gradient can be differentiated again. The Hessian of
        the loss with respect to the logits is $s\,(\mathrm{diag}(a) - a a^\top)$,
        the softmax Jacobian scaled by $s$ (differentiate $a s - y$ once more):
        """),
        code("""
        hessian = jax.hessian(jsoftmax.softmax_cross_entropy)(z, y)
        check("jax.hessian vs s (diag(a) - a a^T)", hessian, y.sum() * J_formula)
        hessian_rr = jax.jacrev(jax.grad(jsoftmax.softmax_cross_entropy))(z, y)
        check("reverse-over-reverse vs s (diag(a) - a a^T)", hessian_rr, y.sum() * J_formula)
        """),
        md(r"""
        A `custom_vjp` defines reverse mode only, so forward-mode transforms
        (`jax.jvp`, `jax.jacfwd`) raise an error instead of silently
        differentiating something else:
        """),
        code("""
        try:
            jax.jvp(jsoftmax.softmax, (z,), (jnp.ones(C),))
        except Exception as error:
            print(type(error).__name__ + ":", str(error).splitlines()[0])
        """),
        md(r"""
        ## Soft labels that do not sum to 1

        Nothing forces $s = \sum_i y_i$ to be 1. Labels can carry a per-example
        weight (a confidence, a count, a mixing coefficient), or lose mass when
        some classes are dropped. The gradient is then $a\,s - y$, and the
        well-known shortcut $a - y$ is **wrong**: it is off by $a\,(s - 1)$.
        Hand-written backward passes that hard-code $a - y$ silently compute the
        gradient of a different function.
        """),
        code("""
        y_partial = jnp.array([0.3, 0.2, 0.0, 0.0, 0.1])  # sums to 0.6
        y_double = 2.0 * jax.nn.one_hot(1, C)  # sums to 2
        naive_grad = jax.grad(naive_cross_entropy)
        for name, y_s in [("sum(y) = 0.6", y_partial), ("sum(y) = 2", y_double)]:
            s = y_s.sum()
            true_grad = jax.grad(jsoftmax.softmax_cross_entropy)(z, y_s)
            fd_grad = finite_differences(lambda v, y_s=y_s: jsoftmax.softmax_cross_entropy(v, y_s), z)
            print(name)
            check("  a s - y vs jsoftmax", a * s - y_s, true_grad)
            check("  a s - y vs finite differences", a * s - y_s, fd_grad)
            check("  a s - y vs autodiff of the naive formula", a * s - y_s, naive_grad(z, y_s))
            shortcut_error = jnp.max(jnp.abs((a - y_s) - true_grad))
            print(f"  the shortcut a - y is off by up to {float(shortcut_error):.3f}")
        """),
        md(r"""
        Where does the loss go? The gradient $a\,s - y$ vanishes exactly when
        $a = y / s$: unnormalised labels pull the prediction towards the
        *normalised* distribution, and $s$ only scales the loss (and so the
        step size). Gradient descent on the logits confirms it:
        """),
        code("""
        y_soft = jnp.array([0.3, 0.2, 0.05, 0.05, 0.1])  # sums to 0.7
        loss_and_grad = jax.jit(jax.value_and_grad(jsoftmax.softmax_cross_entropy))
        v = jnp.zeros(C)
        history = []
        for _ in range(300):
            loss, grad = loss_and_grad(v, y_soft)
            history.append(float(loss))
            v = v - 1.0 * grad
        print("softmax(v) after descent:", jsoftmax.softmax(v))
        print("y / sum(y):              ", y_soft / y_soft.sum())
        check("converged to y / sum(y)", jsoftmax.softmax(v), y_soft / y_soft.sum(), tol=1e-6)

        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(history)
        min_loss = -jnp.sum(y_soft * jnp.log(y_soft / y_soft.sum()))
        ax.axhline(float(min_loss), color="gray", ls="--", label="-sum(y log(y / s))")
        ax.set_xlabel("gradient step")
        ax.set_ylabel("loss")
        ax.legend()
        plt.show()
        """),
        md(r"""
        ### Impossible classes

        The formula also settles the `-inf` edge case from the first notebook:
        a class with logit $-\infty$ has $a_j = 0$, so if its label is 0 its
        gradient is $0 \cdot s - 0 = 0$ and its loss term is $0 \cdot \log 0 = 0$.
        Code that multiplies `labels * log_softmax(logits)` computes that term
        as $0 \cdot (-\infty) =$ `NaN`; autodiff of it still finds the right
        gradient, but through `log(softmax(logits))` the gradient is `NaN` too.
        """),
        code("""
        z_inf = jnp.array([0.0, -jnp.inf, 1.0])
        y_inf = jnp.array([0.5, 0.0, 0.5])
        for name, loss_fn in [
            ("-sum(y * log(softmax(z)))", naive_cross_entropy),
            ("optax.softmax_cross_entropy", optax.softmax_cross_entropy),
            ("jsoftmax.softmax_cross_entropy", jsoftmax.softmax_cross_entropy),
        ]:
            loss, grad = jax.value_and_grad(loss_fn)(z_inf, y_inf)
            print(f"{name:<31} loss {float(loss):<8.4f} gradient {grad}")
        a_inf = jsoftmax.softmax(z_inf)
        grad_inf = jax.grad(jsoftmax.softmax_cross_entropy)(z_inf, y_inf)
        check("a s - y vs jsoftmax gradient at -inf", a_inf * y_inf.sum() - y_inf, grad_inf)
        """),
        md(r"""
        ## Summary

        | quantity | closed form |
        | --- | --- |
        | softmax Jacobian | $\partial a_i / \partial z_j = a_i([i=j] - a_j)$: $a_i(1-a_i)$ on the diagonal, $-a_i a_j$ off it |
        | log-softmax Jacobian | $[i=j] - a_j$ |
        | cross-entropy, logits | $a \sum_i y_i - y$; $a - y$ when the labels sum to 1; $a - e_k$ for a class label $k$ |
        | cross-entropy, labels | $-\log a$ |
        | softmax VJP | $a \odot (g - \langle g, a\rangle)$ |
        | Hessian w.r.t. logits | $s\,(\mathrm{diag}(a) - a a^\top)$ |

        jsoftmax implements these as `custom_vjp` rules: the same numbers as
        autodiff (checked above), less memory saved for the backward pass, and a
        correct answer at `-inf`.

        Next: [a linear classifier with optax](03_linear_classifier_optax.ipynb).
        """),
    ]


# ---------------------------------------------------------------------------
# 3. A linear classifier with optax
# ---------------------------------------------------------------------------


def linear_classifier() -> list[nbformat.NotebookNode]:
    return [
        md(r"""
        # A linear classifier with optax

        Multinomial logistic regression is the smallest model that uses
        everything from the first two notebooks: a linear map to logits, softmax
        cross-entropy as the loss, and its gradient $a - y$ driving an optimiser.
        This notebook trains one on scikit-learn's handwritten digits twice,
        with `jsoftmax.classifier` and with an optax loop written by hand, then
        looks inside the model: the confusion matrix, the ten learned weight
        vectors, the digits it gets wrong, and a comparison with scikit-learn's
        `LogisticRegression` on exactly the same objective.

        Set the environment variable `JSOFTMAX_NOTEBOOK_FAST=1` to run with a
        few epochs only (the test suite does).
        """),
        install(),
        code("""
        %matplotlib inline
        import os
        import time

        import jax
        import jax.numpy as jnp
        import matplotlib.pyplot as plt
        import numpy as np
        import optax
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression
        from sklearn.model_selection import train_test_split
        from sklearn.preprocessing import StandardScaler

        import jsoftmax
        from jsoftmax import classifier

        plt.rcParams["figure.dpi"] = 80
        plt.rcParams["savefig.dpi"] = 80

        FAST = os.environ.get("JSOFTMAX_NOTEBOOK_FAST") == "1"
        EPOCHS = 5 if FAST else 60  # mini-batch epochs, for Adam
        LBFGS_STEPS = 30 if FAST else 200  # full-batch L-BFGS steps
        BATCH_SIZE = 64
        print("jax", jax.__version__, "| fast mode" if FAST else "| full run")
        """),
        md(r"""
        ## The data

        `load_digits` ships with scikit-learn (no download): 1797 greyscale
        images of 8x8 pixels, values 0 to 16, ten classes. We keep a quarter of
        them for testing, stratified so every digit is equally represented, and
        standardise each pixel with the training set's mean and standard
        deviation.
        """),
        code("""
        digits = load_digits()
        images, y_all = digits.images, digits.target
        print("images", images.shape, "labels", np.bincount(y_all))

        fig, axes = plt.subplots(1, 10, figsize=(10, 1.3))
        for k, ax in enumerate(axes):
            ax.imshow(images[np.flatnonzero(y_all == k)[0]], cmap="gray_r")
            ax.set_title(str(k))
            ax.axis("off")
        plt.show()
        """),
        code("""
        index_train, index_test = train_test_split(
            np.arange(len(y_all)), test_size=0.25, stratify=y_all, random_state=0
        )
        scaler = StandardScaler().fit(digits.data[index_train])
        x_train64 = scaler.transform(digits.data[index_train])  # float64, for scikit-learn
        x_test64 = scaler.transform(digits.data[index_test])
        x_train, x_test = x_train64.astype(np.float32), x_test64.astype(np.float32)
        y_train, y_test = y_all[index_train], y_all[index_test]
        n_train, n_features = x_train.shape
        n_classes = 10
        print(f"train {x_train.shape}, test {x_test.shape}")
        """),
        md(r"""
        ## The model and the objective

        Logits $z = x W + b$ with $W \in \mathbb{R}^{64 \times 10}$ and
        $b \in \mathbb{R}^{10}$, probabilities $\mathrm{softmax}(z)$, and the
        objective

        $$\frac{1}{n}\sum_{i=1}^{n} \mathrm{CE}(x_i W + b,\; y_i)
          + \frac{\lambda}{2}\, \lVert W \rVert^2 .$$

        scikit-learn's `LogisticRegression(C=C)` minimises
        $C \sum_i \mathrm{CE}_i + \frac12 \lVert W \rVert^2$; dividing by $Cn$
        shows that $\lambda = 1 / (C n)$ gives the same minimiser. We use
        $C = 1$, and the same optimiser for both training loops: Adam with a
        cosine-decaying learning rate.
        """),
        code("""
        C = 1.0
        l2 = 1.0 / (C * n_train)
        steps_per_epoch = -(-n_train // BATCH_SIZE)  # the last batch holds the remainder


        def make_optimizer():
            schedule = optax.cosine_decay_schedule(0.02, decay_steps=EPOCHS * steps_per_epoch)
            return optax.adam(schedule)


        print(f"l2 = {l2:.2e}, {steps_per_epoch} steps per epoch, {EPOCHS} epochs")
        """),
        md(r"""
        ## 1. With `jsoftmax.classifier`

        The library's classifier is a handful of plain functions: `init_params`,
        `logits`, `loss`, `make_train_step(optimizer, l2)`, `fit`, `predict`,
        `predict_proba` and `accuracy`. `fit` runs each epoch as one compiled
        function and records the objective and accuracy after every epoch.
        """),
        code("""
        params0 = classifier.init_params(jax.random.key(0), n_features, n_classes)
        params_lib, history = classifier.fit(
            params0,
            make_optimizer(),
            x_train,
            y_train,
            epochs=EPOCHS,
            batch_size=BATCH_SIZE,
            l2=l2,
            key=jax.random.key(1),
            validation_data=(x_test, y_test),
        )
        print(f"compiled in {history.compile_seconds:.1f} s, trained in {history.seconds[-1]:.2f} s")
        print(f"final objective {history.loss[-1]:.4f}")
        print(f"train accuracy {history.accuracy[-1]:.4f}, test accuracy {history.val_accuracy[-1]:.4f}")
        """),
        md(r"""
        ## 2. The same thing, by hand

        Nothing in `jsoftmax.classifier` is magic. Here is the whole training
        loop written out with optax: a loss function, a jitted step that takes
        its gradient and applies the optimiser's update, and a loop over
        shuffled mini-batches.
        """),
        code("""
        def objective(params, x, y):
            logits = x @ params["w"] + params["b"]
            data_term = jsoftmax.softmax_cross_entropy_with_integer_labels(logits, y, reduction="mean")
            return data_term + 0.5 * l2 * jnp.sum(params["w"] ** 2)


        @jax.jit
        def accuracy(params, x, y):
            return jnp.mean(jnp.argmax(x @ params["w"] + params["b"], axis=-1) == y)


        optimizer = make_optimizer()


        @jax.jit
        def train_step(params, opt_state, x, y):
            value, grads = jax.value_and_grad(objective)(params, x, y)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value


        params_hand = classifier.init_params(jax.random.key(0), n_features, n_classes)
        opt_state = optimizer.init(params_hand)
        hand = {"loss": [], "accuracy": [], "val_accuracy": []}
        shuffle = np.random.default_rng(1)
        start = time.perf_counter()
        for _ in range(EPOCHS):
            order = shuffle.permutation(n_train)
            for begin in range(0, n_train, BATCH_SIZE):
                batch = order[begin : begin + BATCH_SIZE]
                params_hand, opt_state, _ = train_step(
                    params_hand, opt_state, x_train[batch], y_train[batch]
                )
            hand["loss"].append(float(objective(params_hand, x_train, y_train)))
            hand["accuracy"].append(float(accuracy(params_hand, x_train, y_train)))
            hand["val_accuracy"].append(float(accuracy(params_hand, x_test, y_test)))
        print(f"{EPOCHS} epochs in {time.perf_counter() - start:.1f} s (compilation included)")
        print(f"final objective {hand['loss'][-1]:.4f}")
        print(f"train accuracy {hand['accuracy'][-1]:.4f}, test accuracy {hand['val_accuracy'][-1]:.4f}")
        """),
        md(r"""
        The two runs shuffle differently, so their curves are not identical, but
        they optimise the same objective with the same optimiser and land in the
        same place. (The hand-written objective is `classifier.loss`, and
        `classifier.make_train_step(optimizer, l2)` is the step above, ready to
        drop into a loop of your own.)
        """),
        code("""
        check = classifier.loss(params_hand, x_train, y_train, l2)
        np.testing.assert_allclose(check, objective(params_hand, x_train, y_train), rtol=1e-6)

        epochs = np.arange(1, EPOCHS + 1)
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
        axes[0].plot(epochs, history.loss, label="jsoftmax.classifier.fit")
        axes[0].plot(epochs, hand["loss"], "--", label="hand-written loop")
        axes[0].set_yscale("log")
        axes[0].set_xlabel("epoch")
        axes[0].set_ylabel("training objective")
        axes[0].legend()
        for curve, style, name in [
            (history.accuracy, "-", "fit, train"),
            (history.val_accuracy, "-", "fit, test"),
            (hand["accuracy"], "--", "by hand, train"),
            (hand["val_accuracy"], "--", "by hand, test"),
        ]:
            axes[1].plot(epochs, curve, style, label=name)
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("accuracy")
        axes[1].set_ylim(0.85, 1.0)
        axes[1].legend(loc="lower right")
        plt.show()
        """),
        md(r"""
        ## 3. Where it goes wrong: the confusion matrix

        Row $i$, column $j$ counts the test digits of class $i$ predicted as
        $j$; a perfect classifier is diagonal.
        """),
        code("""
        predicted = np.asarray(classifier.predict(params_lib, x_test))
        confusion = np.zeros((n_classes, n_classes), int)
        np.add.at(confusion, (y_test, predicted), 1)
        assert confusion.trace() == (predicted == y_test).sum()
        print(f"test accuracy {confusion.trace() / confusion.sum():.4f}")

        fig, ax = plt.subplots(figsize=(4.8, 4.2))
        ax.imshow(confusion, cmap="Blues")
        for i in range(n_classes):
            for j in range(n_classes):
                if confusion[i, j]:
                    color = "white" if confusion[i, j] > confusion.max() / 2 else "black"
                    ax.text(j, i, confusion[i, j], ha="center", va="center", color=color)
        ax.set_xticks(range(n_classes))
        ax.set_yticks(range(n_classes))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        plt.show()
        """),
        md(r"""
        ## 4. What it learned: the weight vectors as images

        Column $k$ of $W$ holds one weight per pixel: the logit of class $k$ is
        the sum of the (standardised) pixel values times these weights. Drawn as
        8x8 images, red pixels are evidence *for* the digit when they are inked,
        blue pixels evidence against it. The 0 is the easiest to read: a ring of
        positive weight around a negative centre, where a 0 has no ink. Most
        of the others say as much about where ink must *not* be, to tell the
        digit apart from its look-alikes, as about where it should be.
        """),
        code("""
        weights = np.asarray(params_lib["w"])
        limit = np.abs(weights).max()
        fig, axes = plt.subplots(2, 5, figsize=(8, 3.6))
        for k, ax in enumerate(axes.flat):
            image = ax.imshow(weights[:, k].reshape(8, 8), cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(f"class {k}")
            ax.axis("off")
        fig.colorbar(image, ax=axes, shrink=0.8, label="weight")
        plt.show()
        """),
        md(r"""
        ## 5. The digits it gets wrong

        With the predicted probability of the wrong answer and of the true one.
        Some are genuinely ambiguous; a linear model cannot shift or bend a
        template, so unusual handwriting of an easy digit fails too.
        """),
        code("""
        probabilities = np.asarray(classifier.predict_proba(params_lib, x_test))
        wrong = np.flatnonzero(predicted != y_test)
        print(f"{len(wrong)} of {len(y_test)} test digits misclassified")
        shown = wrong[:8]
        fig, axes = plt.subplots(1, 8, figsize=(11, 1.9), squeeze=False)
        for ax in axes[0]:
            ax.axis("off")
        for ax, i in zip(axes[0], shown, strict=False):
            ax.imshow(images[index_test[i]], cmap="gray_r")
            ax.set_title(
                f"true {y_test[i]} ({probabilities[i, y_test[i]]:.2f})\\n"
                f"said {predicted[i]} ({probabilities[i, predicted[i]]:.2f})",
                fontsize=9,
            )
        plt.show()
        """),
        md(r"""
        ## 6. Against scikit-learn

        scikit-learn's `LogisticRegression` minimises the same objective with a
        full-batch L-BFGS solver in float64. Mini-batch Adam only gets near the
        minimum; to compare solutions rather than optimisers, fit once more with
        optax's own L-BFGS, full batch, through the same `classifier.fit` (each
        "epoch" is then one L-BFGS step on the whole training set). The problem
        is strictly convex, so both must find the same weights, up to float32
        rounding.
        """),
        code("""
        start = time.perf_counter()
        sk_model = LogisticRegression(C=C, max_iter=1000, tol=1e-8).fit(x_train64, y_train)
        sk_seconds = time.perf_counter() - start

        zeros = classifier.init_params(jax.random.key(0), n_features, n_classes, scale=0.0)
        params_lbfgs, lbfgs_history = classifier.fit(
            zeros, optax.lbfgs(), x_train, y_train, epochs=LBFGS_STEPS, l2=l2
        )
        lbfgs_seconds = lbfgs_history.compile_seconds + lbfgs_history.seconds[-1]
        print(f"scikit-learn: {sk_seconds:.2f} s; optax L-BFGS: {lbfgs_seconds:.2f} s with compilation")

        sk_proba = sk_model.predict_proba(x_test64)
        lbfgs_proba = np.asarray(classifier.predict_proba(params_lbfgs, x_test))
        gap = np.abs(sk_proba - lbfgs_proba).max()
        weight_gap = np.abs(sk_model.coef_.T - np.asarray(params_lbfgs["w"])).max()
        print(f"max |p_sklearn - p_jsoftmax| on the test set: {gap:.1e}")
        print(f"max |W_sklearn - W_jsoftmax|:                 {weight_gap:.1e}")
        assert gap < (0.1 if FAST else 1e-4)
        """),
        code("""
        def sk_objective(model):
            params = {
                "w": jnp.asarray(model.coef_.T, jnp.float32),
                "b": jnp.asarray(model.intercept_, jnp.float32),
            }
            return float(classifier.loss(params, x_train, y_train, l2))


        rows = [
            ("jsoftmax.classifier.fit, Adam", params_lib),
            ("hand-written optax loop, Adam", params_hand),
            ("jsoftmax.classifier.fit, L-BFGS", params_lbfgs),
        ]
        print(f"{'model':<34} {'objective':>10} {'train acc':>10} {'test acc':>9}")
        for name, params in rows:
            print(
                f"{name:<34} {float(classifier.loss(params, x_train, y_train, l2)):>10.5f}"
                f" {float(classifier.accuracy(params, x_train, y_train)):>10.4f}"
                f" {float(classifier.accuracy(params, x_test, y_test)):>9.4f}"
            )
        print(
            f"{'scikit-learn LogisticRegression':<34} {sk_objective(sk_model):>10.5f}"
            f" {sk_model.score(x_train64, y_train):>10.4f} {sk_model.score(x_test64, y_test):>9.4f}"
        )
        """),
        md(r"""
        ## Summary

        * A linear classifier is logits $xW + b$ plus softmax cross-entropy;
          jsoftmax supplies the loss and its closed-form gradient, optax the
          optimiser.
        * `jsoftmax.classifier.fit` and a dozen lines of hand-written optax give
          the same model; `make_train_step` is the bridge between them.
        * About 97% of the test digits are classified correctly; the weight
          images show what a linear model can and cannot express.
        * With the same objective, optax's L-BFGS and scikit-learn reach the
          same minimiser: the probabilities agree to a few parts in a million.

        Try it from the command line, too: `jsoftmax train --dataset digits`.
        """),
    ]


# ---------------------------------------------------------------------------
# Writing the notebooks
# ---------------------------------------------------------------------------

NOTEBOOKS = {
    "01_softmax_stability.ipynb": softmax_stability,
    "02_cross_entropy_gradient.ipynb": cross_entropy_gradient,
    "03_linear_classifier_optax.ipynb": linear_classifier,
}

METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
    "colab": {"provenance": []},
}


def build(name: str) -> nbformat.NotebookNode:
    """The notebook ``name``, without outputs."""
    notebook = nbformat.v4.new_notebook(cells=NOTEBOOKS[name](), metadata=METADATA)
    for index, cell in enumerate(notebook.cells):
        cell.id = f"cell-{index:02d}"  # stable ids keep the diffs small
    nbformat.validate(notebook)
    return notebook


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to write (default: all)")
    args = parser.parse_args(argv)
    NOTEBOOK_DIR.mkdir(exist_ok=True)
    for name in args.names or NOTEBOOKS:
        path = NOTEBOOK_DIR / Path(name).name
        nbformat.write(build(path.name), path)
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
