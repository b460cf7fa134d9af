#!/usr/bin/env bash
# One stretch of GPU-host work per call (after scripts/gpu_host.sh install; see README "GPU host").
#   bash scripts/gpu_work.sh tests      core tests compiled on the GPU (index, host pool, copies, tiers)
#   bash scripts/gpu_work.sh docqa      document QA: built-in offloading vs ours (defaults and variants)
#   bash scripts/gpu_work.sh more       burst, no-reuse, fits, scheduler time at 8k/128k
#   bash scripts/gpu_work.sh vllm       the adapter's vLLM tests (eager engines)
#   bash scripts/gpu_work.sh engine     the adapter's engine tests compiled, then scheduler time
#   bash scripts/gpu_work.sh graphs     no-reuse/fits (prefix, ours, ours async), then document QA
#   bash scripts/gpu_work.sh bench-a    document QA, no reuse, fits (no hook profiler; TPC_PROFILE=1 adds it)
#   bash scripts/gpu_work.sh bench-b    chat, shared system prompt, then reliability tests up to a failure
#   bash scripts/gpu_work.sh graphs-check  bf16 engine tests whose loads run in full CUDA graphs; chat DMA vs Triton
#   bash scripts/gpu_work.sh docqa-triton  document QA, DMA vs Triton copies; reliability tests up to a failure
#   bash scripts/gpu_work.sh reliability  soak, faults, collisions, burst tests (eager engines)
#   bash scripts/gpu_work.sh copies       copy tests, copy benchmark (staged/DMA/Triton), engine tests compiled
#   bash scripts/gpu_work.sh docqa-staged document QA: built-in offloading, ours (staged DMA), ours with torch copies
#   bash scripts/gpu_work.sh verify-a     copy + engine tests compiled (float32 and the bf16 full-graph path), sched time
#   bash scripts/gpu_work.sh verify-b     document QA (offload, ours, ours staged), chat (offload, prefix, ours, ours staged)
#   bash scripts/gpu_work.sh verify-c     reliability tests eager, then no reuse / fits (prefix, ours)
#   bash scripts/gpu_work.sh verify-d     copy benchmark (staged, DMA, Triton, torch)
#   bash scripts/gpu_work.sh verify-e     reliability tests eager, then document QA eager (issue 4's target mode)
#   bash scripts/gpu_work.sh verify-f     engine tests compiled (defaults), bf16 full-graph tests batch-invariant, docqa eager
#   bash scripts/gpu_work.sh verify-g     every reliability test (eager), then chat (offloading, ours)
#   bash scripts/gpu_work.sh bisect-soak  the soak sample of async_write_through: (IEEE dots) staged, torch, no async scheduling; TF32 dots
#   bash scripts/gpu_work.sh next-a       copy tests (group-by-group submission), chat: offload, ours, ours ahead=1
#   bash scripts/gpu_work.sh next-b       document QA: offload, ours, ours ahead=1; then no reuse (prefix, ours)
#   bash scripts/gpu_work.sh next-c       bf16 one-token tests with batch-invariant kernels; every reliability test eager
#   bash scripts/gpu_work.sh next-d       document QA eager (issue 4's mode): offload, ours, ours ahead=1; system prompt
#   bash scripts/gpu_work.sh s6-a         soak sample (IEEE dots; then TF32 if it passes, torch copies if not); docqa eager + VRAM ideal
#   bash scripts/gpu_work.sh s6-b         copy tests, engine tests of layerwise_ahead compiled; docqa compiled + VRAM ideal
#   bash scripts/gpu_work.sh s6-c         every reliability test eager; bf16 one-token tests batch-invariant
#   bash scripts/gpu_work.sh s6-d         chat (offload, ours, ahead=1, VRAM ideal); system prompt and no reuse
#   bash scripts/gpu_work.sh s6-e         the soak against a full-stream oracle; docqa compiled + VRAM ideal; GPU copy tests
#   bash scripts/gpu_work.sh s6-f         fault, collision and burst tests eager; chat + VRAM ideal; bf16 batch-invariant
#   bash scripts/gpu_work.sh s6-g         which ingredient of async_write_through serves different outputs (soak bisection)
#   bash scripts/gpu_work.sh s6-h         the soak (3 configs, full-stream oracle) and the same-step write-through test, eager
#   bash scripts/gpu_work.sh s7-a         GPU copy tests, staged copy A/B (staging size, strided copies), engine tests compiled
#   bash scripts/gpu_work.sh s7-b         document QA compiled and eager with the VRAM ideal
#   bash scripts/gpu_work.sh s7-c         chat (offload, prefix, ours); system prompt and no reuse
#   bash scripts/gpu_work.sh s7-d         reliability eager, soak object census, Qwen3-8B document QA
#   bash scripts/gpu_work.sh s8-a         GPU copy tests (no compile after warm-up), Qwen3-8B document QA, docqa engine tests
#   bash scripts/gpu_work.sh s8-b         the soak eager, document QA compiled (+ VRAM ideal)
#   bash scripts/gpu_work.sh s8-c         document QA eager, chat
#   bash scripts/gpu_work.sh s9-a         the soak eager, every configuration (memory: ours beside the engine alone)
#   bash scripts/gpu_work.sh s9-b         fault, collision, burst tests eager; engine tests compiled
#   bash scripts/gpu_work.sh s9-c         document QA, all five configs, compiled
#   bash scripts/gpu_work.sh s9-d         document QA (offload, ours), engine core in-process and in its own process
# Results and logs go to one tarball $OUT/<part>.tgz (the device tool brings back few files); each
# step has its own time limit so one slow step cannot eat the call.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh
FINAL=${OUT:-/tmp/tpc-out}
OUT=/tmp/tpc-work-${1:-none}
PART=${1:-none}
mkdir -p "$OUT" "$FINAL"
# Hook profiles only on request: cProfile slows the hooks it watches (session 3 found the
# session-2 GPU timings taken with it on), so timed runs go without it.
if [ "${TPC_PROFILE:-0}" = 1 ]; then export TPC_BENCH_PROFILE="$OUT/prof"; fi
run() {  # run <seconds> <log name> <command...>
  local t=$1 name=$2
  shift 2
  echo "== $name: $*"
  timeout "$t" "$@" >"$OUT/$name.log" 2>&1
  echo "== $name: rc=$? ($(date +%T))"
  tail -n 25 "$OUT/$name.log" | grep -v "INFO\|WARNING" | tail -n 12
  tar czf "$FINAL/$PART.tgz" -C "$OUT" .  # after every step: a call cut off at its limit keeps what ran
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
case "${1:-}" in
  tests)
    run 200 gpu-tests-core python3 -m pytest -q -x -p no:cacheprovider tests/test_host_pool.py tests/test_copy.py \
      tests/test_index.py tests/test_tiers.py ;;
  docqa)
    run 560 compare-docqa python3 -m bench.compare --workload docqa \
      --configs offload ours ours:copy_backend=triton ours:demote=write_through --out "$OUT/compare-docqa.json" ;;
  rerun)
    run 270 compare-docqa python3 -m bench.compare --workload docqa \
      --configs offload ours ours:demote=write_through --out "$OUT/compare-docqa.json"
    run 300 compare-noreuse-fits python3 -m bench.compare --workload noreuse fits \
      --configs prefix ours ours:demote=write_through --out "$OUT/compare-noreuse-fits.json" ;;
  more)
    run 200 compare-burst python3 -m bench.compare --workload burst --configs offload ours \
      --out "$OUT/compare-burst.json"
    run 260 compare-noreuse-fits python3 -m bench.compare --workload noreuse fits --configs prefix ours \
      --out "$OUT/compare-noreuse-fits.json"
    run 120 sched python3 -m bench.sched_time --out "$OUT/sched.json" ;;
  vllm)
    TPC_TEST_EAGER=1 run 560 gpu-tests-vllm python3 -m pytest -q -p no:cacheprovider tests/vllm ;;
  engine)  # the adapter's engine tests compiled (vLLM's default CUDA graphs), then scheduler time
    run 120 gpu-tests-copy python3 -m pytest -q -p no:cacheprovider -rsx tests/test_copy.py
    run "${TPC_ENGINE_TIMEOUT:-330}" gpu-tests-engine python3 -m pytest -q -p no:cacheprovider -rsx --durations=12 \
      tests/vllm/test_engine.py tests/vllm/test_units.py tests/vllm/test_startup.py tests/vllm/test_multiprocess.py
    run 150 sched python3 -m bench.sched_time --out "$OUT/sched.json" ;;
  graphs)  # full CUDA graphs kept with layer-wise loads: no-reuse and fits, then document QA
    run 330 compare-noreuse-fits python3 -m bench.compare --workload noreuse fits \
      --configs prefix ours ours:load=async --out "$OUT/compare-noreuse-fits.json"
    run 240 compare-docqa python3 -m bench.compare --workload docqa --configs offload ours \
      --out "$OUT/compare-docqa.json" ;;
  bench-a)  # document QA against built-in offloading; no reuse and fits against built-in prefix caching
    run 200 compare-docqa python3 -m bench.compare --workload docqa --configs offload ours \
      --out "$OUT/compare-docqa.json"
    run 330 compare-noreuse-fits python3 -m bench.compare --workload noreuse fits --configs prefix ours \
      --out "$OUT/compare-noreuse-fits.json" ;;
  bench-b)  # multi-turn chat and a shared system prompt, then the reliability tests up to a failure
    run 230 compare-chat python3 -m bench.compare --workload chat --configs offload prefix ours \
      --out "$OUT/compare-chat.json"
    run 150 compare-sysprompt python3 -m bench.compare --workload sysprompt --configs prefix ours \
      --out "$OUT/compare-sysprompt.json"
    TPC_TEST_EAGER=1 run "${TPC_REL_TIMEOUT:-180}" gpu-tests-reliability python3 -m pytest -x -q -p no:cacheprovider \
      -rsx tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py tests/vllm/test_soak.py ;;
  graphs-check)  # a load in a full-CUDA-graph step (bf16 runs graphs), copy fallbacks, chat with Triton copies
    TPC_TEST_DTYPE=bfloat16 run 220 gpu-tests-tail1 python3 -m pytest -q -p no:cacheprovider -rsx \
      tests/vllm/test_engine.py -k "(big_kv and tail1) or one_token"
    run 120 gpu-tests-copy python3 -m pytest -q -p no:cacheprovider -rsx tests/test_copy.py
    run 250 compare-chat python3 -m bench.compare --workload chat --configs offload ours ours:copy_backend=triton \
      --out "$OUT/compare-chat.json" ;;
  docqa-triton)  # document QA with DMA and with Triton copies, then the reliability tests up to a failure
    run 260 compare-docqa python3 -m bench.compare --workload docqa --configs offload ours ours:copy_backend=triton \
      --out "$OUT/compare-docqa.json"
    TPC_TEST_EAGER=1 run "${TPC_REL_TIMEOUT:-250}" gpu-tests-reliability python3 -m pytest -x -q -p no:cacheprovider \
      -rsx tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py tests/vllm/test_soak.py ;;
  reliability)  # issue 5's engine tests, eager
    TPC_TEST_EAGER=1 run 560 gpu-tests-reliability python3 -m pytest -q -p no:cacheprovider -rsx \
      tests/vllm/test_soak.py tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py ;;
  copies)  # issue 3's copy target with staged DMA, then the adapter's engine tests on it
    run 130 gpu-tests-copy python3 -m pytest -q -p no:cacheprovider -rsx tests/test_copy.py
    run 150 copy python3 -m bench.copy_bench --backends staged dma triton --pool-create-gib 0 --out "$OUT/copy.json"
    run "${TPC_ENGINE_TIMEOUT:-250}" gpu-tests-engine python3 -m pytest -q -p no:cacheprovider -rsx --durations=8 \
      tests/vllm/test_engine.py ;;
  docqa-staged)  # document QA: staged DMA (the default) against torch copies and built-in offloading
    run 330 compare-docqa python3 -m bench.compare --workload docqa --configs offload ours ours:copy_backend=torch \
      --out "$OUT/compare-docqa.json" ;;
  verify-a)  # ~6 min: correctness of the current defaults on the GPU
    run 110 gpu-tests-copy python3 -m pytest -q -p no:cacheprovider -rsx tests/test_copy.py
    run 230 gpu-tests-engine python3 -m pytest -q -p no:cacheprovider -rsx --durations=8 tests/vllm/test_engine.py
    TPC_TEST_DTYPE=bfloat16 run 150 gpu-tests-tail1 python3 -m pytest -q -p no:cacheprovider -rsx \
      tests/vllm/test_engine.py -k "(big_kv and tail1) or one_token"
    run 60 sched python3 -m bench.sched_time --out "$OUT/sched.json" ;;
  verify-b)  # ~9.5 min: the headline workloads, torch copies (default) and staged DMA in the same runs
    run 290 compare-docqa python3 -m bench.compare --workload docqa --configs offload ours ours:copy_backend=staged \
      --out "$OUT/compare-docqa.json"
    run 270 compare-chat python3 -m bench.compare --workload chat --configs offload prefix ours ours:copy_backend=staged \
      --out "$OUT/compare-chat.json" ;;
  verify-c)  # ~9.5 min: reliability (eager) up to a failure, then no reuse and fits
    TPC_TEST_EAGER=1 run 250 gpu-tests-reliability python3 -m pytest -x -q -p no:cacheprovider -rsx \
      tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py tests/vllm/test_soak.py
    run 320 compare-noreuse-fits python3 -m bench.compare --workload noreuse fits --configs prefix ours \
      --out "$OUT/compare-noreuse-fits.json" ;;
  verify-d)  # ~1.5 min: issue 3's copy target, every backend
    run 200 copy python3 -m bench.copy_bench --backends staged dma triton torch --pool-create-gib 0 \
      --out "$OUT/copy.json" ;;
  verify-e)  # ~8 min: issue 4's close criteria besides the compiled engine tests
    TPC_TEST_EAGER=1 run 250 gpu-tests-reliability python3 -m pytest -x -q -p no:cacheprovider -rsx \
      tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py tests/vllm/test_soak.py
    run 240 compare-docqa-eager python3 -m bench.compare --workload docqa --eager \
      --configs offload ours ours:copy_backend=staged --out "$OUT/compare-docqa-eager.json" ;;
  verify-f)  # ~6 min: the defaults (staged copies) compiled; bf16 with vLLM's batch-invariant kernels
    run 230 gpu-tests-engine python3 -m pytest -q -p no:cacheprovider -rsx --durations=8 tests/vllm/test_engine.py
    VLLM_BATCH_INVARIANT=1 TPC_TEST_DTYPE=bfloat16 run 150 gpu-tests-tail1-invariant python3 -m pytest -q \
      -p no:cacheprovider -rsx tests/vllm/test_engine.py -k "(big_kv and tail1) or one_token"
    run 200 compare-docqa-eager python3 -m bench.compare --workload docqa --eager --configs offload ours \
      --out "$OUT/compare-docqa-eager.json" ;;
  verify-g)  # ~9 min: every reliability test eager (no stop at a failure), then chat with the defaults
    TPC_TEST_EAGER=1 run 330 gpu-tests-reliability python3 -m pytest -q -p no:cacheprovider -rsx --durations=10 \
      tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py tests/vllm/test_soak.py
    run 220 compare-chat python3 -m bench.compare --workload chat --configs offload ours \
      --out "$OUT/compare-chat.json" ;;
  bisect-soak)  # ~5 min: session 5's GPU soak failure (async + write-through, request 44 of the sample)
    K="outputs_equal and async_write_through"
    TPC_TEST_EAGER=1 run 120 soak-staged python3 -m pytest -q -p no:cacheprovider tests/vllm/test_soak.py -k "$K"
    TPC_TEST_EAGER=1 TPC_TEST_COPY_BACKEND=torch run 120 soak-torch python3 -m pytest -q -p no:cacheprovider \
      tests/vllm/test_soak.py -k "$K"
    TPC_TEST_EAGER=1 TPC_TEST_ASYNC_SCHEDULING=0 run 120 soak-sync-sched python3 -m pytest -q -p no:cacheprovider \
      tests/vllm/test_soak.py -k "$K"
    # float32 attention on an H200 is vLLM's Triton backend, whose tl.dot rounds float32 inputs to
    # TF32 by default; the tests now ask for IEEE dots (tests/conftest.py): this run is session 5's
    # condition, to tell numerics from a wrong block
    TPC_TEST_EAGER=1 TRITON_F32_DEFAULT=tf32 run 150 soak-tf32 python3 -m pytest -q \
      -p no:cacheprovider tests/vllm/test_soak.py -k "$K" ;;
  next-a)  # ~7 min: layer groups submitted as the forward reaches them (layerwise_ahead), chat
    run 120 gpu-tests-copy python3 -m pytest -q -p no:cacheprovider -rsx tests/test_copy.py
    run 330 compare-chat python3 -m bench.compare --workload chat \
      --configs offload ours ours:layerwise_ahead=1 --out "$OUT/compare-chat.json" ;;
  next-b)  # ~9 min: the same for document QA, then no reuse against built-in prefix caching
    run 300 compare-docqa python3 -m bench.compare --workload docqa \
      --configs offload ours ours:layerwise_ahead=1 --out "$OUT/compare-docqa.json"
    run 240 compare-noreuse python3 -m bench.compare --workload noreuse --configs prefix ours \
      --out "$OUT/compare-noreuse.json" ;;
  next-c)  # ~8 min: is the bf16 gap batching? then the reliability tests with session 5's test fixes
    VLLM_BATCH_INVARIANT=1 TPC_TEST_DTYPE=bfloat16 run 180 gpu-tests-tail1-invariant python3 -m pytest -q \
      -p no:cacheprovider -rsx tests/vllm/test_engine.py -k "(big_kv and tail1) or one_token"
    TPC_TEST_EAGER=1 run 360 gpu-tests-reliability python3 -m pytest -q -p no:cacheprovider -rsx --durations=10 \
      tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py tests/vllm/test_soak.py ;;
  next-d)  # ~7 min: issue 4's target mode with and without layerwise_ahead, then the shared system prompt
    run 260 compare-docqa-eager python3 -m bench.compare --workload docqa --eager \
      --configs offload ours ours:layerwise_ahead=1 --out "$OUT/compare-docqa-eager.json"
    run 180 compare-sysprompt python3 -m bench.compare --workload sysprompt --configs prefix ours \
      --out "$OUT/compare-sysprompt.json" ;;
  s6-a)  # ~8.5 min: is session 5's soak failure numerics? then issue 4's target mode with the VRAM ideal
    K="outputs_equal and async_write_through"
    TPC_TEST_EAGER=1 run 150 soak-ieee python3 -m pytest -q -p no:cacheprovider tests/vllm/test_soak.py -k "$K"
    last=$(grep -E "[0-9]+ (passed|failed)" "$OUT/soak-ieee.log" | tail -n 1)
    if [[ "$last" == *passed* && "$last" != *failed* && "$last" != *error* ]]; then
      # IEEE passed: session 5's condition (TF32 dots) should fail if numerics were the cause
      TPC_TEST_EAGER=1 TRITON_F32_DEFAULT=tf32 run 150 soak-tf32 python3 -m pytest -q -p no:cacheprovider \
        tests/vllm/test_soak.py -k "$K"
    else
      TPC_TEST_EAGER=1 TPC_TEST_COPY_BACKEND=torch run 150 soak-torch python3 -m pytest -q -p no:cacheprovider \
        tests/vllm/test_soak.py -k "$K"
    fi
    run 330 compare-docqa-eager python3 -m bench.compare --workload docqa --eager \
      --configs offload ours ours:layerwise_ahead=1 prefix:kv_gib=16 --out "$OUT/compare-docqa-eager.json" ;;
  s6-b)  # ~9 min: layerwise_ahead's GPU tests, then document QA compiled with it and the VRAM ideal
    run 120 gpu-tests-copy python3 -m pytest -q -p no:cacheprovider -rsx tests/test_copy.py
    run 160 gpu-tests-engine-ahead python3 -m pytest -q -p no:cacheprovider -rsx tests/vllm/test_engine.py -k ahead
    run 300 compare-docqa python3 -m bench.compare --workload docqa \
      --configs offload ours ours:layerwise_ahead=1 prefix:kv_gib=16 --out "$OUT/compare-docqa.json" ;;
  s6-c)  # ~8 min: every reliability test eager (session 5's test fixes), bf16 batch-invariant
    TPC_TEST_EAGER=1 run 360 gpu-tests-reliability python3 -m pytest -q -p no:cacheprovider -rsx --durations=10 \
      tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py tests/vllm/test_soak.py
    VLLM_BATCH_INVARIANT=1 TPC_TEST_DTYPE=bfloat16 run 150 gpu-tests-tail1-invariant python3 -m pytest -q \
      -p no:cacheprovider -rsx tests/vllm/test_engine.py -k "(big_kv and tail1) or one_token" ;;
  s6-d)  # ~9.5 min: chat with layerwise_ahead and the VRAM ideal; system prompt and no reuse
    run 330 compare-chat python3 -m bench.compare --workload chat \
      --configs offload ours ours:layerwise_ahead=1 prefix:kv_gib=16 --out "$OUT/compare-chat.json"
    run 230 compare-sysprompt-noreuse python3 -m bench.compare --workload sysprompt noreuse --configs prefix ours \
      --out "$OUT/compare-sysprompt-noreuse.json" ;;
  s6-e)  # ~8.5 min: the soak (every request against built-in caching that never evicts, same calls)
    TPC_TEST_EAGER=1 run 170 gpu-tests-soak python3 -m pytest -q -p no:cacheprovider -rsx tests/vllm/test_soak.py
    run 250 compare-docqa python3 -m bench.compare --workload docqa \
      --configs offload ours ours:layerwise_ahead=1 prefix:kv_gib=16 --out "$OUT/compare-docqa.json"
    run 90 gpu-tests-copy-gpu python3 -m pytest -q -p no:cacheprovider -rsx tests/test_copy.py -k gpu ;;
  s6-f)  # ~9 min: the other reliability tests eager; chat with the VRAM ideal; bf16 batch-invariant
    TPC_TEST_EAGER=1 run 200 gpu-tests-reliability python3 -m pytest -q -p no:cacheprovider -rsx --durations=8 \
      tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py
    run 250 compare-chat python3 -m bench.compare --workload chat \
      --configs offload ours ours:layerwise_ahead=1 prefix:kv_gib=16 --out "$OUT/compare-chat.json"
    VLLM_BATCH_INVARIANT=1 TPC_TEST_DTYPE=bfloat16 run 90 gpu-tests-tail1-invariant python3 -m pytest -q \
      -p no:cacheprovider -rsx tests/vllm/test_engine.py -k "(big_kv and tail1) or one_token" ;;
  s6-g)  # ~4 min: async loads alone, write-through alone, both without vLLM's async scheduling
    TPC_TEST_EAGER=1 TPC_SOAK_CONFIGS=async_lazy,layerwise_write_through run 170 soak-ingredients python3 -m pytest \
      -q -p no:cacheprovider -rsx -s tests/vllm/test_soak.py -k outputs_equal
    TPC_TEST_EAGER=1 TPC_SOAK_CONFIGS=async_write_through TPC_TEST_ASYNC_SCHEDULING=0 run 110 soak-sync-sched \
      python3 -m pytest -q -p no:cacheprovider -rsx -s tests/vllm/test_soak.py -k outputs_equal ;;
  s6-h)  # ~5.5 min: session 6's write-through fix on the GPU
    TPC_TEST_EAGER=1 run 230 gpu-tests-soak python3 -m pytest -q -p no:cacheprovider -rsx -s tests/vllm/test_soak.py
    TPC_TEST_EAGER=1 run 150 gpu-tests-samestep python3 -m pytest -q -p no:cacheprovider -rsx tests/vllm/test_engine.py \
      -k "samestep and (wt or layerwise)" ;;
  s7-a)  # ~8.5 min: staged loads in fewer, larger steps (256 MiB staging, strided copies): copy tests, A/B, engine
    run 130 gpu-tests-copy-gpu python3 -m pytest -q -p no:cacheprovider -rsx tests/test_copy.py -k gpu
    for v in 64:0 256:0 256:4; do  # staging MiB : rows from which a slot run is one strided copy
      run 90 "copy-staging-${v%:*}-2d${v#*:}" python3 -m bench.copy_bench --backends staged --batches 512 4096 \
        --iters 10 --pool-create-gib 0 --slot-order runs --staging-mib "${v%:*}" --min-2d-rows "${v#*:}" \
        --out "$OUT/copy-staging-${v%:*}-2d${v#*:}.json"
    done
    run 230 gpu-tests-engine python3 -m pytest -q -p no:cacheprovider -rsx --durations=8 tests/vllm/test_engine.py ;;
  s7-b)  # ~9.5 min: document QA compiled and eager, with the VRAM ideal
    run 300 compare-docqa python3 -m bench.compare --workload docqa --configs offload ours prefix:kv_gib=16 \
      --out "$OUT/compare-docqa.json"
    run 270 compare-docqa-eager python3 -m bench.compare --workload docqa --eager \
      --configs offload ours prefix:kv_gib=16 --out "$OUT/compare-docqa-eager.json" ;;
  s7-c)  # ~9.5 min: chat against built-in offloading and prefix caching; system prompt and no reuse
    run 300 compare-chat python3 -m bench.compare --workload chat --configs offload prefix ours \
      --out "$OUT/compare-chat.json"
    run 260 compare-sysprompt-noreuse python3 -m bench.compare --workload sysprompt noreuse --configs prefix ours \
      --out "$OUT/compare-sysprompt-noreuse.json" ;;
  s7-d)  # ~9.5 min: reliability eager, the soak's object census, Qwen3-8B document QA
    TPC_TEST_EAGER=1 run 250 gpu-tests-reliability python3 -m pytest -q -p no:cacheprovider -rsx \
      tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py
    TPC_TEST_EAGER=1 TPC_SOAK_CONFIGS=defaults run 100 gpu-tests-soak-census python3 -m pytest -q -p no:cacheprovider \
      -rsx -s tests/vllm/test_soak.py -k memory
    run 200 compare-docqa-qwen3 python3 -m bench.compare --workload docqa --model qwen3-8b --configs offload ours \
      --out "$OUT/compare-docqa-qwen3.json" ;;
  s8-a)  # ~8.5 min: session 7's kernel decorator on the GPU (no compile after warm-up), Qwen3-8B document QA
          # in one run, document-QA engine tests compiled
    run 120 gpu-tests-copy-gpu python3 -m pytest -q -p no:cacheprovider -rsx tests/test_copy.py -k gpu
    run 280 compare-docqa-qwen3 python3 -m bench.compare --workload docqa --model qwen3-8b --configs offload ours \
      --out "$OUT/compare-docqa-qwen3.json"
    run 120 gpu-tests-engine python3 -m pytest -q -p no:cacheprovider -rsx tests/vllm/test_engine.py -k docqa ;;
  s8-b)  # ~8.5 min: the soak eager (memory test: Triton's compile artefacts reported apart), document QA compiled
    TPC_TEST_EAGER=1 run 200 gpu-tests-soak python3 -m pytest -q -p no:cacheprovider -rsx -s tests/vllm/test_soak.py
    run 300 compare-docqa python3 -m bench.compare --workload docqa --configs offload ours prefix:kv_gib=16 \
      --out "$OUT/compare-docqa.json" ;;
  s8-c)  # ~7 min: document QA eager (issue 4's mode) again, then chat
    run 200 compare-docqa-eager python3 -m bench.compare --workload docqa --eager --configs offload ours \
      --out "$OUT/compare-docqa-eager.json"
    run 230 compare-chat python3 -m bench.compare --workload chat --configs offload prefix ours \
      --out "$OUT/compare-chat.json" ;;
  s9-a)  # ~7 min: the soak eager, every configuration, its memory test with the engine-alone baseline
    TPC_TEST_EAGER=1 run 420 gpu-tests-soak python3 -m pytest -q -p no:cacheprovider -rsx -s tests/vllm/test_soak.py ;;
  s9-b)  # ~9 min: fault, collision and burst tests eager; the engine tests compiled
    TPC_TEST_EAGER=1 run 250 gpu-tests-reliability python3 -m pytest -q -p no:cacheprovider -rsx \
      tests/vllm/test_faults.py tests/vllm/test_collisions.py tests/vllm/test_burst.py
    run 290 gpu-tests-engine python3 -m pytest -q -p no:cacheprovider -rsx --durations=8 tests/vllm/test_engine.py ;;
  s9-c)  # ~9 min: document QA with all five configs, compiled (~100 s each with start-up)
    run 540 compare-docqa-all python3 -m bench.compare --workload docqa \
      --configs none prefix offload simple ours --out "$OUT/compare-docqa-all.json" ;;
  s9-d)  # ~8 min: document QA, built-in offloading and ours, engine core in-process then in its own process
    run 230 compare-docqa python3 -m bench.compare --workload docqa --configs offload ours \
      --out "$OUT/compare-docqa.json"
    run 230 compare-docqa-engine-process python3 -m bench.compare --workload docqa --configs offload ours \
      --engine-process --out "$OUT/compare-docqa-engine-process.json" ;;
  *) echo "usage: $0 tests|docqa|rerun|more|vllm|engine|graphs|bench-a|bench-b|graphs-check|docqa-triton|reliability|copies|docqa-staged|verify-a|verify-b|verify-c|verify-d|verify-e|verify-f|verify-g|bisect-soak|next-a|next-b|next-c|next-d|s6-a|s6-b|s6-c|s6-d|s6-e|s6-f|s6-g|s6-h|s7-a|s7-b|s7-c|s7-d|s8-a|s8-b|s8-c|s9-a|s9-b|s9-c|s9-d" >&2
     exit 2 ;;
esac
tar czf "$FINAL/$1.tgz" -C "$OUT" . && ls -la "$OUT"
