#!/usr/bin/env bash
# The project's test command (CPU only, no network). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pytest -q tests "$@"
