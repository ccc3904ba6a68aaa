#!/usr/bin/env bash
# Creates .venv from the project's own files (pyproject.toml) and installs the package
# editable with its test extras. Idempotent: re-runs only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.hpcm-setup-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
.venv/bin/python - <<'PY'
import torch, triton, compressai, numpy
print(f"hpcm-triton env: torch {torch.__version__}, triton {triton.__version__}, "
      f"compressai {compressai.__version__}, numpy {numpy.__version__}, "
      f"cuda {'yes' if torch.cuda.is_available() else 'no'}")
PY
