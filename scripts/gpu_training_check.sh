#!/usr/bin/env bash
# Issue 8's GPU check: DDT-XL training-step throughput and MFU on one GPU (ImageNet config, SD-VAE latent
# shape, pre-encoded latents, bf16 autocast, per-block torch.compile), against the eager and activation-
# checkpointing variants on the same card in the same run. Fits in 10 minutes on one H100 (each variant is
# cut at 190 s; expected about 2 minutes each, mostly compilation).
#
#   bash scripts/gpu_training_check.sh            # results in $OUT (or ./gpu-check) as JSON + summary.md
#
# Overrides for a dry run on a CPU: CONFIG=configs/stage2/training/nano/ddt-xs-pixel-xpred-t4c8.yaml BATCH=8 STEPS=2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
CONFIG=${CONFIG:-configs/stage2/training/imagenet/ddt-en28d1152hd72-dn2d2048hd128-sdvae-ema-vpred-t4c8.yaml}
BATCH=${BATCH:-128}   # per GPU, as performance.md §10 goal 1
STEPS=${STEPS:-20}
NANOGEN=${NANOGEN:-python -m nanogen}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}

(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi") > "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/gpu.txt"

run() {  # name, overrides...
  local name=$1; shift
  echo "== $name"
  timeout 190 $NANOGEN benchmark -c "$CONFIG" training.precision=bf16 "$@" --batch-size "$BATCH" --steps "$STEPS" \
    --warmup 5 --no-explain --json > "$OUT/$name.json" || echo "{\"failed\": \"$name\"}" > "$OUT/$name.json"
}
run compiled training.compile=true
run eager training.compile=false
run compiled_ac training.compile=true training.activation_checkpointing=true

python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = ["| variant | img/s per GPU | ms / step | MFU | peak memory (GB) |", "|---|---|---|---|---|"]
for name in ("compiled", "eager", "compiled_ac"):
    r = json.loads((out / f"{name}.json").read_text())
    if "failed" in r:
        rows.append(f"| {name} | failed | | | |")
        continue
    rows.append(f"| {name} | {r['img_per_s_per_device']:.1f} | {r['step_ms']:.1f} | {100 * r['mfu']:.1f} % | {r['peak_mem_gb']:.1f} |")
head = (out / "gpu.txt").read_text().strip()
r = json.loads((out / "compiled.json").read_text())
text = f"{head}\n{r.get('model')} batch {r.get('batch_size')} per GPU, {r.get('mfu_basis')}\n\n" + "\n".join(rows) + "\n"
(out / "summary.md").write_text(text)
print(text)
PY
