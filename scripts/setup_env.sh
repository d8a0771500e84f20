#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned requirements into it. Idempotent.
# Source it (`. scripts/setup_env.sh`) to get the environment activated. VENV overrides the location.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  if ! python3 -m venv "$VENV"; then
    rm -rf "$VENV"  # a half-made environment (no pip) would be taken for a good one by the next run
    echo "setup_env: python3 cannot create a virtual environment at $VENV (no venv/ensurepip module); fix: install it" \
         "(Debian/Ubuntu: sudo apt install python3-venv), or activate an environment that has the requirements and" \
         "rerun with SKIP_SETUP=1" >&2
    return 1 2>/dev/null || exit 1
  fi
fi
. "$VENV/bin/activate"
STAMP="$VENV/.requirements.sha"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  python -m pip install -q -r "$ROOT/requirements-dev.txt" || { echo "setup_env: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
  echo "$WANT" > "$STAMP"
fi
