# Sourced by the metrics test scripts (with $build set).
#
# test_setup NAME: a temp dir ($dir), a heap name of its own ($heap), and a
# trap that stops the daemon ($daemon) and any other pid in $others, each by
# pid, and removes the dir and the heaps ($heap, and a second daemon's
# $heap-2).
test_setup() {
  dir=$(mktemp -d "/tmp/shmalloc-test-$1-XXXXXX")
  heap=shmalloc-test-$1-$$-$RANDOM
  daemon= others=
  trap cleanup EXIT
}
cleanup() {
  local pid
  for pid in $others $daemon; do kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  rm -rf "$dir"
  rm -f "/dev/shm/$heap" "/dev/shm/$heap-2"
}
fail() { echo "FAIL: $*"; exit 1; }

# Starts shmallocd on $heap and $dir/s.sock with "$@" added, sets daemon to
# its pid, and waits until it answers.
launch_daemon() {
  "$build/service/shmallocd" --heap "$heap" --socket "$dir/s.sock" --log-level warn "$@" &
  daemon=$!
  for _ in $(seq 200); do
    "$build/service/shmallocctl" ping --socket "$dir/s.sock" >/dev/null 2>&1 && break
    sleep 0.05
  done
}

# The metrics port the running daemon's stats report (0: metrics off).
metrics_port() {
  "$build/service/shmallocctl" stats --json --socket "$dir/s.sock" |
    grep -o '"metrics_port": *[0-9]*' | grep -o '[0-9]*$' || true
}

# A daemon with metrics on a free loopback port; sets daemon and port.
start_daemon() {
  launch_daemon --capacity 256M --metrics 127.0.0.1:0
  port=$(metrics_port)
  [ -n "$port" ] && [ "$port" != 0 ] || fail "the daemon reports no metrics port"
}
