#!/usr/bin/env bash
# --metrics from each layer: the flag, SHMALLOC_METRICS and the TOML file
# (flags win, then the environment, then the file); a bad value exits 2
# naming the setting. Usage: settings.sh BUILD_DIR
set -euo pipefail
build=$1
source "$(dirname "$0")/daemon_lib.sh"
test_setup msettings

# Starts a daemon with "$@" (and the environment given), prints the metrics
# port its stats report, stops it by pid.
port_with() {
  launch_daemon --capacity 64M "$@"
  metrics_port
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
