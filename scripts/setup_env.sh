#!/usr/bin/env bash
# Creates .venv (if missing) and installs the pinned requirements into it. Idempotent.
# Source it (`. scripts/setup_env.sh`) to get the environment activated.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" || { echo "setup_env: could not create a virtual environment at $VENV (install python3-venv)" >&2; return 1 2>/dev/null || exit 1; }
fi
. "$VENV/bin/activate"
STAMP="$VENV/.requirements.sha"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  python -m pip install -q --upgrade pip >/dev/null
  python -m pip install -q -r "$ROOT/requirements-dev.txt" || { echo "setup_env: pip install failed" >&2; return 1 2>/dev/null || exit 1; }
  echo "$WANT" > "$STAMP"
fi
