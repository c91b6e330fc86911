#!/usr/bin/env bash
# A live shmallocd's /metrics: promtool finds nothing to complain about,
# Go's identities hold on real data, and a second daemon asked for the same
# metrics port fails at startup with a clear message and leaves nothing.
# Usage: live_scrape.sh BUILD_DIR
set -euo pipefail
build=$1
command -v promtool >/dev/null || { echo "FAIL: promtool not found (Debian package prometheus)"; exit 1; }
source "$(dirname "$0")/daemon_lib.sh"
test_setup metrics
start_daemon

"$build/tests/metrics/metrics_workload" "$dir/s.sock" 20000
curl -fsS "http://127.0.0.1:$port/metrics" > "$dir/scrape.txt"

# promtool: exit 0 and not a single line of complaint.
if ! promtool check metrics < "$dir/scrape.txt" > "$dir/promtool.txt" 2>&1 || [ -s "$dir/promtool.txt" ]; then
  cat "$dir/promtool.txt"
  fail "promtool check metrics"
fi

value() { awk -v k="$1" '$1 == k { print $2 }' "$dir/scrape.txt"; }
for name in shmalloc_heap_sys_bytes shmalloc_heap_inuse_bytes shmalloc_heap_idle_bytes shmalloc_heap_alloc_bytes \
            shmalloc_memory_classes_heap_unused_bytes shmalloc_heap_objects shmalloc_mallocs_total \
            shmalloc_frees_total process_resident_memory_bytes process_open_fds; do
  [ -n "$(value $name)" ] || fail "$name is missing"
done
awk_check() { awk "BEGIN { exit !($1) }" || fail "$2"; }
sys=$(value shmalloc_heap_sys_bytes); inuse=$(value shmalloc_heap_inuse_bytes); idle=$(value shmalloc_heap_idle_bytes)
alloc=$(value shmalloc_heap_alloc_bytes); unused=$(value shmalloc_memory_classes_heap_unused_bytes)
objects=$(value shmalloc_heap_objects); mallocs=$(value shmalloc_mallocs_total); frees=$(value shmalloc_frees_total)
awk_check "$sys == $inuse + $idle" "heap_sys $sys != heap_inuse $inuse + heap_idle $idle"
awk_check "$inuse == $alloc + $unused" "heap_inuse $inuse != heap_alloc $alloc + heap_unused $unused"
awk_check "$objects == $mallocs - $frees" "heap_objects $objects != mallocs $mallocs - frees $frees"
# The workload's mark: 20,004 objects allocated and every other one still
# live; a sixth are tiny and, as in Go, count as freed once packed (their
# 16-byte blocks count instead), so at least 10,002 - 3,334 objects remain.
awk_check "$mallocs >= 20004 && $objects >= 6668" "mallocs $mallocs / objects $objects below the workload's"
awk_check "$(value 'shmalloc_control_requests_total{op="hello"}') >= 1" "no hello counted"
awk_check "$(value 'shmalloc_control_request_duration_seconds_count{op="refill"}') >= 1" "no refill timed"

# The same port again: a clean startup error, exit 1, nothing left behind.
set +e
"$build/service/shmallocd" --heap "$heap-2" --socket "$dir/s2.sock" --metrics "127.0.0.1:$port" 2> "$dir/err.txt"
rc=$?
set -e
[ "$rc" = 1 ] || fail "a daemon on a taken metrics port exited $rc, not 1"
grep -q "cannot serve metrics on 127.0.0.1:$port" "$dir/err.txt" || { cat "$dir/err.txt"; fail "no clear message"; }
[ ! -e "/dev/shm/$heap-2" ] || fail "the refused daemon left its heap"
[ ! -e "$dir/s2.sock" ] || fail "the refused daemon left its socket"
echo "ok: promtool clean, identities hold, port in use refused"
