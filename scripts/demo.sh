#!/usr/bin/env bash
# Start the local stack, run the simulator's demo against it, and stop the stack whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

run_dir=${CHARGESHARE_STACK_DIR:-.run}
trap '.venv/bin/chargeshare stack down || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

.venv/bin/chargeshare stack up
set -a
# shellcheck source=/dev/null
. "$run_dir/stack.env"
set +a
.venv/bin/firmware-sim demo "$@"
