#!/usr/bin/env bash
# One GPU machine's measurement cycle: the BENCHMARKS.md rows and the GPU test files, in named groups, each step
# under a time limit drawn from what is left of LIMIT seconds. Everything goes to $OUT/log.txt (default
# artifacts/device_cycle); stdout gets one line per step and a short summary.
#
#   LIMIT=580 bash benchmarks/device_cycle.sh engine      # decode / FP8 / long-prompt / MTP rows
#   LIMIT=580 bash benchmarks/device_cycle.sh tests       # the GPU test files, one step each
#   LIMIT=580 bash benchmarks/device_cycle.sh served      # handoff, TTFT and burst rows, EPD tests on the GPU
#   LIMIT=580 bash benchmarks/device_cycle.sh overhead    # served tok/s at concurrency 64: entry instances, admission
#   LIMIT=580 bash benchmarks/device_cycle.sh nixl        # handoff nixl over cuda_ipc (carry .whl and .nixl: tools/device_nixl.sh)
#   bash benchmarks/device_cycle.sh engine tests          # several groups, in order
#   bash benchmarks/device_cycle.sh handoff t_cuda_graphs # single steps (by the names in the groups below)
#
# On the lent machines (no registry) carry .whl (../shared/tools/device-wheels.sh fills it): where python3 sees a
# CUDA device, the script sources .whl/device-env.sh and installs the project and tritonclient from there first
# (into python3's own site-packages: never on a development machine, whose python3 is not the stub's).
set -u
cd "$(dirname "$0")/.."
if [ -e .whl/device-env.sh ] && python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  source .whl/device-env.sh
  python3 -m pip install -q --no-deps --no-build-isolation -e . > /dev/null 2>&1
  # into the interpreter's own site-packages: the Python-backend stub ignores PYTHONPATH
  env -u PYTHONPATH python3 -m pip install -q --no-deps --no-index --ignore-installed .whl/tritonclient-*.whl \
    .whl/python_rapidjson-*.whl > /dev/null 2>&1
  ls .pyspy/py_spy-*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-deps --no-index .pyspy/py_spy-*.whl > /dev/null 2>&1
fi
START=$(date +%s) LIMIT=${LIMIT:-3600}
OUT=${OUT:-artifacts/device_cycle}
mkdir -p "$OUT"
LOG=$OUT/log.txt
CHECKPOINT=${CHECKPOINT:-/tmp/mimo_v25_2layers}

ONLY=
step() {  # step NAME MAX_SECONDS COMMAND...
  local name=$1 max=$2; shift 2
  [ -z "$ONLY" ] || [ "$ONLY" = "$name" ] || return 0
  local left=$(( LIMIT - ($(date +%s) - START) - 5 ))
  if (( left < 20 )); then echo "SKIP $name (no time left)" | tee -a "$LOG"; return; fi
  (( max > left )) && max=$left
  echo "=== $name ($(date +%T), limit ${max}s): $*" >> "$LOG"
  local t0=$(date +%s) rc
  timeout -k 5 "$max" "$@" >> "$LOG" 2>&1
  rc=$?
  echo "--- $name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

checkpoint() {  # the served rows' checkpoint: real encoder widths, 2 LM layers (~100 s on an H200 host)
  [ -e "$CHECKPOINT/config.json" ] || python3 -m builders tiny --preset v2.5 --layers 2 --out "$CHECKPOINT"
}

PYTEST="python3 -m pytest -q -p no:cacheprovider --tb=short -rfEs"
ENGINE="python3 -m benchmarks.bench_engine --prompt-len 512 --decode-len 32"
TTFT="python3 -m benchmarks.bench_ttft --device gpu --checkpoint $CHECKPOINT --engine max_num_batched_tokens=8192"

engine() {
  step decode_profiled 150 $ENGINE --batch-sizes 1,8,64 --profile
  step decode 120 $ENGINE --batch-sizes 1,8,64
  step decode_in_turn 120 $ENGINE --batch-sizes 1,8,64 --overlap-steps 0
  step decode_fp8 120 $ENGINE --batch-sizes 1,8,64 --fp8
  step long_prompts 120 $ENGINE --batch-sizes 1 --prompt-lens 4096,16384 --decode-len 16
  step long_prompts_profiled 150 $ENGINE --batch-sizes 1 --prompt-lens 4096,16384 --decode-len 16 --profile
  step decode_fp8_profiled 150 $ENGINE --batch-sizes 1 --fp8 --profile
  step first_request 300 python3 -m benchmarks.bench_first_request --out "$OUT/first_request.json"
  step mtp 150 $ENGINE --batch-sizes 1,8 --speculative-tokens 3 --accept-rates 0,0.7,1
}

tests() {
  step t_layer_kernels 120 $PYTEST tests/test_layer_kernels.py
  step t_cuda_graphs 300 $PYTEST tests/test_cuda_graphs_gpu.py tests/test_engine_overlap.py "tests/test_cuda_graphs.py::test_warm_up_runs_graph_and_eager_decodes_and_leaves_the_engine_as_new" -s
  step t_fused_moe 120 $PYTEST tests/test_fused_moe_gpu.py tests/test_fused_moe.py -k "gpu or fp8_dense or hopper"
  step t_encoder_kernels 200 $PYTEST tests/test_encoder_kernels_gpu.py
  step t_preprocess 120 $PYTEST tests/test_preprocess_gpu.py
  step t_paged_attention 240 $PYTEST tests/test_paged_attention_kernel.py
}

BUILD= BUILD_LOG=$(mktemp)
build_checkpoint() {  # from the start, beside whatever runs first, when a requested step needs it
  case " $* " in *" served "*|*" ttft_"*|*" burst_"*) checkpoint > "$BUILD_LOG" 2>&1 & BUILD=$! ;; esac
}

