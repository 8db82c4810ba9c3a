#!/usr/bin/env bash
# Serving benchmark on one GPU: the Llama-3.1-8B shape (random weights, bf16) saved as a model folder,
# served by `hf-paged serve` and by `transformers serve --continuous-batching`, each driven by
# benchmarks/bench_serve.py over the same Poisson rate sweep; plus offline ContinuousGenerator on the
# same requests (the ">= 90% of offline" check). Run from the repository root:
#
#   bash benchmarks/serve_gpu.sh hf-paged        # save the model if needed, sweep hf-paged serve (engine in
#                                                # its own process, the default)
#   bash benchmarks/serve_gpu.sh hf-paged-thread # hf-paged serve --no-engine-process (step loop in the HTTP
#                                                # server's process) at RATES_THREAD (default: inf only)
#   bash benchmarks/serve_gpu.sh offline         # ContinuousGenerator on the rate-inf prompts; prints each
#                                                # sweep's saturation throughput as a share of offline
#   bash benchmarks/serve_gpu.sh transformers    # sweep transformers serve on the same model
#   bash benchmarks/serve_gpu.sh plot            # latency-vs-rate PNG of every sweep found
#
# Phases can be combined (`bash benchmarks/serve_gpu.sh hf-paged offline`). Results go to $RESULTS_DIR
# (default /tmp/serve_bench; copied to $OUT when that is set): JSON per sweep, server logs, the PNG.
# Under each rate's table a line gives the CPU use (percent of one core) of the server process, its busiest
# threads, its child processes (the engine's own) and each load-generator process: one near 100% is the limit.
# Every sweep sends the same prompts at rate inf (seeded by the rate), so the saturation points of the
# server modes and offline are measured on identical requests.
# Knobs (env): MODEL_DIR, RATES, RATES_THREAD, NUM_PROMPTS, TF_NUM_PROMPTS, EQUAL_LOAD (1: also sweep
# hf-paged with TF_NUM_PROMPTS, for the side-by-side with transformers), INPUT_LEN, OUTPUT_LEN,
# MAX_DURATION, CLIENT_PROCESSES, SINGLE_CLIENT, GOODPUT, DTYPE, DEVICE, WHEEL_DIR (a CPU dry run:
# MODEL_DIR=<a saved `--shape default`> DTYPE=float32 DEVICE=cpu).
# Missing Python packages (fastapi, uvicorn, pydantic, openai, ...) are installed from .whl/ when present.
set -euo pipefail

RESULTS_DIR=${RESULTS_DIR:-/tmp/serve_bench}
MODEL_DIR=${MODEL_DIR:-/tmp/llama8b-random}
RATES=${RATES:-4,8,16,32,inf}
RATES_THREAD=${RATES_THREAD:-inf}       # hf-paged-thread: the before/after point (saturation)
EQUAL_LOAD=${EQUAL_LOAD:-1}
NUM_PROMPTS=${NUM_PROMPTS:-256}         # hf-paged's sweep (saturates the 8B at 'inf')
TF_NUM_PROMPTS=${TF_NUM_PROMPTS:-64}    # transformers serve is ~10x slower: fewer prompts keep it in time
INPUT_LEN=${INPUT_LEN:-64:1024}
OUTPUT_LEN=${OUTPUT_LEN:-256}
MAX_DURATION=${MAX_DURATION:-60}        # seconds of arrivals per rate at most
CLIENT_PROCESSES=${CLIENT_PROCESSES:-auto}  # load-generator processes (auto: one per 48 requests of a rate)
SINGLE_CLIENT=${SINGLE_CLIENT:-0}       # 1: also sweep hf-paged at rate inf from one client process
GOODPUT=${GOODPUT:-ttft:2000,tpot:100}  # SLOs in ms
DTYPE=${DTYPE:-bfloat16}
DEVICE=${DEVICE:-cuda}
WHEEL_DIR=${WHEEL_DIR:-.whl}
HF_PORT=${HF_PORT:-8000}
TF_PORT=${TF_PORT:-8001}
mkdir -p "$RESULTS_DIR"
pid=""
# A failed sweep must not leave a server holding the GPU for whatever runs next.
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; true' EXIT

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

sweep() {  # sweep LABEL PORT MODEL_NAME NUM_PROMPTS EXTRA... (the server's pid in $pid: its CPU use per rate)
  local label=$1 port=$2 name=$3 num=$4; shift 4
  $BENCH run --base-url "http://127.0.0.1:$port" --model "$name" --tokenizer "$MODEL_DIR" \
    --num-prompts "$num" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --rates "$RATES" \
    --max-duration "$MAX_DURATION" --warmup 16 --goodput "$GOODPUT" --label "$label" \
    --client-processes "$CLIENT_PROCESSES" --server-pid "$pid" --out "$RESULTS_DIR/$label.json" "$@"
}

