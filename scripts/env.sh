# Sourced by run.sh and test.sh: creates the virtual environment if it is missing (or if
# pyproject.toml changed since it was made) and activates it. Nothing else needs installing by hand.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MNV2_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp="$VENV/.mnv2-installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    echo "== setting up $VENV (first run: about 2 minutes) =="
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch, torchvision, litert_torch, ai_edge_litert, adbutils, tqdm, matplotlib" \
        || { echo "environment set-up failed" >&2; exit 1; }
    rm -f "$VENV"/.mnv2-installed-*
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
# Quiet the TF-style C++ logging that the LiteRT interpreter and converter print.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
cd "$ROOT"
