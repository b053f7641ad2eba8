# Source this: makes .venv beside the project on first use, with torch and the project installed.
# torch is installed first only when no torch is importable, so a machine's own build is kept. Without an
# NVIDIA GPU it comes from torch's own CPU wheel index (PyPI's Linux wheel is the CUDA build, about 1 GB
# more); where that index cannot be reached (a machine that reaches only PyPI), from PyPI.
# FEDSUP_TORCH_INDEX names another index, or "pypi" for PyPI's build.
# The set-up runs in a subshell: the shell that sources this keeps its own options, and a failed step makes
# `source` fail instead of closing that shell. Each step says `|| exit 1` itself: bash ignores `set -e` in
# whatever runs as a condition, and `source env.sh || exit 1` is one.

_fedsup_setup() (
    set -euo pipefail
    root="$1"
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
        "$1" -m pip install -q "torch==$torch_version" || return 1
    }

    if [ ! -x "$root/.venv/bin/python" ]; then
        python3 -m venv "$root/.venv" || exit 1
    fi
    py="$root/.venv/bin/python"
    if ! "$py" -c "import torch" 2>/dev/null; then
        install_torch "$py" || exit 1
    fi
    stamp="$root/.venv/.fedsup-installed"
    if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
        "$py" -m pip install -q -e "$root[dev]" || exit 1
        touch "$stamp" || exit 1
    fi
)

_fedsup_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A plain command, not an `if` test: bash ignores `set -e` inside anything run as a condition.
_fedsup_setup "$_fedsup_root"
_fedsup_status=$?
unset -f _fedsup_setup
if [ "$_fedsup_status" = 0 ]; then
    export PATH="$_fedsup_root/.venv/bin:$PATH"
    cd "$_fedsup_root" || return 1
    unset _fedsup_root _fedsup_status
else
    echo "env.sh: setting up $_fedsup_root/.venv failed (see the lines above)" >&2
    unset _fedsup_root _fedsup_status
    return 1
fi
