#!/usr/bin/env bash
# Every GPU figure that issues 11 and 14 still lack, in one call of the device tool.
#
# Once, here:  benchmarks/gpu/fetch_wheels.sh      (open_clip and distributed as wheels, into .whl/)
# Then:        run(command="bash benchmarks/gpu/run_all.sh 450", carry=[".whl"], timeout_s=500)
#
# The argument is the whole run's budget in seconds (default 450): the steps run most valuable
# first, each under its own limit cut to what is left, so a slow step costs only itself.  Figures:
# $OUT/<step>.json (bench_*.py's --json) and $OUT/log.txt; docs/benchmarks.md says where they go.
# DEVICE=cpu SMOKE=1 runs the same steps tiny, to check the script and its imports without a GPU.
set -u
cd "$(dirname "$0")/../.."
budget=${1:-450}
deadline=$((SECONDS + budget))
device=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d)}
log="$OUT/log.txt"

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing .whl failed" | tee -a "$log"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # the engine, uninstalled

step() {  # step NAME LIMIT COMMAND...: run COMMAND under min(LIMIT, time left)
  local name=$1 limit=$2 left=$((deadline - SECONDS - 5))
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 20)); then
    echo "== $name: skipped, ${left}s left" | tee -a "$log"
    return
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" 2>&1 | grep -v "^W[0-9]" | tee -a "$log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start))s" | tee -a "$log"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1; nproc
  python3 -c "import sys, torch, open_clip, distributed; print(sys.version.split()[0], 'torch', torch.__version__,
'open_clip', open_clip.__version__, 'distributed', distributed.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee -a "$log"

if [ -n "${SMOKE:-}" ]; then
  batches=(2) compile_batch=2 images=4 repeats=1 dask_images=12 backbones=(ViT-B-32)
else
  batches=(32 128 256) compile_batch=128 images=512 repeats=2 dask_images=1000 backbones=(ViT-B-32 ViT-B-16 ViT-L-14 ViT-L-14-336)
fi

# Issue 11, item 6: model-only windows/s at batch 32, 128 and 256, the engine against item 5's
# candidates, patch labels against fp32's, fp16 against fp32 on whole photos, and a kernel profile.
step windows 150 python3 benchmarks/bench_batch.py windows --device "$device" --batch-sizes "${batches[@]}" \
  --variants engine half half+channels-last half+cuda-graph --profile --json "$OUT/windows.json"
# Issue 11: end-to-end (JPEG files to a dataset) against the model alone; the goal is at least 80 %.
step end-to-end 120 python3 benchmarks/bench_batch.py end-to-end --device "$device" --images "$images" \
  --repeats "$repeats" --json "$OUT/end-to-end.json"
# Issue 11, item 5: torch.compile, one static batch size (each compilation takes a minute or so).
step compile 180 python3 benchmarks/bench_batch.py windows --device "$device" --batch-sizes "$compile_batch" \
  --variants engine engine+compile half+compile --json "$OUT/compile.json"
# Issue 14: seconds per image and peak memory of each preset's architecture.
step backbones 120 python3 benchmarks/bench_backbones.py --device "$device" --models "${backbones[@]}" \
  --json "$OUT/backbones.json"
# Issue 11: a local Dask cluster of 1, 2 and 4 workers sharing the GPU, against one process.
step dask 120 python3 benchmarks/bench_batch.py dask --device "$device" --workers 1 2 4 --images "$dask_images" \
  --malloc-trim unset --json "$OUT/dask.json"
# The CUDA path's checks (fp16 against the CPU, batching, a real out-of-memory fallback) on this card.
[ "$device" = cuda ] && step cuda 90 python3 benchmarks/bench_cuda.py --json "$OUT/cuda.json"
echo "== done after ${SECONDS}s; figures in $OUT" | tee -a "$log"
