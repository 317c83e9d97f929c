#!/usr/bin/env bash
# Start the DiffPO Serve app locally from conf/serve.yaml (OpenAI-compatible API on http://127.0.0.1:8000/v1).
# Extra arguments go to `serve run` (e.g. a different config file). Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 TOKENIZERS_PARALLELISM=false DS_ACCELERATOR=cpu
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec .venv/bin/serve run "${@:-conf/serve.yaml}"
