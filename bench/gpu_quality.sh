#!/usr/bin/env bash
# The 128 px quality and utility benchmarks (issues 10 and 11) side by side, within one device call
# (`QUALITY=1 bash bench/gpu_check.sh` runs this after installing the carried wheels).
# First the demo store, its feature network and its attribute probes are made once (bench/prepare.py); then the
# VQ-VAE quality run, the VAE quality run (with its autoguidance sweep) and the utility run start together, each
# under its own limit of LIMIT seconds (default 430), so one that runs long cannot starve the others, and each
# writes its results.json as it goes (a run cut short keeps what it finished). Batches of 16-64 small images leave
# a large GPU mostly idle, so three processes share it; their wall times are then not single-run figures.
#   MODE=cpu SMOKE=1 bash bench/gpu_quality.sh     tiny sizes on the CPU: the script end to end (tests/bench)
# Results: $OUT/quality-{vqvae,vae}/results.json, $OUT/utility/results.json, one .txt (stdout) and .err each.
set -u
OUT=${OUT:-/tmp/gpu-out}
MODE=${MODE:-gpu}
LIMIT=${LIMIT:-430}
WORK=${WORK:-/tmp/bench-work}
PY=${PY:-python3}
cd "$(dirname "$0")/.."
SUBJECTS=() QUALITY_SMOKE=() UTILITY_SMOKE=()
if [ "${SMOKE:-0}" = 1 ]; then
  SUBJECTS=(--subjects 6)
  QUALITY_SMOKE=(--epochs 1 --prior-steps 5 --samples 20 --autoguidance-sweep 1)
  UTILITY_SMOKE=(--epochs 1 --prior-steps 5 --seeds 1 --synthetic 8 --steps 3)
fi
mkdir -p "$OUT"
echo "== prepare the $MODE demo store, its feature network and probes"
timeout 100 "$PY" bench/prepare.py --mode "$MODE" --work "$WORK" "${SUBJECTS[@]}" 2>>"$OUT/prepare.err" \
  || { echo "prepare failed:"; tail -5 "$OUT/prepare.err"; exit 1; }
echo "== side by side, at most $LIMIT s each: quality vqvae | quality vae | utility (site, slice_pos)"
start=$SECONDS
for fam in vqvae vae; do
  timeout "$LIMIT" "$PY" bench/quality.py --mode "$MODE" --family "$fam" --work "$WORK" --out "$OUT/quality-$fam" \
    "${SUBJECTS[@]}" "${QUALITY_SMOKE[@]}" >"$OUT/quality-$fam.txt" 2>"$OUT/quality-$fam.err" &
done
timeout "$LIMIT" "$PY" bench/utility.py --mode "$MODE" --task site --task slice_pos --work "$WORK" \
  --out "$OUT/utility" "${SUBJECTS[@]}" "${UTILITY_SMOKE[@]}" >"$OUT/utility.txt" 2>"$OUT/utility.err" &
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
echo "all three done in $((SECONDS - start)) s"
for run in quality-vqvae quality-vae utility; do
  echo "== $run"
  tail -n 32 "$OUT/$run.txt"
  [ -s "$OUT/$run.err" ] && { echo "-- stderr (last 3 lines)"; tail -n 3 "$OUT/$run.err"; }
done
exit "$status"
