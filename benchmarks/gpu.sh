#!/usr/bin/env bash
# One call on a lent GPU machine (the device tool), from the repository root: the
# environment, the benchmark suite, the tuning variants, the tests and the fused loss's
# compiled HLO, each time-boxed. Results go to $OUT.
# Usage: bash benchmarks/gpu.sh [bench|variants|tests|hlo]...  (default: bench variants tests)
#   BENCH_MIBS="32 256": one benchmark run per input size (MiB), into $OUT/bench-<MiB>/.
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/jsoftmax-gpu}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(bench variants tests)

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import jax, optax; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())"

for step in "${steps[@]}"; do
  case $step in
    bench)
      for mib in ${BENCH_MIBS:-32}; do
        timeout "${BENCH_S:-240}" python3 -m jsoftmax.bench --array-mib "$mib" ${BENCH_ARGS:-} \
          --out "$OUT/bench-$mib" >>"$OUT/bench.log" 2>&1
        echo "bench $mib MiB exit $?"
      done ;;
    variants) timeout "${VARIANTS_S:-150}" python3 benchmarks/variants.py >"$OUT/variants.log" 2>&1
      echo "variants exit $?" ;;
    tests)
      # float32 matmuls exact (not TF32) so the fused loss meets the tests' 1e-5.
      JAX_DEFAULT_MATMUL_PRECISION=highest timeout "${TESTS_S:-200}" \
        python3 -m pytest -n "${WORKERS:-12}" -q -p no:cacheprovider ${TEST_ARGS:-tests} \
        >"$OUT/tests.log" 2>&1
      echo "tests exit $?" ;;
    hlo) timeout 60 python3 - "$OUT/fused_hlo.txt" <<'PY'
import sys, jax, jax.numpy as jnp
from jsoftmax import linear_softmax_cross_entropy as loss
args = (jnp.ones((2048, 512)), jnp.ones((512, 32768)), jnp.zeros((2048,), jnp.int32))
compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
open(sys.argv[1], "w").write(compiled.as_text())
print(compiled.memory_analysis())
PY
      echo "hlo exit $?" ;;
  esac
done
for f in "$OUT"/bench-*/results.md "$OUT/variants.log"; do [ -f "$f" ] && cat "$f"; done
[ -f "$OUT/tests.log" ] && tail -15 "$OUT/tests.log"
