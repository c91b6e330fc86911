#!/bin/sh
# The example workload as a long-running container: runs span_workers
# (examples/span_workers.cpp: WORKERS client processes that refill spans,
# allocate, check and free objects, plus one killed with SIGKILL while
# holding spans) against the daemon every INTERVAL seconds, so the
# dashboard has traffic, reclaims and frees to show. A failed round (the
# daemon restarting, say) is reported and the loop goes on.
set -u
socket=${SHMALLOC_SOCKET:-/run/shmalloc/shmallocd.sock}
workers=${WORKERS:-4}
interval=${INTERVAL:-5}
trap 'exit 0' TERM INT
while :; do
  /usr/local/libexec/shmalloc/span_workers "$socket" "$workers" ||
    echo "span-workers-loop: round failed (exit $?); retrying in ${interval}s" >&2
  sleep "$interval" &
  wait $!
done
