#!/usr/bin/env bash
# The CUDA checks in one go, for a machine with a GPU (README "GPU checks"): the GPU tests, stage=all on a
# random-initialised Llama-3-8B-shaped model in 4-bit and in bf16, and the two benches at that shape.
#   bash scripts/gpu_check.sh OUT_DIR [STEP ...]   STEP: tests all benches (default: all three, in that order)
# Wheels for packages the machine lacks go in .whl/, a tokenizer folder for the random model in .whl/tok.
set -uo pipefail
out=${1:-gpu_check_out}
shift || true
steps=${*:-tests all benches}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
tok=(); [ -d .whl/tok ] && tok=(--tokenizer .whl/tok)
step() { local name=$1 limit=$2; shift 2; echo "== $name"; local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1; local rc=$?
  echo "== $name rc=$rc $((SECONDS - t0)) s"; tail -n 25 "$out/$name.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers, peft, bitsandbytes; print(torch.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)"
case " $steps " in *" tests "*)
  step pytest_gpu 90 python3 -m pytest -m gpu -q -p no:cacheprovider;; esac
case " $steps " in *" all "*)
  [ -f /tmp/llama3_8b_random/config.json ] ||
    step make_random_8b 90 python3 scripts/make_random_model.py --model llama3_8b "${tok[@]}" --out /tmp/llama3_8b_random
  run_all=(python3 -m pipeline stage=all model=llama3_8b model.path=/tmp/llama3_8b_random paths.output_dir=/tmp/gpu_out
           cv.n_folds=2 finetune.max_steps=10 model.max_length=512 finetune.per_device_batch_size=8)
  step all_4bit 120 "${run_all[@]}" exp_name=random8b_4bit
  step all_bf16 90 "${run_all[@]}" exp_name=random8b_bf16 model.quantization=none model.gradient_checkpointing=false
  for e in random8b_4bit random8b_bf16; do cp /tmp/gpu_out/$e/metrics.json "$out/$e.metrics.json" 2>/dev/null; done;; esac
case " $steps " in *" benches "*)
  step bench_finetune 130 python3 scripts/bench_finetune.py --model llama3_8b --preset-random "${tok[@]}" --rows 128 --max-length 1024
  # 32 rows: the seed recipe (three fp32 passes of the 8B model per batch) outran 180 s at 128
  step bench_embed 240 python3 scripts/bench_embed.py --model llama3_8b --preset-random "${tok[@]}" --rows 32 --max-length 1024;; esac
