#!/usr/bin/env bash
# The main job on the embedded default: local Ray, SmolLM2-135M-Instruct as base and aligner, the bundled
# demo prompts. Creates/updates .venv first. Extra key=value arguments are passed to the job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 DS_ACCELERATOR=cpu RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m jobs.align_dataset "$@"
