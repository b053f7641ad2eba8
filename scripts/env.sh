# Source this: makes .venv beside the project on first use, with torch and the project installed.
# torch is installed first only when no torch is importable, so a machine's own build is kept. Without an
# NVIDIA GPU it comes from torch's own CPU wheel index (PyPI's Linux wheel is the CUDA build, about 1 GB
# more); where that index cannot be reached (a machine that reaches only PyPI), from PyPI.
# FEDSUP_TORCH_INDEX names another index, or "pypi" for PyPI's build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
torch_version="2.13.0"
cpu_index="https://download.pytorch.org/whl/cpu"

install_torch() {  # PYTHON
    local index="${FEDSUP_TORCH_INDEX:-}"
    if [ -z "$index" ]; then
        if command -v nvidia-smi >/dev/null 2>&1; then index="pypi"; else index="$cpu_index"; fi
    fi
    if [ "$index" != "pypi" ]; then
        # a short timeout and no retries: an unreachable index should cost seconds, not minutes
        if "$1" -m pip install -q --timeout 10 --retries 0 --index-url "$index" "torch==$torch_version"; then
            return 0
        fi
        echo "env.sh: could not install torch from $index; installing torch==$torch_version from PyPI" >&2
    fi
    "$1" -m pip install -q "torch==$torch_version"
}

if [ ! -x "$root/.venv/bin/python" ]; then
    python3 -m venv "$root/.venv"
fi
py="$root/.venv/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
    install_torch "$py"
fi
stamp="$root/.venv/.fedsup-installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
    "$py" -m pip install -q -e "$root[dev]"
    touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
cd "$root"
