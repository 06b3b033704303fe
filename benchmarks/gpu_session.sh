#!/usr/bin/env bash
# One GPU session on the device machine (see README, "GPU benchmark"): the files that do not fit
# one transfer arrive beforehand in /tmp/g (SmolLM2.gguf.part*, fa.part* = an xz tar of the
# unpacked flash-attn 4 + CuTe DSL wheels, the cutlass-dsl-libs-core and gguf wheels), then:
#   benchmarks/gpu_session.sh setup      # assemble and check them, install into /tmp/site
#   benchmarks/gpu_session.sh tests      # the CUDA tests and the serving smoke check
#   benchmarks/gpu_session.sh bench ARGS # benchmarks/engine.py --out $OUT ARGS
#   benchmarks/gpu_session.sh bs128      # the batch-128 target alone (no carried files needed)
# Each step prints its own summary; results go to $OUT.
set -uo pipefail
G=/tmp/g
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD PYTHONUNBUFFERED=1
case "${1:-}" in
setup)
  cat $G/SmolLM2.gguf.part* > /tmp/smollm2.gguf
  echo "gguf sha256 $(sha256sum /tmp/smollm2.gguf | cut -c1-16)  (want b179c9523d0e6a0f)"
  cat $G/fa.part* | xz -d -T0 | tar x -C /tmp || exit 1
  # The wheels' .pth file (cutlass on sys.path) is not read from PYTHONPATH: the second entry does it.
  for w in $G/*.whl; do python3 -m zipfile -e "$w" /tmp/site || exit 1; done
  python3 -c "from flash_attn.cute import flash_attn_varlen_func; import gguf; print('flash-attn 4 and gguf import')"
  ;;
tests)
  python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_runner_fast.py tests/test_attention_kernel.py tests/test_flash_attn.py \
    tests/test_pipelined.py tests/test_adaptive.py 2>&1 | tee $OUT/pytest.txt | tail -15
  python3 benchmarks/gpu_smoke.py
  ;;
bench)
  shift
  python3 benchmarks/engine.py --out $OUT "$@" 2>&1 | grep -v "UserWarning\|exe_args, func_types"
  ;;
bs128)
  # The batch-128 target alone (8B shape, about 4 minutes): adaptive vs AR over the same contexts.
  shift
  python3 benchmarks/engine.py --out $OUT --shapes qwen3-8b --skip hf,smollm2,exactness,profile,attention \
    --sweep-bs 128 --means 1,8,16 --tag 8b-bs128 "$@" 2>&1 | grep -v "UserWarning\|exe_args, func_types"
  ;;
*)
  echo "usage: $0 setup|tests|bench|bs128 [engine.py args]"; exit 2
  ;;
esac
