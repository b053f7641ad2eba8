# Source this: makes .venv beside the project on first use, with torch and the project installed.
# torch==2.13.0 is installed first only when no torch is importable, so a machine's own build is kept.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ ! -x "$root/.venv/bin/python" ]; then
    python3 -m venv "$root/.venv"
fi
py="$root/.venv/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install -q torch==2.13.0
fi
stamp="$root/.venv/.fedsup-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$py" -m pip install -q -e "$root[dev]"
    touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
cd "$root"
