#!/usr/bin/env bash
# Validation-loss parity of every fp8 recipe against bf16 on one GPU: the runs share the GPU and
# run concurrently (a 125M model leaves most of an H100 idle), then a table of final val losses.
#   bash scripts/parity.sh [OUT_DIR] [extra Hydra overrides...]
# Default shape: llama_125m, 2000 steps of 16 x 256 tokens (8.2M tokens), every linear but
# lm_head in fp8 (fp8.auto_filter=false: parity is about numerics, and the auto filter would keep
# this model's 768-wide layers in bf16). Plot: python scripts/plot_runs.py OUT_DIR --out parity.png
set -euo pipefail
out=${1:-parity}
shift || true
mkdir -p "$out"
pids=()
for fp8 in bf16 tensorwise delayed rowwise rowwise_with_gw_hp; do
  python scripts/train.py +recipe=llama_125m_parity fp8=$fp8 fp8.auto_filter=false \
    data.seq_len=256 data.batch_size=16 data.val_batches=16 data.num_workers=1 \
    trainer.max_steps=2000 trainer.val_check_interval=250 '~callbacks.model_checkpoint' \
    hydra.run.dir="$out/$fp8" "$@" > "$out/$fp8.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
python - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/summary.json"))}
base = rows.get("bf16", {}).get("val_loss")
print(f"{'fp8':>20} {'val loss':>9} {'vs bf16':>8}")
for name, r in rows.items():
    v = r.get("val_loss")
    rel = f"{100 * (v - base) / base:+.2f}%" if v is not None and base else "n/a"
    print(f"{name:>20} {v if v is not None else float('nan'):9.4f} {rel:>8}")
PY
exit $status
