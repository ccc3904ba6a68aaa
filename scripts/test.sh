#!/usr/bin/env bash
# The test suite, as CI runs it: set up .venv from the project's files, then pytest.
# Without a GPU the Triton kernels run through Triton's interpreter (tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
