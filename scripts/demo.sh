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
skopeo inspect "oci:$OUT:latest" | head -20

# The embedded registry: loopback, local storage, its own port.
REG_DIR="$(mktemp -d /tmp/turbofs-demo-registry.XXXXXX)"
.venv/bin/turbofs serve --port 0 --storage "$REG_DIR/storage" >"$REG_DIR/serve.log" 2>&1 &
REG_PID=$!
cleanup() { kill "$REG_PID" 2>/dev/null || true; wait "$REG_PID" 2>/dev/null || true; rm -rf "$REG_DIR"; }
trap cleanup EXIT
for _ in $(seq 1 100); do
    grep -q "listening on" "$REG_DIR/serve.log" && break
    kill -0 "$REG_PID" 2>/dev/null || { cat "$REG_DIR/serve.log" >&2; exit 1; }
    sleep 0.1
done
REGISTRY="$(sed -n 's|.*listening on http://\([^ ]*\).*|\1|p' "$REG_DIR/serve.log")"
say "registry: $(cat "$REG_DIR/serve.log")"

say "pushing the turbo image: turbofs push oci:$OUT:latest $REGISTRY/demo/sample:latest"
.venv/bin/turbofs push "oci:$OUT:latest" "$REGISTRY/demo/sample:latest"
say "pushing it again under another tag: nothing to send"
.venv/bin/turbofs push "oci:$OUT:latest" "$REGISTRY/demo/sample:again"
say "the registry serves it to standard clients:"
skopeo inspect --tls-verify=false "docker://$REGISTRY/demo/sample:latest" | head -12
MNT="$REG_DIR/mnt"
mkdir -p "$MNT"
cleanup_mount() { .venv/bin/turbofs umount "$MNT" --run-dir "$REG_DIR/run" 2>/dev/null || true; cleanup; }
trap cleanup_mount EXIT
say "mounting it lazily: turbofs mount $REGISTRY/demo/sample:latest $MNT"
.venv/bin/turbofs mount "$REGISTRY/demo/sample:latest" "$MNT" --run-dir "$REG_DIR/run" --cache-dir "$REG_DIR/cache"
say "reading from the mount: $MNT/etc/os-release"
head -3 "$MNT/etc/os-release"
.venv/bin/turbofs status "$MNT" --run-dir "$REG_DIR/run" | .venv/bin/python -c 'import json,sys; s=json.load(sys.stdin); p=s.get("prefetch",{}); print("demo: status:", p.get("state"), p.get("chunks_done"), "of", p.get("chunks_total"), "chunks prefetched;", "FUSE requests", s.get("fuse_requests"))'
.venv/bin/turbofs umount "$MNT" --run-dir "$REG_DIR/run"
say "unmounted"
say "done"
