#!/usr/bin/env bash
# One CUDA check of curvopt, in well under 8 minutes on one GPU; prints one table at the end.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU and torch with CUDA installed
#   bash benchmarks/gpu_check.sh --dry-run  # here, without a GPU: the same tests on the CPU, the benchmarks --quick
#
# 1. the `cuda`-marked tests (curvopt_tests/test_cuda.py: every backend against float64 on the CPU, the
#    estimators and solvers, K-FAC in float32 and bfloat16, the ABS probe and the quantization pipeline);
# 2. the peers benchmark (benchmarks/peers.py) on the device, when it exists, with the peers that are importable;
# Each part's status and seconds go into the final table; the script's exit status is the tests' status.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
export PYTHONUNBUFFERED=1
if [ $DRY = 1 ]; then export CURVOPT_TEST_DEVICE=cpu; QUICK=--quick; else QUICK=; fi

python - <<'PY' | tee "$OUT/device.txt"
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
else:
    print(f"device: none (CPU only), torch {torch.__version__}")
PY

declare -a ROWS
run_part() {  # name, command...
    local name=$1; shift
    local t0=$(date +%s)
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    ROWS+=("| $name | $([ $rc = 0 ] && echo ok || echo "FAILED (rc $rc)") | $(( $(date +%s) - t0 )) s | $OUT/$name.log |")
    return $rc
}

run_part cuda_tests timeout 300 python -m pytest -q -p no:cacheprovider -m cuda curvopt_tests/test_cuda.py
TESTS=$?
if [ -f benchmarks/peers.py ]; then
    run_part peers timeout 240 python benchmarks/peers.py $QUICK --device "$([ $DRY = 1 ] && echo cpu || echo cuda)" \
        --out "$OUT/peers"
fi

echo
cat "$OUT/device.txt"
echo "| part | status | time | log |"
echo "|---|---|---:|---|"
printf '%s\n' "${ROWS[@]}"
tail -n 3 "$OUT/cuda_tests.log"
[ -f "$OUT/peers.log" ] && sed -n '/^|/p' "$OUT/peers.log" | head -40
exit $TESTS
