#!/usr/bin/env bash
# Single-box prefill/decode disaggregation on GPUs: a prefill vLLM and a decode vLLM with
# LLMDConnector, KV events on, and vllm-llmd-router in front. The GPU twin of
# examples/single_box_cpu/demo.py. Settings come from the environment; see --help.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: examples/single_box_gpu/run.sh [--smoke | --bench] [--help]

Starts, on this box:
  prefill vLLM  (kv_producer, side channel on 127.0.0.1:SIDE_CHANNEL_PORT, KV events)
  decode vLLM   (kv_consumer, recompute on a failed pull, host offload tier, KV events)
  vllm-llmd-router on ROUTER_PORT (kv_aware policy, prefill -> decode for long prompts)
sends one chat request through the router, then serves until Ctrl-C.
  --smoke   exit after that request
  --bench   run examples/workload/shared_prefix_chat.py against the router, then exit

Environment (defaults in brackets):
  MODEL                   Hugging Face id or local folder [Qwen/Qwen2.5-1.5B-Instruct]
  PREFILL_GPU, DECODE_GPU CUDA device of each instance [0, 1]; equal values share one GPU
  GPU_MEMORY_UTILIZATION  per instance [0.85 on separate GPUs, 0.4 on a shared one]
  MAX_MODEL_LEN           [8192]
  BLOCK_SIZE              vLLM and router block size [16]
  HOST_OFFLOAD_BYTES      decode host tier, bytes [8589934592 = 8 GiB; 0 = off]
  PREFILL_PORT, DECODE_PORT, ROUTER_PORT           HTTP ports [8100, 8200, 8000]
  SIDE_CHANNEL_PORT       prefill side channel base port, TP rank r uses +r [5700]
  PREFILL_EVENTS_PORT, DECODE_EVENTS_PORT          KV-event PUB ports [5557, 5567]
                          (replay on the port + 1)
  PD_THRESHOLD_TOKENS     uncached prompt tokens above which the router does P/D [256]
  VLLM                    the vLLM command [vllm]
  PYTHON                  Python with vllm-llmd installed [python3]
  LOG_DIR                 logs and the router's tokenizer copy [logs/single_box_gpu]
  HF_TOKEN                for gated models
EOF
}

MODE=serve
case "${1:-}" in
  -h | --help) usage; exit 0 ;;
  --smoke) MODE=smoke ;;
  --bench) MODE=bench ;;
  "") ;;
  *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
esac

MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
PREFILL_GPU=${PREFILL_GPU:-0}
DECODE_GPU=${DECODE_GPU:-1}
if [[ "$PREFILL_GPU" == "$DECODE_GPU" ]]; then
  GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.4}
else
  GPU_MEMORY_UTILIZATION=${GPU_MEMORY_UTILIZATION:-0.85}
fi
MAX_MODEL_LEN=${MAX_MODEL_LEN:-8192}
BLOCK_SIZE=${BLOCK_SIZE:-16}
HOST_OFFLOAD_BYTES=${HOST_OFFLOAD_BYTES:-8589934592}
PREFILL_PORT=${PREFILL_PORT:-8100}
DECODE_PORT=${DECODE_PORT:-8200}
ROUTER_PORT=${ROUTER_PORT:-8000}
SIDE_CHANNEL_PORT=${SIDE_CHANNEL_PORT:-5700}
PREFILL_EVENTS_PORT=${PREFILL_EVENTS_PORT:-5557}
DECODE_EVENTS_PORT=${DECODE_EVENTS_PORT:-5567}
PD_THRESHOLD_TOKENS=${PD_THRESHOLD_TOKENS:-256}
VLLM=${VLLM:-vllm}
PYTHON=${PYTHON:-python3}
LOG_DIR=${LOG_DIR:-logs/single_box_gpu}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

mkdir -p "$LOG_DIR"
PIDS=()

