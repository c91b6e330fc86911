#!/usr/bin/env bash
# A real Prometheus (Debian's) on loopback scrapes a live shmallocd: through
# Prometheus' HTTP API the target is up and a shmalloc_ series has a value.
# Usage: prometheus_server.sh BUILD_DIR
set -euo pipefail
build=$1
command -v prometheus >/dev/null || { echo "FAIL: prometheus not found (Debian package prometheus)"; exit 1; }
source "$(dirname "$0")/daemon_lib.sh"
test_setup prom
prom=
fail() { echo "FAIL: $*"; [ -f "$dir/prom.log" ] && tail -20 "$dir/prom.log"; exit 1; }
start_daemon
"$build/tests/metrics/metrics_workload" "$dir/s.sock" 1000

cat > "$dir/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: shmalloc
    static_configs:
      - targets: ["127.0.0.1:$port"]
YAML
promtool check config "$dir/prometheus.yml" >/dev/null || fail "promtool check config"

# Prometheus cannot pick a free port and tell us: try a few random ones.
for attempt in 1 2 3 4 5; do
  web=$((20000 + RANDOM % 20000))
  prometheus --config.file="$dir/prometheus.yml" --storage.tsdb.path="$dir/data" \
    --web.listen-address="127.0.0.1:$web" > "$dir/prom.log" 2>&1 &
  prom=$! others=$!
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$web/-/ready" >/dev/null 2>&1 && break 2
    kill -0 "$prom" 2>/dev/null || break
    sleep 0.1
  done
  kill -TERM "$prom" 2>/dev/null && wait "$prom" 2>/dev/null || true
  prom= others=
done
[ -n "$prom" ] || fail "Prometheus did not start"

api=http://127.0.0.1:$web/api/v1
for _ in $(seq 150); do
  targets=$(curl -fsS "$api/targets" || true)
  result=$(curl -fsS "$api/query?query=shmalloc_heap_objects" || true)
  if grep -q '"health":"up"' <<<"$targets" && grep -q '"result":\[{' <<<"$result"; then
    objects=$(grep -o '"value":\[[0-9.]*,"[0-9.e+]*"\]' <<<"$result" | sed 's/.*,"\(.*\)"\]/\1/')
    [ -n "$objects" ] || fail "no value in $result"
    awk "BEGIN { exit !($objects >= 333) }" || fail "shmalloc_heap_objects is $objects, the workload left at least 333"
    echo "ok: target up, shmalloc_heap_objects = $objects"
    exit 0
  fi
  sleep 0.2
done
echo "targets: $targets"
echo "query: $result"
fail "Prometheus never saw the daemon up with a shmalloc_ series"
