#!/usr/bin/env bash
# The main job: start shmallocd on its embedded defaults (with a heap name
# and socket of its own, so it never disturbs a daemon already on this
# machine), run cache_workload (reader processes and a writer sharing one
# cache through libshmalloc, a writer killed mid-put; every value checked),
# print what `shmallocctl stats`, `shmallocctl caches` and the Prometheus
# endpoint show, and stop the daemon by its pid. (Metrics go on a free
# loopback port here; the default is 127.0.0.1:9464.)
# Usage: examples/demo.sh [build-dir] [seconds]
set -euo pipefail
build=${1:-build}
seconds=${2:-5}
dir=$(mktemp -d /tmp/shmalloc-demo-XXXXXX)
socket=$dir/shmallocd.sock
heap=shmalloc-demo-$$
"$build/service/shmallocd" --heap "$heap" --socket "$socket" --metrics 127.0.0.1:0 &
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
"$build/examples/cache_workload" --socket "$socket" --seconds "$seconds"
echo "-- shmallocctl stats"
"$build/service/shmallocctl" stats --socket "$socket"
echo "-- shmallocctl caches"
"$build/service/shmallocctl" caches --socket "$socket"
port=$("$build/service/shmallocctl" stats --json --socket "$socket" | grep -o '"metrics_port": *[0-9]*' | grep -o '[0-9]*$')
if command -v curl >/dev/null; then
  echo "-- curl http://127.0.0.1:$port/metrics (heap lines)"
  curl -fsS "http://127.0.0.1:$port/metrics" | grep -E '^shmalloc_(heap_[a-z]+_bytes|heap_objects|mallocs_total|frees_total|clients|cache_[a-z_]+)[ {]'
fi