# shellcheck disable=SC2329  # invoked by the EXIT trap
cleanup() {
  trap - EXIT INT TERM
  if ((${#PIDS[@]})); then
    echo "stopping ${PIDS[*]} ..."
    kill "${PIDS[@]}" 2>/dev/null || true
    wait "${PIDS[@]}" 2>/dev/null || true
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# events_config PORT: vLLM's KV-event publisher (zmq PUB on PORT, replay on PORT+1, topic kv)
events_config() {
  printf '{"enable_kv_cache_events":true,"publisher":"zmq","topic":"kv",'
  printf '"endpoint":"tcp://*:%d","replay_endpoint":"tcp://*:%d"}' "$1" "$(($1 + 1))"
}

# wait_healthy NAME URL PID: until GET URL/health answers 200, or the process exits
wait_healthy() {
  local name=$1 url=$2 pid=$3
  for _ in $(seq 1 900); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$name exited; last lines of $LOG_DIR/$name.log:" >&2
      tail -n 40 "$LOG_DIR/$name.log" >&2
      exit 1
    fi
    if curl -sf -o /dev/null "$url/health"; then
      echo "$name ready: $url"
      return 0
    fi
    sleep 1
  done
  echo "$name not ready after 900 s; see $LOG_DIR/$name.log" >&2
  exit 1
}

PREFILL_KV=$(printf '{"kv_connector":"LLMDConnector","kv_role":"kv_producer",%s}' \
  "$(printf '"kv_connector_extra_config":{"side_channel_host":"127.0.0.1","side_channel_port":%d}' \
    "$SIDE_CHANNEL_PORT")")
DECODE_KV=$(printf '{"kv_connector":"LLMDConnector","kv_role":"kv_consumer",%s,%s}' \
  '"kv_load_failure_policy":"recompute"' \
  "$(printf '"kv_connector_extra_config":{"host_offload_bytes":%d}' "$HOST_OFFLOAD_BYTES")")

# start_vllm NAME GPU PORT EVENTS_PORT KV_CONFIG
start_vllm() {
  local name=$1 gpu=$2 port=$3 events_port=$4 kv=$5
  echo "starting $name vLLM on GPU $gpu, port $port (log $LOG_DIR/$name.log)"
  CUDA_VISIBLE_DEVICES=$gpu "$VLLM" serve "$MODEL" \
    --host 127.0.0.1 --port "$port" \
    --gpu-memory-utilization "$GPU_MEMORY_UTILIZATION" \
    --max-model-len "$MAX_MODEL_LEN" \
    --block-size "$BLOCK_SIZE" \
    --kv-transfer-config "$kv" \
    --kv-events-config "$(events_config "$events_port")" \
    >"$LOG_DIR/$name.log" 2>&1 &
  PIDS+=($!)
}

start_vllm prefill "$PREFILL_GPU" "$PREFILL_PORT" "$PREFILL_EVENTS_PORT" "$PREFILL_KV"
PREFILL_PID=${PIDS[-1]}
if [[ "$PREFILL_GPU" == "$DECODE_GPU" ]]; then
  # One GPU: let the first instance finish profiling memory before the second measures it.
  wait_healthy prefill "http://127.0.0.1:$PREFILL_PORT" "$PREFILL_PID"
fi
start_vllm decode "$DECODE_GPU" "$DECODE_PORT" "$DECODE_EVENTS_PORT" "$DECODE_KV"
DECODE_PID=${PIDS[-1]}

# The router tokenizes with the model's own tokenizer and chat template, from a local folder:
# the model folder itself, or its tokenizer files (no weights) fetched from the hub.
if [[ -d "$MODEL" ]]; then
  TOKENIZER=$MODEL
else
  TOKENIZER=$LOG_DIR/tokenizer
  "$PYTHON" - "$MODEL" "$TOKENIZER" <<'EOF' || TOKENIZER=""
import sys
from huggingface_hub import snapshot_download

snapshot_download(
    sys.argv[1],
    local_dir=sys.argv[2],
    allow_patterns=["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt"],
)
EOF
fi
ROUTER_ARGS=()
if [[ -n "$TOKENIZER" ]]; then
  ROUTER_ARGS+=(--tokenizer "$TOKENIZER")
else
  echo "WARNING: could not fetch the tokenizer of $MODEL: the router routes by load alone" >&2
fi

wait_healthy prefill "http://127.0.0.1:$PREFILL_PORT" "$PREFILL_PID"
wait_healthy decode "http://127.0.0.1:$DECODE_PORT" "$DECODE_PID"

echo "starting vllm-llmd-router on port $ROUTER_PORT (log $LOG_DIR/router.log)"
vllm-llmd-router --host 127.0.0.1 --port "$ROUTER_PORT" \
  --policy kv_aware \
  --block-size "$BLOCK_SIZE" \
  --events-topic kv \
  --pd-threshold-tokens "$PD_THRESHOLD_TOKENS" \
  --audit-log "$LOG_DIR/router-audit.jsonl" \
  --pod "http://127.0.0.1:$PREFILL_PORT,role=prefill,events=tcp://127.0.0.1:$PREFILL_EVENTS_PORT,replay=tcp://127.0.0.1:$((PREFILL_EVENTS_PORT + 1))" \
  --pod "http://127.0.0.1:$DECODE_PORT,role=decode,events=tcp://127.0.0.1:$DECODE_EVENTS_PORT,replay=tcp://127.0.0.1:$((DECODE_EVENTS_PORT + 1))" \
  ${ROUTER_ARGS[@]+"${ROUTER_ARGS[@]}"} \
  >"$LOG_DIR/router.log" 2>&1 &
PIDS+=($!)
wait_healthy router "http://127.0.0.1:$ROUTER_PORT" "${PIDS[-1]}"

ROUTER=http://127.0.0.1:$ROUTER_PORT
# A long shared system prompt, so the first request goes prefill -> decode.
SYSTEM=$(printf 'Rule %d: answer briefly, cite the handbook, and never guess. ' $(seq 1 60))
BODY=$(printf '{"model":"%s","max_tokens":32,"temperature":0,"messages":[%s,%s]}' "$MODEL" \
  "$(printf '{"role":"system","content":"%s"}' "$SYSTEM")" \
  '{"role":"user","content":"What is rule 7?"}')
echo
echo "POST $ROUTER/v1/chat/completions"
curl -sS -D "$LOG_DIR/headers.txt" "$ROUTER/v1/chat/completions" \
  -H 'Content-Type: application/json' -d "$BODY"
echo
grep -i '^x-routed-to' "$LOG_DIR/headers.txt" || true
tail -n 1 "$LOG_DIR/router-audit.jsonl" 2>/dev/null || true
echo
echo "decode pod, prompt tokens by source (external_kv_transfer: pulled from the prefill pod):"
curl -sf "http://127.0.0.1:$DECODE_PORT/metrics" | grep '^vllm:prompt_tokens_by_source_total' || true

case "$MODE" in
  smoke) exit 0 ;;
  bench)
    "$PYTHON" "$HERE/../workload/shared_prefix_chat.py" --url "$ROUTER" --model "$MODEL" \
      --conversations 32 --system-prompts 4 --turns 3 --concurrency 8
    exit 0
    ;;
esac

cat <<EOF

Serving. Try:
  curl $ROUTER/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model":"$MODEL","messages":[{"role":"user","content":"Hello"}]}'
  $PYTHON $HERE/../workload/shared_prefix_chat.py --url $ROUTER
  $PYTHON -m vllm_llmd.events watch tcp://127.0.0.1:$DECODE_EVENTS_PORT --topic kv
  curl -s $ROUTER/metrics | grep llmd:router_
Ctrl-C stops all three.
EOF
wait -n
echo "a process exited; see $LOG_DIR/*.log" >&2
exit 1