served() {
  step ipc_copy 60 python3 -m benchmarks.bench_ipc_copy
  step handoff 90 python3 -m benchmarks.bench_handoff --requests 100
  step handoff_produce 90 python3 -m benchmarks.bench_handoff --requests 100 --produce
  step handoff_gpu_inputs 90 python3 -m benchmarks.bench_handoff --requests 100 --gpu-inputs
  step handoff_mps 120 bash benchmarks/with_mps.sh python3 -m benchmarks.bench_handoff --requests 100
  step overhead 240 python3 -m benchmarks.bench_serving_overhead --device gpu
  # py-spy from a carried .pyspy/ (pip download py-spy --no-deps -d .pyspy): what holds the stubs' GIL at c=64
  step overhead_py_spy 240 python3 -m benchmarks.bench_serving_overhead --device gpu --py-spy "$OUT/py_spy"
  case "$ONLY" in ""|ttft_*|burst_*)
    if [ -n "$BUILD" ]; then
      wait $BUILD
      echo "=== checkpoint $CHECKPOINT: rc=$?" >> "$LOG"
      cat "$BUILD_LOG" >> "$LOG"
      BUILD=
    fi ;;
  esac
  step ttft_colocated 180 $TTFT --launch colocated --sequential 1,2,4,8 --repeats 3
  step ttft_epd 180 $TTFT --launch epd --encoders 1 --encoder-gpus 0 --sequential 1,2,4,8 --repeats 3
  step burst_colocated 240 $TTFT --launch colocated --rates 1000 --requests 16
  step burst_epd 240 $TTFT --launch epd --encoders 1 --encoder-gpus 0 --rates 1000 --requests 16
  step t_epd_gpu 300 env MIMO_SERVING_DEVICE=gpu $PYTEST tests/test_epd_direct_write.py \
    tests/test_epd_encoder_server.py tests/test_epd_language.py
  step audio 300 python3 -m benchmarks.bench_encoders --rows audio30 --cuda-graphs
}

OVERHEAD="python3 -m benchmarks.bench_serving_overhead --device gpu"
overhead() {  # the streamed path's throughput at concurrency 64: entry instances and the admission interval
  step overhead_base 200 $OVERHEAD --out "$OUT/overhead_base.json"
  step overhead_entries2 200 $OVERHEAD --entry-instances 2 --out "$OUT/overhead_entries2.json"
  step overhead_entries4 200 $OVERHEAD --entry-instances 4 --out "$OUT/overhead_entries4.json"
  step overhead_admit4 200 $OVERHEAD --entry-instances 2 --engine admission_interval=4 --out "$OUT/overhead_admit4.json"
  step overhead_admit8_budget 200 $OVERHEAD --entry-instances 2 --engine admission_interval=8 \
    --engine max_num_batched_tokens=2048 --out "$OUT/overhead_admit8_budget.json"
  step overhead_long 200 $OVERHEAD --entry-instances 2 --max-tokens 128 --out "$OUT/overhead_long.json"
  step overhead_tuned 200 $OVERHEAD --entry-instances 2 --engine admission_interval=8 \
    --engine max_num_batched_tokens=2048 --concurrency 1,64 --out "$OUT/overhead_tuned.json"
  step overhead_tuned4 200 $OVERHEAD --entry-instances 4 --engine admission_interval=8 \
    --engine max_num_batched_tokens=2048 --concurrency 1,64 --out "$OUT/overhead_tuned4.json"
}

nixl() {
  step nixl_unpack 60 bash -c 'tar xJf .nixl/nixl_cu13.txz -C "$(python3 -c "import site; print(site.getsitepackages()[0])")"'
  step t_nixl_vram 120 $PYTEST tests/test_epd_nixl.py
  step t_handoff_nixl_gpu 300 env MIMO_SERVING_DEVICE=gpu $PYTEST tests/test_epd_handoff.py -k nixl
}

GROUP_NAMES="engine tests served overhead nixl"
STEPS=$(grep -oE '^  step [a-z0-9_]+' "$0" | awk '{print $2}' | tr '\n' ' ')
[ $# -gt 0 ] || { echo "usage: $0 GROUP|STEP ... (groups: $GROUP_NAMES; steps: $STEPS)" >&2; exit 2; }
for arg in "$@"; do  # check them all before any runs
  case " $GROUP_NAMES $STEPS " in *" $arg "*) ;; *) echo "unknown group or step $arg (groups: $GROUP_NAMES; steps: $STEPS)" >&2; exit 2 ;; esac
done
build_checkpoint "$@"
{ nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader; git log --oneline -1; } >> "$LOG" 2>&1
for arg in "$@"; do
  case " $GROUP_NAMES " in
    *" $arg "*) $arg ;;
    *) ONLY=$arg; for group in $GROUP_NAMES; do $group; done; ONLY= ;;  # one step: its group's other steps are passed over
  esac
done
echo "=== summary"
grep -E "^--- |^SKIP|passed|failed|FAILED|direct_write_vs|direct_rewrite|model_local_copy|\"images_per_s\"|tokens within|drafts equal|itl_ms" "$LOG" | cut -c1-300 | tail -60
