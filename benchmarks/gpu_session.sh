#!/usr/bin/env bash
# One prepared run on a lent GPU (the device tool: 15 minutes of device time per session, the machine's start
# included), for the GPU measurements the open issues ask for. Each step has its own time limit and its own log
# under $OUT, so one that fails or runs long costs only its own minutes.
#
#   here:    bash benchmarks/gpu_wheels.sh
#   device:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=580)
#            GPU_STEPS="disc compile" runs some steps only: a rerun must come at once, while the machine is warm
#            (30 s); a new machine needs at least 4 of the session's 15 minutes left
#
# Steps (the sum of the limits is 530 s, plus the wheels' install and two imports; expect about half):
#   pathldm  pathldm-256 (400.9 M UNet, 64x64x3 latents, 154x512 context), bf16, batch 48: training images/s and
#            DDIM 50 + guidance images/s, with model FLOP utilisation (speed issue, item 6)
#   nasdm    the paper NASDM UNet at 128 px, bf16, batch 40: training and 50 guided steps (item 6)
#   disc     disc-256, bf16, batch 16: training (SD, CoTrain) and SD / SD-SC / SD-SC every step at 1 and 4 labels
#            (DISC issue: SC ≤ labels × SD + 10 %)
#   compile  pathldm-256 sampling under torch.compile, batch 16, DDIM 20 (item 2; the compilation, 75-95 s on a
#            2-core CPU and not yet tried on a GPU, is in the untimed warm-up: compare with the eager rate of the
#            pathldm step per step)
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "the wheels in .whl/ did not install"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c 'import diffusers, histosynth' || { echo "diffusers or histosynth does not import: run benchmarks/gpu_wheels.sh here and carry .whl"; exit 1; }
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
  python3 -c 'import torch, diffusers; print("torch", torch.__version__, "diffusers", diffusers.__version__)'; } \
  2>&1 | tee "$OUT/machine.txt"

step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  case " ${GPU_STEPS:-pathldm nasdm disc compile} " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name: limit ${limit}s, from $(date -u +%T)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} at $(date -u +%T)"
}
step pathldm 150 python3 benchmarks/latent_diffusion.py --model paper --phases train,sample
step nasdm   100 python3 benchmarks/nasdm.py --model paper --size 128
step disc    150 python3 benchmarks/disc.py --model paper --labels 1,4
step compile 130 python3 benchmarks/latent_diffusion.py --model paper --phases sample --compile --batch 16 \
  --sample-steps 20
