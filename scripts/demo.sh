#!/usr/bin/env bash
# Start stand-ins for FCM and APNs and the local stack, run the simulator's demo against them, and
# stop everything whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."

run_dir=${CHARGESHARE_STACK_DIR:-.run}
push_dir="$run_dir/fake-push"
fake_pid=""
cleanup() {
  .venv/bin/chargeshare stack down || true
  if [ -n "$fake_pid" ]; then kill "$fake_pid" 2>/dev/null || true; wait "$fake_pid" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if .venv/bin/chargeshare stack status >/dev/null 2>&1; then
  echo "the local stack is already up: stopping it so the service starts with the push stand-ins"
  .venv/bin/chargeshare stack down
fi

# Local stand-ins speaking FCM HTTP v1 (with its OAuth endpoint) and APNs (HTTP/2, TLS, ES256).
mkdir -p "$push_dir"
rm -f "$push_dir/push.env" "$push_dir/notifications.jsonl"
.venv/bin/python -m service.testing.fake_push --dir "$push_dir" --json \
  >"$push_dir/notifications.jsonl" 2>"$push_dir/fake-push.log" &
fake_pid=$!
for _ in $(seq 1 100); do [ -s "$push_dir/push.env" ] && break; sleep 0.1; done
if [ ! -s "$push_dir/push.env" ]; then
  echo "the FCM/APNs stand-ins did not start:" >&2; cat "$push_dir/fake-push.log" >&2; exit 1
fi
set -a
# shellcheck source=/dev/null
. "$push_dir/push.env"
CHARGESHARE_DEMO_PUSH_LOG="$push_dir/notifications.jsonl"
set +a

.venv/bin/chargeshare stack up
set -a
# shellcheck source=/dev/null
. "$run_dir/stack.env"
set +a
.venv/bin/firmware-sim demo "$@"
