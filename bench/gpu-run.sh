#!/usr/bin/env bash
# bench/gpu.py on the GPU machine, whose image has torch and transformers but not the worker's
# pydantic, pydantic-settings, structlog and orjson: installs the wheels that `make gpu-bundle`
# put in .whl/ (carried with the call) into /tmp/site, prints what runs, then runs
#   python3 -m bench.gpu --out "$OUT/gpu" [ARGS...]
# and exits with its exit code. $OUT/gpu gets gpu.json, gpu.md (the table) and log.txt.
#
# The device call (README.md, "GPU: bench/gpu.py"):
#   run(command="bash bench/gpu-run.sh", carry=[".whl"], timeout_s=420)
# Arguments go to bench/gpu.py, e.g. `bash bench/gpu-run.sh --time-budget-s 150` for a
# shorter rerun, or `--dry-run` to check this script on a CPU.
#
# Overridable (bench/gpu_image_check.py uses them): PYTHON (python3), TAGSTREAM_GPU_WHEELS
# (.whl), TAGSTREAM_GPU_SITE (/tmp/site), OUT (/tmp/tagstream-gpu-out where the tool sets none).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

PY="${PYTHON:-python3}"
WHEELS="${TAGSTREAM_GPU_WHEELS:-.whl}"
SITE="${TAGSTREAM_GPU_SITE:-/tmp/site}"
RESULTS="${OUT:-/tmp/tagstream-gpu-out}/gpu"
# Exit code of bench/gpu.py when its packages are missing: the same when they cannot be installed.
EXIT_MISSING=2

mkdir -p "$RESULTS"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]} == 0)); then
    echo "gpu-run.sh: no wheels in $WHEELS/: run 'make gpu-bundle' here and carry .whl" >&2
    exit "$EXIT_MISSING"
fi
echo "installing ${#wheels[@]} wheels from $WHEELS into $SITE ..."
# The machine runs commands as root; an environment variable, unlike the flag, is no error
# for a pip too old to know it.
export PIP_ROOT_USER_ACTION=ignore
if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --disable-pip-version-check --target "$SITE" "${wheels[@]}"; then
    echo "gpu-run.sh: pip install of $WHEELS/*.whl failed" >&2
    exit "$EXIT_MISSING"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# Nothing is fetched: the model is a local directory, and the machine has no network.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

"$PY" - <<'EOF'
import importlib
import importlib.metadata
import platform
import sys

print(f"python {platform.python_version()} ({sys.executable}) on {platform.platform()}")
for name, module in (
    ("torch", "torch"),
    ("transformers", "transformers"),
    ("tokenizers", "tokenizers"),
    ("safetensors", "safetensors"),
    ("huggingface-hub", "huggingface_hub"),
    ("numpy", "numpy"),
    ("pydantic", "pydantic"),
    ("pydantic-core", "pydantic_core"),
    ("pydantic-settings", "pydantic_settings"),
    ("python-dotenv", "dotenv"),
    ("typing-extensions", "typing_extensions"),
    ("structlog", "structlog"),
    ("orjson", "orjson"),
    ("PyYAML", "yaml"),
    ("nvidia-ml-py", "pynvml"),
):
    try:
        version = importlib.metadata.version(name)
        where = getattr(importlib.import_module(module), "__file__", None) or "?"
    except Exception as exc:  # report and carry on: bench/gpu.py names what it lacks
        version, where = "MISSING", f"{type(exc).__name__}: {exc}"
    print(f"  {name:18} {version:14} {where}")
import torch

if torch.cuda.is_available():
    print(f"  cuda {torch.version.cuda}: {torch.cuda.get_device_name(0)}")
else:
    print(f"  cuda: not available (torch {torch.__version__})")
EOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv || true
fi

"$PY" -m bench.gpu --out "$RESULTS" "$@" 2>&1 | tee "$RESULTS/log.txt"
status=${PIPESTATUS[0]}
echo "bench/gpu.py exited with $status; results in $RESULTS"
exit "$status"
