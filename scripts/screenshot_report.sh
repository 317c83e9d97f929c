#!/usr/bin/env bash
# Optional: render an evaluation report (pipeline/evaluation/report.py) to a PNG screenshot for a quick look.
# Needs a local chromium (Debian: apt-get install -y chromium); not used by CI or the setup scripts.
#   bash scripts/screenshot_report.sh outputs/evaluate/report.html /tmp/report.png [width] [height]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 <report.html> <out.png> [width=1400] [height=4000]" >&2
  exit 2
fi
html=$(readlink -f "$1")
out=$(readlink -f "$2")
width=${3:-1400}
height=${4:-4000}
[ -f "$html" ] || { echo "no such file: $html" >&2; exit 1; }
bin=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
[ -n "$bin" ] || { echo "chromium not found (optional tool: apt-get install -y chromium)" >&2; exit 1; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$bin" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size="$width,$height" --screenshot="$out" "file://$html" 2>/dev/null
echo "$out"
