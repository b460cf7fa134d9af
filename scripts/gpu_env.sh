# Source on the GPU host after `scripts/gpu_host.sh install`.
export PYTHONPATH=${TPC_GPU_SITE:-$HOME/tpc-site}:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
