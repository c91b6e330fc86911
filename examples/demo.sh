#!/usr/bin/env bash
# The main job: start shmallocd on its embedded defaults (with a heap name
# and socket of its own, so it never disturbs a daemon already on this
# machine), run a workload of several client processes against it, print
# what `shmallocctl stats` shows, and stop the daemon by its pid.
set -euo pipefail
build=${1:-build}
dir=$(mktemp -d /tmp/shmalloc-demo-XXXXXX)
socket=$dir/shmallocd.sock
heap=shmalloc-demo-$$
"$build/service/shmallocd" --heap "$heap" --socket "$socket" --metrics off &
daemon=$!
cleanup() {
  kill -TERM "$daemon" 2>/dev/null && wait "$daemon" || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 100); do
  "$build/service/shmallocctl" ping --socket "$socket" >/dev/null 2>&1 && break
  sleep 0.05
done
"$build/examples/span_workers" "$socket" 4
sleep 0.2  # the daemon notices the killed client's socket closing
echo "-- shmallocctl stats"
"$build/service/shmallocctl" stats --socket "$socket"
