#!/usr/bin/env bash
# Defaults as a user gets them, one server at a time in one run: vLLM-CPU, ours plain, ours ENABLE_EDGE_ACC=True.
#   bash benchmarks/edge_defaults.sh MODEL_DIR OUT_DIR LEVELS NUM_PROMPTS [VLLM_DTYPE] [MAX_LEN]
# vLLM runs from /tmp/peers/vllm (PEERS.md); VLLM_DTYPE float32 on a CPU without native bf16.
set -euo pipefail
model=$1 out=$2 levels=$3 n=$4 vdtype=${5:-auto} maxlen=${6:-1024}
vllm="env VLLM_CPU_OMP_THREADS_BIND=0-$(($(nproc) - 1)) VLLM_CPU_NUM_OF_RESERVED_CPU=0 VLLM_CPU_KVCACHE_SPACE=4"
vllm="$vllm VLLM_CACHE_ROOT=/tmp/peers/vllm-cache /tmp/peers/vllm/bin/python -m vllm.entrypoints.openai.api_server"
vllm="$vllm --model $model --host 127.0.0.1 --port 8011 --dtype $vdtype --max-model-len $maxlen --no-enable-prefix-caching"
ours="ray stop --force >/dev/null 2>&1; exec env RAY_AUTH_MODE=disabled MODEL_PATH=$model serve run serve_config.yaml"
python -m benchmarks.bench_serving --model "$model" --one-server-at-a-time --baseline plain \
  --targets "vllm=http://127.0.0.1:8011,cmd:$vllm" "plain=http://127.0.0.1:8000,cmd:$ours" \
            "edgeacc=http://127.0.0.1:8000,cmd:export ENABLE_EDGE_ACC=True; $ours" \
  --dataset random --random-input-len 200 --random-output-len 128 --max-concurrency "$levels" \
  --num-prompts "$n" --wait-quiet 0.3 --output-dir "$out"
