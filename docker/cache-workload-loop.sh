#!/bin/sh
# The shared cache as a long-running container: runs cache_workload
# (examples/cache_workload.cpp: READERS reader processes reading the cache
# "demo" zero-copy with Zipf-distributed keys and filling misses, a writer
# refreshing entries, some with a TTL, and a writer of large values killed
# with SIGKILL mid-put; every value read is checked, and the cache after the
# kill) against the daemon for ROUND_SECONDS, then again after INTERVAL
# seconds, forever. The cache lives in the daemon's heap, so it and its
# counters outlast each round, and the dashboard's "Shared caches" row shows
# its hits, misses, evictions and expirations. Each round prints its result
# (throughput, hit ratio, values checked, the cache's check) to the log. A
# failed round (the daemon away, say) is reported and the loop goes on after
# RETRY seconds.
set -u
socket=${SHMALLOC_SOCKET:-/run/shmalloc/shmallocd.sock}
round=${ROUND_SECONDS:-20}
readers=${READERS:-3}
keys=${KEYS:-20000}
budget=${BUDGET_MIB:-8}
interval=${INTERVAL:-1}
retry=${RETRY:-5}
# A round runs in the background so that a SIGTERM (docker stop) is acted on
# at once, not when the round ends: the round is stopped too, and its worker
# processes go with the container's pid namespace.
pid=
trap '[ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null; exit 0' TERM INT
while :; do
  /usr/local/libexec/shmalloc/cache_workload --socket "$socket" --seconds "$round" --readers "$readers" \
    --keys "$keys" --budget-mib "$budget" &
  pid=$!
  pause=$interval
  wait "$pid" || { echo "cache-workload-loop: round failed (exit $?); retrying in ${retry}s" >&2; pause=$retry; }
  pid=
  sleep "$pause" &
  wait $!
done
