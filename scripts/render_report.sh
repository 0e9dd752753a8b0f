#!/usr/bin/env bash
# Render a caploc report.html headlessly: screenshot + check that every figure decoded.
#   scripts/render_report.sh runs/report/report.html [shot.png] [height]
# Needs Debian's chromium (apt-get install -y chromium). Exit 1 if an <img> failed to decode.
set -euo pipefail
html=$(realpath "${1:?usage: render_report.sh REPORT.html [SHOT.png] [HEIGHT]}")
shot=${2:-${html%.html}.png}
height=${3:-3000}
chrome=$(command -v chromium || command -v chromium-browser || true)
[ -n "$chrome" ] || { echo "chromium not found: apt-get install -y chromium" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync "--user-data-dir=$profile" "--window-size=1200,$height")
"$chrome" "${flags[@]}" "--screenshot=$shot" "file://$html" >/dev/null 2>&1
dom=$("$chrome" "${flags[@]}" --dump-dom "file://$html" 2>/dev/null)
loaded=$(grep -o 'data-images-loaded="[0-9]*"' <<<"$dom" | grep -o '[0-9]*' || echo "?")
total=$(grep -o 'data-images-total="[0-9]*"' <<<"$dom" | grep -o '[0-9]*' || echo "?")
echo "screenshot: $shot"
echo "images decoded: $loaded of $total"
[ "$loaded" = "$total" ] && [ "$loaded" != "?" ]
