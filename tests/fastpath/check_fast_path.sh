#!/usr/bin/env bash
# Guards the fast path: disassembles libshmalloc's allocation and free entry
# points from the optimised build and fails if any contains a call or a
# lock-prefixed instruction. Slow paths must stay out of line and be reached
# by a tail jump, so a regression shows here rather than in a benchmark.
set -euo pipefail
lib=$1
functions=(
  "shmalloc_alloc"
  "shmalloc_alloc_noscan"
  "shmalloc_free"
)
dump=$(objdump -d --no-show-raw-insn -C "$lib")
status=0
for f in "${functions[@]}"; do
  body=$(awk -v want="<$f>:" 'index($0, want) { on = 1; next } on && /^$/ { exit } on' <<<"$dump")
  if [ -z "$body" ]; then
    echo "check_fast_path: $f not found in $lib"
    status=1
    continue
  fi
  bad=$(grep -E '\scall|\slock\s' <<<"$body" || true)
  n=$(wc -l <<<"$body")
  if [ -n "$bad" ]; then
    echo "check_fast_path: $f ($n instructions) has a call or a lock prefix:"
    echo "$bad"
    status=1
  else
    echo "check_fast_path: $f: $n instructions, no call, no lock prefix"
  fi
done
exit $status
