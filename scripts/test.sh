#!/usr/bin/env bash
# The project's checks, in the order CI runs them: bootstrap, ruff, mypy, pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k format -x).
# Every check runs even when an earlier one failed; the exit status is non-zero
# if any failed. pytest's "no tests collected" (exit 5) counts as a failure.
set -uo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT" || exit 1

if ! bash scripts/bootstrap.sh; then
    echo "test.sh: bootstrap failed" >&2
    exit 1
fi

VENV_BIN="$REPO_ROOT/.venv/bin"
failed=()

step() {
    local name="$1"
    shift
    echo "test.sh: == $name: $*"
    "$@"
    local rc=$?
    if ((rc != 0)); then
        echo "test.sh: $name failed (exit $rc)" >&2
        failed+=("$name")
    fi
    return 0
}

step ruff "$VENV_BIN/ruff" check .
step mypy "$VENV_BIN/mypy"

echo "test.sh: == pytest: $VENV_BIN/pytest $*"
"$VENV_BIN/pytest" "$@"
rc=$?
if ((rc == 5)); then
    echo "test.sh: pytest collected no tests (exit 5): counted as a failure" >&2
    failed+=(pytest)
elif ((rc != 0)); then
    echo "test.sh: pytest failed (exit $rc)" >&2
    failed+=(pytest)
fi

if ((${#failed[@]} > 0)); then
    echo "test.sh: FAILED: ${failed[*]}" >&2
    exit 1
fi
echo "test.sh: all checks passed"
