#!/usr/bin/env bash
# Every speed figure at Stable Diffusion 1.5's architecture (random weights) on one GPU, in bfloat16:
# the hypernetwork's prediction and HM-CFG, fused generation of two subjects, the ID adapter, and
# LoRA training steps at 512 px. Needs CUDA; prints the figures (and writes them to LOG if given).
#   bash benchmarks/sd15_timings.sh [LOG]
set -uo pipefail
cd "$(dirname "$0")"
log=${1:-/dev/null}
common=(--arch sd15 --device cuda --dtype bfloat16)
run() {  # one benchmark; a failure is printed and the next one still runs
  python3 "$@" || echo "FAILED (exit $?): python3 $*"
}
{
  run -c "import torch; print('device:', torch.cuda.get_device_name(), '| torch', torch.__version__)"
  run hypernet_speed.py "${common[@]}" --images 4 --steps 25 --guidance 7.5
  run compose_speed.py "${common[@]}" --resolution 512 --images 4 --steps 25
  run id_adapter_speed.py "${common[@]}" --images 4 --steps 25 --guidance 7.5
  run lora_train_speed.py --device cuda --steps 50
} 2>&1 | grep --line-buffered -v -E "it/s\]|s/it\]|Warning|warn\(|^\s*$" | tee "$log"
