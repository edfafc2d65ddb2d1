#!/usr/bin/env bash
# Bring this machine to the state the project needs: Debian packages, a .venv
# with the project installed in editable mode with its dev extra.
#
# Idempotent and quick when nothing is missing: one dpkg-query, one stat.
# Works from any cwd. Must run as root when a Debian package is missing.
#
# Environment:
#   PYTHON            interpreter used to create .venv (default: python3)
#   TURBOFS_SKIP_APT  set to 1 to skip the Debian package step
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$REPO_ROOT/.venv"
STAMP="$VENV/.turbofs-bootstrap-stamp"

log() { printf 'bootstrap: %s\n' "$*"; }

# Is the system service $1 running? systemd where it is PID 1, else the
# sysvinit script's status (no systemd in containers).
service_running() {
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$1" 2>/dev/null; then
        return 0
    fi
    [[ -x "/etc/init.d/$1" ]] && "/etc/init.d/$1" status >/dev/null 2>&1
}

# --- Debian packages ---------------------------------------------------------
DEB_PACKAGES=(
    skopeo umoci containerd runc docker-registry debootstrap
    fuse3 libfuse3-dev pkg-config erofs-utils zstd iproute2 util-linux
    strace systemd shellcheck  # tests: flushes of an upload (strace), the units (systemd-analyze, shellcheck)
)
# python3-venv only matters when the interpreter cannot create a venv by itself
# (Debian's own python3 without it lacks ensurepip; pyenv builds have it).
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    DEB_PACKAGES+=(python3-venv)
fi

if [[ "${TURBOFS_SKIP_APT:-0}" == 1 ]]; then
    log "skipping Debian packages (TURBOFS_SKIP_APT=1)"
else
    missing=()
    # One dpkg-query for all packages; unknown packages make it exit non-zero
    # and print nothing for them, so compare names rather than trusting rc.
    installed="$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${DEB_PACKAGES[@]}" 2>/dev/null || true)"
    for pkg in "${DEB_PACKAGES[@]}"; do
        if ! grep -qE "^${pkg} ii" <<<"$installed"; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        log "Debian packages present (${#DEB_PACKAGES[@]})"
    else
        if [[ "$(id -u)" != 0 ]]; then
            log "missing Debian packages: ${missing[*]} (run as root to install them)" >&2
            exit 1
        fi
        log "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        # Package postinst scripts may auto-start system services. Leave them:
        # tests start their own instances on their own sockets and ports.
        # (Debian's docker-registry listens on :5000, containerd on
        # /run/containerd/containerd.sock: tests must pick other ones.)
        for svc in containerd docker-registry; do
            if service_running "$svc"; then
                log "note: system service $svc is running (left as is; tests use their own instances)"
            fi
        done
    fi
fi

# --- virtual environment -----------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV with $("$PYTHON" -c 'import sys; print(sys.executable)')"
    "$PYTHON" -m venv "$VENV"
    rm -f "$STAMP"
else
    log "venv present: $VENV"
fi

if [[ ! -f "$STAMP" || pyproject.toml -nt "$STAMP" ]]; then
    log "installing project: pip install -e '.[dev]'"
    pip_log="$VENV/pip-install.log"
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -e '.[dev]' >"$pip_log" 2>&1; then
        log "pip install failed; last lines of $pip_log:" >&2
        tail -n 40 "$pip_log" >&2
        exit 1
    fi
    touch "$STAMP"
else
    log "project install up to date (pyproject.toml not newer than stamp)"
fi
