#!/usr/bin/env python
"""Export a checkpoint of ``scripts/train.py`` to an inference model with quantized linear weights.

    python scripts/export.py outputs/<run>/checkpoints/last.ckpt --weight-format int8 --out model.int8.pt
    python scripts/export.py CKPT --weight-format ternary --out model.t.pt --skip lm_head "layers.0.*"
    python scripts/export.py CKPT --weight-format fp8 --out model.fp8.pt --skip      # every linear, lm_head too

Weight formats (``fp8train.export``): ``fp8`` (e4m3 weights + per-row scale, activations in their
own dtype), ``int8`` (W8A16, per-row absmax/127 scale), ``ternary`` ({-1, 0, 1} packed four to a
byte, per-row absmean scale). The trained weights are read in fp32 whatever fp8 recipe trained
them. On the first validation batch of the run's data the script prints each exported layer's
output SQNR against the float model (fed the float model's input: that layer's own error; and
inside the exported model: errors accumulated), the SQNR of the logits, and the size reduction.

Reload the written file with ``fp8train.train.inference.load_exported(path)``. Exit status 2: a
bad argument or a file that is not a checkpoint of the Hydra app.
"""

from __future__ import annotations

import argparse
import sys

from fp8train.export import WEIGHT_FORMATS, export_report
from fp8train.train.inference import (
    export_model,
    layer_sqnr,
    load_float_model,
    sample_tokens,
    save_exported,
    state_dict_bytes,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="a Lightning checkpoint written by scripts/train.py (e.g. <run>/checkpoints/last.ckpt)")
    p.add_argument("--weight-format", required=True, choices=list(WEIGHT_FORMATS), help="how linear weights are stored")
    p.add_argument("--out", required=True, help="path of the exported model file")
    p.add_argument("--skip", nargs="*", default=["lm_head"], metavar="PATTERN",
                   help="glob patterns of linears kept in high precision (default: lm_head; none: --skip)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences in the SQNR sample batch (default 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's seq_len)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.batch_size < 1 or (args.seq_len is not None and args.seq_len < 1):
        print("export.py: --batch-size and --seq-len must be >= 1", file=sys.stderr)
        return 2
    try:
        model = load_float_model(args.checkpoint)
        tokens = sample_tokens(args.checkpoint, args.batch_size, args.seq_len)
    except (FileNotFoundError, ValueError) as e:
        print(f"export.py: {e}", file=sys.stderr)
        return 2
    exported = export_model(model, args.weight_format, skip=args.skip)
    report = export_report(exported)
    rows, logits_sqnr = layer_sqnr(model, exported, tokens)
    before, after = state_dict_bytes(model), state_dict_bytes(exported)

    width = max([len("layer")] + [len(r.name) for r in rows])
    lines = [f"{args.weight_format}: output SQNR vs the float model on {tuple(tokens.shape)} tokens (dB)",
             f"{'layer':<{width}}  {'isolated':>8}  {'in model':>8}", "-" * (width + 20)]
    lines += [f"{r.name:<{width}}  {r.isolated:>8.2f}  {r.in_model:>8.2f}" for r in rows]
    lines += [f"{'logits':<{width}}  {'':>8}  {logits_sqnr:>8.2f}",
              f"kept in high precision: {sorted(report.skipped) or 'none'}",
              f"exported linears: {report.bytes_before:,} -> {report.bytes_after:,} bytes ({report.compression:.2f}x)",
              f"whole model state_dict: {before:,} -> {after:,} bytes ({before / after:.2f}x)"]
    save_exported(args.out, exported, model.config, extra={
        "source_checkpoint": str(args.checkpoint),
        "sqnr_db": {"layers": {r.name: {"isolated": r.isolated, "in_model": r.in_model} for r in rows},
                    "logits": logits_sqnr},
        "bytes": {"linears_before": report.bytes_before, "linears_after": report.bytes_after,
                  "model_before": before, "model_after": after},
    })
    lines.append(f"wrote {args.out} (reload: fp8train.train.inference.load_exported)")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
