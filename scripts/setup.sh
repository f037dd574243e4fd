#!/usr/bin/env bash
# Sets up .venv/ on a Debian machine with Python 3.11+, with or without a GPU, and builds the offline
# assets (the real Phi-3 and Mistral tokenizers) into .cache/medtune/.
#
#   bash scripts/setup.sh          # what the quickstart needs
#   bash scripts/setup.sh --dev    # plus the test tools and the real Gemma-3-270M (tokenizer and model folder)
#
# Without a GPU it installs the CPU build of torch first and never lets pip swap it for a CUDA build
# (set TORCH_INDEX_URL if your pip has no CPU build of torch 2.13.0 to offer). Unsloth is installed
# without torchvision and xformers, which it does not need on a CPU and whose wheels break its import there.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
dev=0
[ "${1:-}" = "--dev" ] && dev=1

say() { printf '\n==> %s\n' "$*"; }
apt_install() {
  local sudo=
  [ "$(id -u)" -ne 0 ] && sudo=sudo
  $sudo apt-get update -q && $sudo apt-get install -y -q "$@"
}

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for c in python3.11 python3.12 python3; do command -v "$c" >/dev/null && { PY=$c; break; }; done
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys, venv, ensurepip; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  say "Installing Python 3 with venv (apt)"
  apt_install python3 python3-venv python3-dev build-essential cmake
  PY=python3
fi
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  say "Installing a C++ toolchain and cmake (apt), to build llama.cpp"
  apt_install build-essential cmake
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11 or newer is needed"'

if [ ! -x .venv/bin/python ]; then
  say "Creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }

gpu=0
command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1 && gpu=1
constraints=$(mktemp)
reqs=$(mktemp)
trap 'rm -f "$constraints" "$reqs"' EXIT
if [ $gpu = 1 ]; then
  # keeps a torch already in .venv; without one, installs the newest torch the driver's CUDA runs
  say "GPU found: installing requirements.txt with scripts/install.py (it names the torch it keeps or picks)"
  .venv/bin/python scripts/install.py
else
  say "No GPU: installing the CPU build of torch $TORCH_VERSION"
  pip install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  echo "torch==$TORCH_VERSION" > "$constraints"
  grep -v '^unsloth' requirements.txt > "$reqs"
  say "Installing requirements.txt (torch held at $TORCH_VERSION)"
  pip install -q -r "$reqs" -c "$constraints"
  pip install -q --no-deps $(grep '^unsloth' requirements.txt)
  if pip list 2>/dev/null | grep -qiE '^(nvidia-|torchvision |xformers )'; then
    echo "setup: CUDA packages, torchvision or xformers got installed on a CPU machine; remove .venv and report this." >&2
    exit 1
  fi
fi
if [ $dev = 1 ]; then
  say "Installing test tools"
  pip install -q -r <(grep -v '^lm_eval' requirements-dev.txt)
  pip install -q --no-deps $(grep '^lm_eval' requirements-dev.txt)  # why: requirements-dev.txt
  if [ ! -x /usr/bin/chromium ]; then
    say "Installing Debian's chromium (apt) for the demo's browser tests"
    apt_install chromium
  fi
fi

say "Installing this project's package (medtune, editable)"
pip install -q --no-deps --no-build-isolation -e .

say "Building the offline tokenizers (Phi-3 from llama.cpp's vocabulary, Mistral from mistral-common)"
.venv/bin/python scripts/medtune/offline_tokenizers.py

# llama-cpp-python (the export's quantizer and verifier) is source-only: build it once from the
# same source package the tokenizers came from, and keep the wheel for later set-ups.
LLAMA_CPP_VERSION=$(.venv/bin/python -c 'from medtune.offline_tokenizers import LLAMA_CPP_PYTHON_VERSION as v; print(v)')
if ! .venv/bin/python -c "import importlib.metadata as m; assert m.version('llama_cpp_python') == '$LLAMA_CPP_VERSION'" 2>/dev/null; then
  # Built for this CPU (llama.cpp's default), except Intel's AMX tile instructions: in some virtual
  # machines (a nested Firecracker microVM, measured) the CPU offers them but their tile state is not
  # kept, and llama.cpp's first quantized matmul dies of SIGILL ("Illegal instruction"). Without them
  # llama.cpp uses AVX-512 there.
  wheels=.cache/medtune/wheels/no-amx
  if ! ls $wheels/llama_cpp_python-$LLAMA_CPP_VERSION-*.whl >/dev/null 2>&1; then
    say "Building llama-cpp-python $LLAMA_CPP_VERSION (about 5 minutes on 2 cores)"
    no_amx=
    [ "$(uname -m)" = x86_64 ] && no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    CFLAGS="${CFLAGS:-} $no_amx" CXXFLAGS="${CXXFLAGS:-} $no_amx" \
      pip wheel -q --no-deps --no-cache-dir -w $wheels .cache/medtune/downloads/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz
  fi
  pip install -q --find-links $wheels -r requirements-export.txt  # pip takes the built wheel over the source
fi
if [ $dev = 1 ]; then
  say "Building the real-weights fixture: Gemma-3-270M dequantized from its GGUF (about 2 minutes)"
  .venv/bin/python scripts/medtune/offline_gemma.py
fi
say "Set-up done: .venv/ and .cache/medtune/ are ready."