start_hf_paged() {  # start_hf_paged LOG EXTRA...: starts the server in the background, sets $pid
  local log=$1; shift
  python3 -m hf_paged serve "$MODEL_DIR" --host 127.0.0.1 --port $HF_PORT --served-model-name llama-8b \
    --device "$DEVICE" --dtype "$DTYPE" --log-level warning "$@" >"$RESULTS_DIR/$log" 2>&1 &
  pid=$!
  wait_http "http://127.0.0.1:$HF_PORT/health" $pid 600
}

phase_hf_paged() {
  save_model
  start_hf_paged hf_paged_server.log  # the engine's step loop in its own process (serve's default)
  sweep hf-paged $HF_PORT llama-8b "$NUM_PROMPTS" --ignore-eos
  if [ "$SINGLE_CLIENT" = 1 ]; then
    # Rate inf again from one load-generator process: how much a single client process holds the numbers
    # back. Other prompts (--seed 1) of the same lengths' distribution: the server's prefix cache already
    # holds the first rate-inf prompts.
    RATES=inf CLIENT_PROCESSES=1 sweep hf-paged-1client $HF_PORT llama-8b "$NUM_PROMPTS" --ignore-eos --seed 1
  fi
  if [ "$EQUAL_LOAD" = 1 ]; then
    # The same prompts and rates as the transformers sweep, for a side-by-side at equal load.
    sweep "hf-paged-$TF_NUM_PROMPTS" $HF_PORT llama-8b "$TF_NUM_PROMPTS" --ignore-eos
  fi
  curl -s "http://127.0.0.1:$HF_PORT/metrics" | grep -v '^#' | grep -v _bucket >"$RESULTS_DIR/hf_paged_metrics.txt"
  stop_server $pid
}

phase_hf_paged_thread() {
  save_model
  start_hf_paged hf_paged_thread_server.log --no-engine-process  # the step loop shares the HTTP process
  RATES=$RATES_THREAD sweep hf-paged-thread $HF_PORT llama-8b "$NUM_PROMPTS" --ignore-eos
  stop_server $pid
}

phase_offline() {
  save_model
  # The sweeps' rate-inf prompts (the first JSON found; regenerated from the same seed and lengths when
  # there is none), and each sweep's saturation point as a share of offline.
  $BENCH offline --model "$MODEL_DIR" --num-prompts "$NUM_PROMPTS" --input-len "$INPUT_LEN" \
    --requests "$RESULTS_DIR/hf-paged.json" "$RESULTS_DIR/hf-paged-thread.json" \
    --output-len "$OUTPUT_LEN" --dtype "$DTYPE" --out "$RESULTS_DIR/offline.json"
}

phase_transformers() {
  save_model
  # The saved generation_config has no EOS, so every request generates exactly OUTPUT_LEN tokens
  # (transformers serve refuses the ignore_eos field).
  python3 -m transformers.cli.transformers serve "$MODEL_DIR" --continuous-batching --host 127.0.0.1 \
    --port $TF_PORT --device "$DEVICE" --dtype "$DTYPE" --log-level warning >"$RESULTS_DIR/transformers_server.log" 2>&1 &
  pid=$!
  wait_http "http://127.0.0.1:$TF_PORT/health" $pid 900
  sweep transformers $TF_PORT "$MODEL_DIR" "$TF_NUM_PROMPTS"
  stop_server $pid
}

phase_plot() {
  local runs=()
  for f in hf-paged hf-paged-thread "hf-paged-$TF_NUM_PROMPTS" transformers; do
    [ -f "$RESULTS_DIR/$f.json" ] && runs+=("$RESULTS_DIR/$f.json")
  done
  $BENCH plot "${runs[@]}" --out "$RESULTS_DIR/serve_latency.png"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# uvicorn picks uvloop and httptools up when importable (the serve extra installs both): say which it got.
python3 -c "import importlib.util as u; print('uvloop', bool(u.find_spec('uvloop')), 'httptools', bool(u.find_spec('httptools')))"
for phase in "${@:-hf-paged}"; do
  echo "=== $phase"
  case $phase in
    hf-paged) phase_hf_paged ;;
    hf-paged-thread) phase_hf_paged_thread ;;
    offline) phase_offline ;;
    transformers) phase_transformers ;;
    plot) phase_plot ;;
    *) echo "unknown phase $phase (hf-paged, hf-paged-thread, offline, transformers, plot)"; exit 2 ;;
  esac
done
if [ -n "${OUT:-}" ]; then cp "$RESULTS_DIR"/* "$OUT"/; fi
