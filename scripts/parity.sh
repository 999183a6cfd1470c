#!/usr/bin/env bash
# Validation-loss parity on one GPU: the runs share the GPU and run concurrently (a 125M model
# leaves most of an H100 idle), then a table of final val losses against the first run.
#   bash scripts/parity.sh [OUT_DIR] [extra Hydra overrides...]            # fp8 recipes vs bf16
#   PARITY_SET=optim bash scripts/parity.sh [OUT_DIR] [overrides...]       # AdamWFp8 vs bf16 AdamW
#   PARITY_ONLY="bf16_adamw tensorwise_adamw_fp8" ...                       # a subset of the set's runs
# Default shape: llama_125m, 2000 steps of 16 x 256 tokens (8.2M tokens), every linear but
# lm_head in fp8 (fp8.auto_filter=false: parity is about numerics, and the auto filter would keep
# this model's 768-wide layers in bf16). Plot: python scripts/plot_runs.py OUT_DIR --out parity.png
set -euo pipefail
out=${1:-parity}
shift || true
mkdir -p "$out"
case "${PARITY_SET:-fp8}" in
  fp8)   runs=("bf16:fp8=bf16" "tensorwise:fp8=tensorwise" "delayed:fp8=delayed" "rowwise:fp8=rowwise"
               "rowwise_with_gw_hp:fp8=rowwise_with_gw_hp") ;;
  optim) runs=("bf16_adamw:fp8=bf16 optim=adamw" "bf16_adamw_fp8:fp8=bf16 optim=adamw_fp8"
               "tensorwise_adamw_fp8:fp8=tensorwise optim=adamw_fp8"
               "tensorwise_adamw_fp8_v8:fp8=tensorwise optim=adamw_fp8 optim.second_moment=fp8") ;;
  *) echo "PARITY_SET=${PARITY_SET}: valid choices are fp8, optim" >&2; exit 2 ;;
esac
pids=()
names=()
for run in "${runs[@]}"; do
  name=${run%%:*}
  if [[ -n "${PARITY_ONLY:-}" && " ${PARITY_ONLY} " != *" ${name} "* ]]; then continue; fi
  read -r -a sel <<< "${run#*:}"
  names+=("$name")
  python scripts/train.py +recipe=llama_125m_parity "${sel[@]}" fp8.auto_filter=false \
    data.seq_len=256 data.batch_size=16 data.val_batches=16 data.num_workers=1 \
    trainer.max_steps=2000 trainer.val_check_interval=250 '~callbacks.model_checkpoint' \
    hydra.run.dir="$out/$name" "$@" > "$out/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
# a flat copy of each run's curves beside its log, for collecting results from a remote machine
# without the run directories (plot_runs.py takes metrics.csv files too)
for name in "${names[@]}"; do
  if [[ -f "$out/$name/csv/metrics.csv" ]]; then cp "$out/$name/csv/metrics.csv" "$out/$name.metrics.csv"; fi
done
python - "$out" "${names[@]}" <<'PY'
import json, pathlib, sys
out, names = pathlib.Path(sys.argv[1]), sys.argv[2:]
rows = {n: json.loads((out / n / "summary.json").read_text()) for n in names if (out / n / "summary.json").exists()}
base = rows.get(names[0], {}).get("val_loss")
print(f"{'run':>24} {'val loss':>9} {'vs ' + names[0]:>14}")
for name, r in rows.items():
    v = r.get("val_loss")
    rel = f"{100 * (v - base) / base:+.2f}%" if v is not None and base else "n/a"
    print(f"{name:>24} {v if v is not None else float('nan'):9.4f} {rel:>14}")
PY
exit $status
