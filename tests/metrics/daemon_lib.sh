# Sourced by the metrics test scripts: starts shmallocd on $heap and
# $dir/s.sock with metrics on a free loopback port, and sets daemon (its
# pid, for cleanup by pid) and port (from shmallocctl stats --json).
start_daemon() {
  "$build/service/shmallocd" --heap "$heap" --socket "$dir/s.sock" --capacity 256M \
    --metrics 127.0.0.1:0 --log-level warn &
  daemon=$!
  for _ in $(seq 200); do
    "$build/service/shmallocctl" ping --socket "$dir/s.sock" >/dev/null 2>&1 && break
    sleep 0.05
  done
  port=$("$build/service/shmallocctl" stats --json --socket "$dir/s.sock" |
         grep -o '"metrics_port": *[0-9]*' | grep -o '[0-9]*$' || true)
  [ -n "$port" ] && [ "$port" != 0 ] || fail "the daemon reports no metrics port"
}
