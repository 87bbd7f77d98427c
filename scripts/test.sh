#!/usr/bin/env bash
# Creates the environment if missing, then runs the test suite. Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec python -m pytest "$@"
