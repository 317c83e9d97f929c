#!/usr/bin/env bash
# The test suite. Creates/updates .venv first. Extra arguments go to pytest, e.g. -m "not integration" for the
# unit tier (about a minute) without the Ray jobs, the Serve app and the real model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 TOKENIZERS_PARALLELISM=false
# -rfExs lists every failure, error, skip and xfail with its reason (a floating-point near-tie is reported as an xfail)
exec .venv/bin/python -m pytest -q -rfExs --durations=15 -p no:cacheprovider "$@"
