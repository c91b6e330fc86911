#!/usr/bin/env bash
# tools/fuzz.sh [seconds-per-target]: builds the fuzz targets of tests/fuzz
# with clang as libFuzzer binaries under ASan+UBSan (build-fuzz, or
# $SHMALLOC_FUZZ_BUILD), runs each for that long (default 30) on a temporary
# copy of its seed corpus (the repository's is never written), and fails on
# any finding: a crash, a sanitizer report, a leak, a timeout or running out
# of memory. Prints per target the inputs run, inputs per second, coverage
# (cov: edges, ft: features) and the corpus before and after. A finding's
# input is kept in build-fuzz/findings/ to replay with `build-fuzz/tests/<target> FILE`.
# Needs clang and libclang-rt-14-dev (tools/setup-debian.sh).
set -euo pipefail

seconds=${1:-30}
root=$(cd "$(dirname "$0")/.." && pwd)
build=${SHMALLOC_FUZZ_BUILD:-$root/build-fuzz}
targets=(frame_fuzz decode_fuzz config_fuzz)

work=$(mktemp -d /tmp/shmalloc-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
started=$(date +%s)
echo "fuzz: building ${targets[*]} in $build (clang, libFuzzer, ASan+UBSan)"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
  -DSHMALLOC_FUZZ=ON -DSHMALLOC_SANITIZE=address,undefined >"$work/configure.log" 2>&1 ||
  { cat "$work/configure.log"; exit 1; }
cmake --build "$build" --target "${targets[@]}"
built=$(date +%s)

rm -rf "$build/findings"  # a previous run's
shm_before=$(ls /dev/shm | grep '^shmalloc-test-fuzz-' || true)
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

failed=()
printf '%-12s %8s %12s %9s %7s %7s %12s %s\n' target seconds execs execs/s cov ft corpus findings
for t in "${targets[@]}"; do
  corpus="$work/corpus-$t"
  mkdir -p "$corpus" "$work/artifacts"
  cp "$root/tests/fuzz/corpus/$t/"* "$corpus/"
  before=$(ls "$corpus" | wc -l)
  rc=0
  # The seeds as this build writes them join the copy (SHMALLOC_FUZZ_WRITE_SEEDS).
  SHMALLOC_FUZZ_WRITE_SEEDS="$corpus" "$build/tests/$t" "$corpus" -dict="$root/tests/fuzz/$t.dict" -max_total_time="$seconds" \
    -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="$work/artifacts/$t-" \
    >"$work/$t.log" 2>&1 || rc=$?
  after=$(ls "$corpus" | wc -l)
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$work/$t.log" | tail -1 || true)
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t.log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/$t.log")
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$done_line")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$done_line")
  findings=$(ls "$work/artifacts" | grep -c "^$t-" || true)
  printf '%-12s %8s %12s %9s %7s %7s %12s %s\n' "$t" "$seconds" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" \
    "$before->$after" "$findings"
  if [ "$rc" -ne 0 ] || [ "$findings" -ne 0 ] || [ -z "$done_line" ]; then
    failed+=("$t")
    mkdir -p "$build/findings"
    cp "$work/artifacts/$t-"* "$build/findings/" 2>/dev/null || true
    cp "$work/$t.log" "$build/findings/$t.log"
    echo "fuzz: $t failed (exit $rc, $findings findings); its log: $build/findings/$t.log" >&2
    grep -E 'ERROR|SUMMARY|runtime error|_fuzz: |Test unit written' "$work/$t.log" | head -20 >&2 || true
  fi
done

# Each target unlinks its heap as soon as it made it: nothing may be left.
shm_after=$(ls /dev/shm | grep '^shmalloc-test-fuzz-' || true)
left=$(comm -13 <(echo "$shm_before") <(echo "$shm_after") | grep . || true)
if [ -n "$left" ]; then
  echo "fuzz: left in /dev/shm: $left" >&2
  failed+=("/dev/shm")
fi
echo "fuzz: build $((built - started)) s, runs $(($(date +%s) - built)) s"
if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: no finding in ${targets[*]}"
