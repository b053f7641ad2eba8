#!/usr/bin/env bash
# Make bench/.pfl-venv: pfl-research's simulator (pfl with its PyTorch extra) and torch, for the `pfl`
# variant of bench/cifar.py. A venv of its own, so that pfl's dependencies never touch the project's .venv.
#
#     bash bench/setup_pfl.sh            # idempotent: does nothing once the venv works
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.pfl-venv"
PFL_VERSION="${PFL_VERSION:-0.6.0}"
PYTHON="${PYTHON:-python3}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import pfl, torch" 2>/dev/null; then
    echo "bench/.pfl-venv is ready: $("$venv/bin/python" -c 'import pfl, torch; print("pfl", pfl.__version__ if hasattr(pfl, "__version__") else "'"$PFL_VERSION"'", "torch", torch.__version__)')"
    exit 0
fi
[ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
echo '*' > "$venv/.gitignore"   # keep the venv out of git without touching the project's .gitignore
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q "pfl[pytorch]==$PFL_VERSION" torch==2.13.0
"$venv/bin/python" -m pip freeze | grep -i -E '^(pfl|torch|numpy)==' > "$venv/versions.txt"
cat "$venv/versions.txt"
