"""A smoke test of the benchmark script at tiny sizes (no timing is checked)."""

import jax
import jax.numpy as jnp
import pytest

from jsoftmax import bench


def test_quick_bench_writes_the_table_and_the_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert bench.main(["--quick", "--repeats", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    markdown = (out / "results.md").read_text(encoding="utf-8")
    assert printed.out == markdown
    assert "Device:" in markdown and "Host:" in markdown and "jax " in markdown
    for name in (
        "| softmax |",
        "| log_softmax |",
        "| softmax_cross_entropy |",
        "| softmax_cross_entropy_with_integer_labels |",
    ):
        assert markdown.count(name) == len(bench.QUICK.classes) + len(bench.QUICK.small), name
    assert "fwd+bwd ratio" in markdown
    small_table = markdown.split("### Small arrays, per call")[1].split("###")[0]
    for n, c in bench.QUICK.small:
        assert small_table.count(f" | {c} | {n} | ") == 4
    fused_rows = [line for line in markdown.splitlines() if line.startswith("| 64 | 16 | 256 |")]
    assert len(fused_rows) == 1
    png = (out / "bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "standalone functions" in printed.err  # progress goes to stderr


def test_bad_arguments_exit_with_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--repeats", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--array-mib", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--array-mib must be at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--no-such-flag"])


def test_array_mib_sets_the_rows_of_the_standalone_table(tmp_path, capsys):
    assert (
        bench.main(["--quick", "--repeats", "1", "--array-mib", "1", "--out", str(tmp_path)]) == 0
    )
    markdown = capsys.readouterr().out
    # 1 MiB of float32 at 16 and 256 classes: 16384 and 1024 rows
    assert "| softmax | jax.nn | 16 | 16384 |" in markdown
    assert "| softmax | jax.nn | 256 | 1024 |" in markdown


def test_dtype_sets_the_standalone_tables_dtype(tmp_path, capsys):
    assert (
        bench.main(["--quick", "--repeats", "1", "--dtype", "bfloat16", "--out", str(tmp_path)])
        == 0
    )
    markdown = capsys.readouterr().out
    assert "bfloat16 logits and soft labels (the fused loss below stays float32)" in markdown
    assert markdown.count("| softmax_cross_entropy |") == len(bench.QUICK.classes) + len(
        bench.QUICK.small
    )
    cases = bench._standalone_cases(16, 4, jax.random.PRNGKey(0), jnp.bfloat16)
    for _, _, _, args in cases:
        assert args[0].dtype == jnp.bfloat16
    assert cases[2][3][1].dtype == jnp.bfloat16  # the soft labels
    with pytest.raises(SystemExit):
        bench.main(["--dtype", "float64", "--out", str(tmp_path)])
