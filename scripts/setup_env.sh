#!/usr/bin/env bash
# Creates .venv in the repository (if missing) and installs the project into it.
# Re-running is cheap: the install is skipped while requirements.txt and setup.py are unchanged.
#   bash scripts/setup_env.sh        then: source .venv/bin/activate
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' || { echo "error: Python 3.9+ needed ($PYTHON)" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
STAMP="$VENV/.fedml-installed"
WANT=$(cat "$ROOT/requirements.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "== installing requirements into $VENV (PyTorch is large: a few minutes the first time)"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet -r "$ROOT/requirements.txt"
    "$VENV/bin/pip" install --quiet --no-deps -e "$ROOT"
    echo "$WANT" > "$STAMP"
fi
"$VENV/bin/python" -c 'import torch, mpi4py.MPI, h5py, sklearn' || { echo "error: the environment in $VENV is broken; delete it and re-run" >&2; exit 1; }
