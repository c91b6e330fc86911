#!/usr/bin/env bash
# --metrics from each layer: the flag, SHMALLOC_METRICS and the TOML file
# (flags win, then the environment, then the file); a bad value exits 2
# naming the setting. Usage: settings.sh BUILD_DIR
set -euo pipefail
build=$1
dir=$(mktemp -d /tmp/shmalloc-test-msettings-XXXXXX)
heap=shmalloc-test-msettings-$$-$RANDOM
daemon=
cleanup() {
  [ -n "$daemon" ] && kill -TERM "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null || true
  rm -rf "$dir"
  rm -f "/dev/shm/$heap"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }

# Starts a daemon with "$@" (and the environment given), prints the metrics
# port its stats report, stops it by pid.
port_with() {
  "$build/service/shmallocd" --heap "$heap" --socket "$dir/s.sock" --capacity 64M --log-level warn "$@" &
  daemon=$!
  for _ in $(seq 200); do
    "$build/service/shmallocctl" ping --socket "$dir/s.sock" >/dev/null 2>&1 && break
    sleep 0.05
  done
  "$build/service/shmallocctl" stats --json --socket "$dir/s.sock" | grep -o '"metrics_port": *[0-9]*' | grep -o '[0-9]*$'
  kill -TERM "$daemon" && wait "$daemon" || true
  daemon=
}

echo 'metrics = "off"' > "$dir/off.toml"
echo 'metrics = "127.0.0.1:0"' > "$dir/on.toml"
[ "$(port_with --metrics 127.0.0.1:0)" != 0 ] || fail "--metrics 127.0.0.1:0 serves nothing"
[ "$(port_with --config "$dir/off.toml")" = 0 ] || fail "metrics = \"off\" in the file still serves"
[ "$(port_with --config "$dir/on.toml")" != 0 ] || fail "metrics from the file not served"
[ "$(SHMALLOC_METRICS=127.0.0.1:0 port_with --config "$dir/off.toml")" != 0 ] || fail "SHMALLOC_METRICS does not win over the file"
[ "$(SHMALLOC_METRICS=127.0.0.1:0 port_with --metrics off)" = 0 ] || fail "--metrics off does not win over SHMALLOC_METRICS"

for bad in 127.0.0.1 127.0.0.1:99999 :9464 lots; do
  set +e
  "$build/service/shmallocd" --heap "$heap" --socket "$dir/s.sock" --metrics "$bad" 2> "$dir/err.txt"
  rc=$?
  set -e
  [ "$rc" = 2 ] || fail "--metrics $bad exited $rc, not 2"
  grep -q -- "--metrics '$bad'" "$dir/err.txt" || { cat "$dir/err.txt"; fail "no message naming --metrics $bad"; }
done
[ ! -e "/dev/shm/$heap" ] || fail "a refused start left its heap"
echo "ok: flag, environment and file; bad values exit 2"
