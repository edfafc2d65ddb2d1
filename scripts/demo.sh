#!/usr/bin/env bash
# The main job end to end: build the sample OCI image from real parts, convert
# it to a turbo image with `turbofs build`, and inspect the result with skopeo.
#
# Usage: scripts/demo.sh [OUTPUT_DIR]   (default: ./out/sample-turbo)
# Needs root (debootstrap, umoci). The sample image is cached under
# ${TURBOFS_CACHE:-~/.cache/turbofs}/images/sample after the first run.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
OUT="${1:-$REPO_ROOT/out/sample-turbo}"

say() { printf 'demo: %s\n' "$*"; }

bash scripts/bootstrap.sh

say "building (or reusing) the sample image"
LAYOUT="$(.venv/bin/python -m bench.images sample)"
say "sample image: oci:$LAYOUT:latest"
skopeo inspect "oci:$LAYOUT:latest" >/dev/null

say "converting: turbofs build oci:$LAYOUT:latest --output $OUT --force"
mkdir -p "$(dirname "$OUT")"
.venv/bin/turbofs build "oci:$LAYOUT:latest" --output "$OUT" --force --verify

say "turbo image: oci:$OUT:latest"
skopeo inspect "oci:$OUT:latest"
