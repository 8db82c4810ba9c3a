#!/usr/bin/env bash
# Serving benchmark on one GPU: the Llama-3.1-8B shape (random weights, bf16) saved as a model folder,
# served by `hf-paged serve` and by `transformers serve --continuous-batching`, each driven by
# benchmarks/bench_serve.py over the same Poisson rate sweep; plus offline ContinuousGenerator on the
# same requests (the ">= 90% of offline" check). Run from the repository root:
#
#   bash benchmarks/serve_gpu.sh hf-paged        # save the model if needed, sweep hf-paged serve
#   bash benchmarks/serve_gpu.sh offline         # ContinuousGenerator on the sweep's prompts
#   bash benchmarks/serve_gpu.sh transformers    # sweep transformers serve on the same model
#   bash benchmarks/serve_gpu.sh plot            # latency-vs-rate PNG of every sweep found
#
# Phases can be combined (`bash benchmarks/serve_gpu.sh hf-paged offline`). Results go to $RESULTS_DIR
# (default /tmp/serve_bench; copied to $OUT when that is set): JSON per sweep, server logs, the PNG.
# Knobs (env): MODEL_DIR, RATES, NUM_PROMPTS, TF_NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN, MAX_DURATION, GOODPUT,
# DTYPE, DEVICE, WHEEL_DIR (a CPU dry run: MODEL_DIR=<a saved `--shape default`> DTYPE=float32 DEVICE=cpu).
# Missing Python packages (fastapi, uvicorn, pydantic, openai, ...) are installed from .whl/ when present.
set -euo pipefail

RESULTS_DIR=${RESULTS_DIR:-/tmp/serve_bench}
MODEL_DIR=${MODEL_DIR:-/tmp/llama8b-random}
RATES=${RATES:-4,8,16,32,inf}
NUM_PROMPTS=${NUM_PROMPTS:-256}         # hf-paged's sweep (saturates the 8B at 'inf')
TF_NUM_PROMPTS=${TF_NUM_PROMPTS:-64}    # transformers serve is ~10x slower: fewer prompts keep it in time
INPUT_LEN=${INPUT_LEN:-64:1024}
OUTPUT_LEN=${OUTPUT_LEN:-256}
MAX_DURATION=${MAX_DURATION:-60}        # seconds of arrivals per rate at most
GOODPUT=${GOODPUT:-ttft:2000,tpot:100}  # SLOs in ms
DTYPE=${DTYPE:-bfloat16}
DEVICE=${DEVICE:-cuda}
WHEEL_DIR=${WHEEL_DIR:-.whl}
HF_PORT=${HF_PORT:-8000}
TF_PORT=${TF_PORT:-8001}
mkdir -p "$RESULTS_DIR"

if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEEL_DIR"/*.whl
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
BENCH="python3 benchmarks/bench_serve.py"

save_model() {
  if [ ! -f "$MODEL_DIR/config.json" ]; then
    $BENCH save-model --shape llama-8b --dtype "$DTYPE" --out "$MODEL_DIR"
  fi
}

wait_http() {  # wait_http URL PID SECONDS: until URL answers 200, the server dies, or time runs out
  local url=$1 pid=$2 limit=$3 t=0
  until curl -sf -o /dev/null "$url"; do
    kill -0 "$pid" 2>/dev/null || { echo "server exited before it was ready"; return 1; }
    sleep 2; t=$((t + 2))
    [ "$t" -lt "$limit" ] || { echo "server not ready after $limit s"; return 1; }
  done
}

stop_server() {  # SIGTERM, then wait (hf-paged serve drains and exits 0)
  kill -TERM "$1" 2>/dev/null || true
  wait "$1" || echo "server exit status $?"
}

sweep() {  # sweep LABEL PORT MODEL_NAME NUM_PROMPTS EXTRA...
  local label=$1 port=$2 name=$3 num=$4; shift 4
  $BENCH run --base-url "http://127.0.0.1:$port" --model "$name" --tokenizer "$MODEL_DIR" \
    --num-prompts "$num" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --rates "$RATES" \
    --max-duration "$MAX_DURATION" --warmup 16 --goodput "$GOODPUT" --label "$label" \
    --out "$RESULTS_DIR/$label.json" "$@"
}

phase_hf_paged() {
  save_model
  python3 -m hf_paged serve "$MODEL_DIR" --host 127.0.0.1 --port $HF_PORT --served-model-name llama-8b \
    --device "$DEVICE" --dtype "$DTYPE" --log-level warning >"$RESULTS_DIR/hf_paged_server.log" 2>&1 &
  local pid=$!
  wait_http "http://127.0.0.1:$HF_PORT/health" $pid 600
  sweep hf-paged $HF_PORT llama-8b "$NUM_PROMPTS" --ignore-eos
  # The same prompts and rates as the transformers sweep, for a side-by-side at equal load.
  sweep "hf-paged-$TF_NUM_PROMPTS" $HF_PORT llama-8b "$TF_NUM_PROMPTS" --ignore-eos
  curl -s "http://127.0.0.1:$HF_PORT/metrics" | grep -v '^#' | grep -v _bucket >"$RESULTS_DIR/hf_paged_metrics.txt"
  stop_server $pid
}

phase_offline() {
  save_model
  # The sweep's own prompts when its JSON is here, else the same ones regenerated (same seed and lengths).
  $BENCH offline --model "$MODEL_DIR" --requests "$RESULTS_DIR/hf-paged.json" --num-prompts "$NUM_PROMPTS" \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --dtype "$DTYPE" --out "$RESULTS_DIR/offline.json"
}

phase_transformers() {
  save_model
  # The saved generation_config has no EOS, so every request generates exactly OUTPUT_LEN tokens
  # (transformers serve refuses the ignore_eos field).
  python3 -m transformers.cli.transformers serve "$MODEL_DIR" --continuous-batching --host 127.0.0.1 \
    --port $TF_PORT --device "$DEVICE" --dtype "$DTYPE" --log-level warning >"$RESULTS_DIR/transformers_server.log" 2>&1 &
  local pid=$!
  wait_http "http://127.0.0.1:$TF_PORT/health" $pid 900
  sweep transformers $TF_PORT "$MODEL_DIR" "$TF_NUM_PROMPTS"
  stop_server $pid
}

phase_plot() {
  local runs=()
  for f in hf-paged "hf-paged-$TF_NUM_PROMPTS" transformers; do
    [ -f "$RESULTS_DIR/$f.json" ] && runs+=("$RESULTS_DIR/$f.json")
  done
  $BENCH plot "${runs[@]}" --out "$RESULTS_DIR/serve_latency.png"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
for phase in "${@:-hf-paged}"; do
  echo "=== $phase"
  case $phase in
    hf-paged) phase_hf_paged ;;
    offline) phase_offline ;;
    transformers) phase_transformers ;;
    plot) phase_plot ;;
    *) echo "unknown phase $phase (hf-paged, offline, transformers, plot)"; exit 2 ;;
  esac
done
if [ -n "${OUT:-}" ]; then cp "$RESULTS_DIR"/* "$OUT"/; fi
