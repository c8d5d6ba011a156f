#!/usr/bin/env bash
# The test suite on CPU: sets up .venv, then runs pytest (extra arguments go to pytest) and ends
# with the slowest tests (--durations), so that a regression in the suite's time shows.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh" test
cd "$ROOT"
exec python -m pytest --durations=15 "$@"
