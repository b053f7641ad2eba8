#!/usr/bin/env bash
# Make bench/.flower-venv: Flower's simulation engine (flwr + Ray) and torch, for the `flower` variant of
# bench/compare.py. A venv of its own, so that Flower's dependencies never touch the project's .venv.
#
#     bash bench/setup_flower.sh            # idempotent: does nothing once the venv works
#     FLWR_VERSION=1.x.y bash bench/setup_flower.sh   # another Flower release
#
# torch==2.13.0 goes in first (the CPU build, from the local wheel cache), so that flwr's resolver keeps it;
# flwr and ray come from PyPI. The versions installed are written to bench/.flower-venv/versions.txt.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.flower-venv"
# The release measured in bench/RESULTS.md; override to try another. (1.42.0, the newest when this was
# written, could not be installed here: it requires certifi>=2026.10.19, which PyPI did not yet serve.)
FLWR_VERSION="${FLWR_VERSION:-1.41.0}"
PYTHON="${PYTHON:-python3}"

check() {
    "$venv/bin/python" - <<'EOF'
import flwr, ray, torch
from flwr.simulation import run_simulation  # noqa: F401 - the entry point flower_peer.py uses
print(f"flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}")
EOF
}

if [ -x "$venv/bin/python" ] && check >/dev/null 2>&1 && grep -q "^flwr==$FLWR_VERSION\$" "$venv/versions.txt" 2>/dev/null; then
    echo "bench/.flower-venv is ready: $(check)"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv"
fi
echo '*' > "$venv/.gitignore"   # keep the venv out of git without touching the project's .gitignore
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q torch==2.13.0
"$py" -m pip install -q "flwr[simulation]==$FLWR_VERSION" torch==2.13.0
"$py" -m pip install -q psutil
"$py" -m pip freeze | grep -i -E '^(flwr|ray|torch|numpy|protobuf|grpcio)==' > "$venv/versions.txt"
echo "bench/.flower-venv is ready: $(check)"
cat "$venv/versions.txt"
