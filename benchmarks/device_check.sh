#!/usr/bin/env bash
# The checks that need a GPU, as one prepared command for the lent GPU machine (DEVELOPERS.md, "The GPU machine"):
# the `gpu`-marked tests (the paper configs as shipped: accelerator auto, bf16-mixed, buffers on the GPU; the state
# quickstart's phase 2 on the GPU; evaluation there; GPU checkpoints loaded on the CPU), then the training-step and
# rendering benchmarks on the GPU. Prepare here, then run there with `carry: [".device"]`:
#   bash ../shared/device/prepare.sh pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 rich markdown-it-py mdurl pygments
#   source .device/preamble.sh && bash benchmarks/device_check.sh        # writes $OUT/device_check.log
# Every step has its own timeout, so that one hang (e.g. EGL) costs its minutes only and the rest still reports.
set -u
log=${OUT:-/tmp}/device_check.log
exec > >(tee -a "$log") 2>&1
py=$(command -v python3)
section() { echo; echo "== $* ($(date +%T))"; }

section versions
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import sys, torch, torchrl, tensordict, lightning, mujoco; print('python', sys.version.split()[0], '| torch',
torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), '| torchrl', torchrl.__version__,
'| tensordict', tensordict.__version__, '| lightning', lightning.__version__, '| mujoco', mujoco.__version__)"

section "headless rendering (EGL)"
probe='import mujoco; m = mujoco.MjModel.from_xml_string("<mujoco><worldbody><light pos=\"0 0 1\"/><geom size=\".1\"/></worldbody></mujoco>"); r = mujoco.Renderer(m, 32, 32); d = mujoco.MjData(m); mujoco.mj_forward(m, d); r.update_scene(d); print("render ok, mean pixel", r.render().mean())'
if ! timeout 60 $py -c "$probe"; then
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
  echo "retrying with $__EGL_VENDOR_LIBRARY_FILENAMES"; timeout 60 $py -c "$probe"
fi

# the project's console script, as `pip install -e .` puts it beside the interpreter (the image's `lightning` is
# Lightning's own)
printf '#!/bin/sh\nexec %s -m lightning_modules.cli "$@"\n' "$py" > "$(dirname "$py")/lightning"
chmod +x "$(dirname "$py")/lightning"

section "gpu-marked tests"
timeout 300 $py -m pytest -q -m gpu -p no:cacheprovider tests/pipeline/test_gpu.py

section "phase 1 training step on the GPU: state presets (drawers3: B 16 x L 200) and the paper's 64 px filter"
timeout 60 $py benchmarks/bench_filter.py --device cuda --obs state --batch-size 16 --length 200 --deter-dim 64 \
  --stoch-dim 16 --hidden-dim 64 --steps 20 --warmup 3
timeout 90 $py benchmarks/bench_filter.py --device cuda --obs pixels --image-size 64 --batch-size 32 --length 120 \
  --deter-dim 256 --stoch-dim 64 --hidden-dim 256 --cnn-depth 32 --bf16 --steps 10 --warmup 3

section "phase 2 update on the GPU: the state presets' CQL (batch 256) and the paper's (batch 1024)"
timeout 60 $py benchmarks/bench_cql.py --device cuda --batch-size 256 --deter-dim 64 --stoch-dim 16 --hidden-dim 128 \
  --num-random 4 --eval-trials 0
timeout 75 $py benchmarks/bench_cql.py --device cuda --batch-size 1024 --eval-trials 0

section "tiled rendering at 64 px on the GPU machine (4 processes x 16 envs)"
timeout 60 $py benchmarks/bench_render.py --image-size 64 --processes 4 --envs-per-process 16 --seconds 5 --modes tiled
section done
