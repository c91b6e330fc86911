#!/usr/bin/env bash
# Builds the benchmarks with the project, runs every case for shmalloc and
# for each anchor allocator in the same run (9 interleaved rounds of 2
# repetitions), and writes docs/benchmarks.md (medians, min, max, ratios,
# the machine) and docs/benchmarks.png (ns per operation, log scale).
#
# Every case of the performance issue; case 9 only with case 7's gigabyte live.
set -euo pipefail
cd "$(dirname "$0")/.."
packages=(libjemalloc-dev libgoogle-perftools-dev libmimalloc-dev gnuplot-nox)
missing=()
for p in "${packages[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
build=build-bench
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHMALLOC_BENCH=ON -DSHMALLOC_BUILD_TESTS=OFF >/dev/null
cmake --build "$build" >/dev/null

work=$(mktemp -d /tmp/shmalloc-bench-XXXXXX)
heap=shmalloc-bench-$$
"$build/service/shmallocd" --heap "$heap" --socket "$work/d.sock" --metrics off --log-level warn &
daemon=$!
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 100); do "$build/service/shmallocctl" ping --socket "$work/d.sock" >/dev/null 2>&1 && break; sleep 0.05; done

allocators=(glibc jemalloc tcmalloc mimalloc boostipc shmalloc)
# Nine rounds of one process per allocator, two repetitions each: on these
# VMs a whole process runs fast or slow (all allocators alike, by up to
# 1.9x, for a reason these VMs, without performance counters, do not show),
# so many short processes give steadier medians than a few long ones.
for round in 1 2 3 4 5 6 7 8 9; do
  for a in "${allocators[@]}"; do
    SHMALLOC_SOCKET=$work/d.sock "$build/bench/bench_$a" 2 -8. >>"$work/raw.csv" 2>>"$work/providers.txt"
  done
done

# Case 8 with the daemon and the echo process pinned to CPU 0, the client on
# CPU 0 (same CPU) or CPU 1 (across CPUs): a round trip to a peer on another
# CPU costs more than one on the caller's own, so both peers are placed alike
# (left to the scheduler, the forked echo tends to share the client's CPU and
# the daemon not, and the comparison measures the placement).
taskset -a -cp 0 "$daemon" >/dev/null
placements=("on the same CPU:0")
[ "$(nproc)" -ge 2 ] && placements+=("across CPUs:1")
for round in 1 2 3 4 5 6 7 8 9; do
  for p in "${placements[@]}"; do
    SHMALLOC_SOCKET=$work/d.sock SHMALLOC_BENCH_PLACEMENT="${p%%:*}" SHMALLOC_BENCH_ECHO_CPUS=0 \
      taskset -c "${p##*:}" "$build/bench/bench_shmalloc" 2 8. >>"$work/raw.csv" 2>/dev/null
  done
done

# Median, min and max per case and allocator; ratios of shmalloc to each.
sort -t, -k1,1 -k2,2 -k3,3g "$work/raw.csv" | awk -F, '
  { key = $1 "," $2; v[key, ++n[key]] = $3; if (!(key in seen)) { seen[key] = 1; order[++k] = key } }
  END {
    for (i = 1; i <= k; i++) {
      key = order[i]; c = n[key]
      med = (c % 2) ? v[key, (c + 1) / 2] : (v[key, c / 2] + v[key, c / 2 + 1]) / 2
      printf "%s,%.2f,%.2f,%.2f\n", key, med, v[key, 1], v[key, c]
    }
  }' >"$work/summary.csv"

out=docs/benchmarks.md
{
  echo "# Benchmarks"
  echo
  echo "Made by \`bench/run.sh\` on $(date -u +%Y-%m-%d): $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')), $(. /etc/os-release; echo "$PRETTY_NAME"), $(g++ --version | head -1)."
  echo "Each allocator is linked into its own binary; each binary checks at run time which library serves malloc:"
  echo
  sed 's/^/- /' "$work/providers.txt" | sort -u
  echo
  echo "Nine interleaved rounds of one process per allocator, two repetitions each (cases 7 and 9: one): the median"
  echo "of the 18 (9), with min and max. On these VMs a whole process runs fast or slow, every allocator alike (by up"
  echo "to 1.9 x), so the rounds are many and short. Nanoseconds per"
  echo "alloc+free pair (case 10: per pop+push). Lower is better. These 2-CPU VMs are noisy: compare ratios within"
  echo "this run, and read min..max as the noise."
  echo
  echo "Cases 5 and 6: shmalloc and Boost.Interprocess share one heap between two processes; the"
  echo "process-private allocators run two processes with a heap each (case 5, the no-sharing ideal) or two"
  echo "threads of one process (case 6, cross-thread free)."
  echo
  echo "| case | glibc | jemalloc | TCMalloc | mimalloc | Boost.Interprocess | shmalloc | shmalloc / mimalloc | shmalloc / glibc | Boost.Interprocess / shmalloc |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  awk -F, '
    { med[$1, $2] = $3; lo[$1, $2] = $4; hi[$1, $2] = $5; if (!($1 in seen)) { seen[$1] = 1; cases[++k] = $1 } }
    function ratio(c, a, b) { return (((c, a) in med) && ((c, b) in med) && med[c, b] > 0) ? sprintf("%.2f", med[c, a] / med[c, b]) : "–" }
    END {
      split("glibc jemalloc tcmalloc mimalloc boost.interprocess shmalloc", al, " ")
      for (i = 1; i <= k; i++) {
        c = cases[i]; line = "| " c " |"
        for (j = 1; j <= 6; j++)
          line = line (((c, al[j]) in med) ? sprintf(" %.1f (%.1f..%.1f) |", med[c, al[j]], lo[c, al[j]], hi[c, al[j]]) : " – |")
        line = line " " ratio(c, "shmalloc", "mimalloc") " | " ratio(c, "shmalloc", "glibc") " | " ratio(c, "boost.interprocess", "shmalloc") " |"
        print line
      }
    }' "$work/summary.csv" | sort -t'|' -k2,2n
  echo
  echo "## Targets"
  echo
  echo "| case | target | this run | verdict |"
  echo "|---|---|---|---|"
  awk -F, '
    { med[$1, $2] = $3 }
    END {
      verdict("1. pairs 64 B", "mimalloc", 1.5)
      verdict("2. mixed batch", "mimalloc", 1.5)
      verdict("3. large 64 KiB", "glibc", 2)
      verdict("3. large 256 KiB", "glibc", 2)
      verdict("3. large 1 MiB", "glibc", 2)
      verdict("5. two processes mixed", "mimalloc", 2)
      verdict("6. cross-process free", "mimalloc", 1)
      verdict("7. heap growth 1 GiB in 64 B", "glibc", 2)
      round_trip("on the same CPU")
      round_trip("across CPUs")
      r = med["9. committed / live after case 7", "shmalloc"]
      printf "| 9. committed / live, 1 GiB live | at most 1.25 | %.3f | %s |\n", r, r <= 1.25 ? "met" : "**missed**"
      r = med["9. committed / live at case 2 steady state", "shmalloc"]
      printf "| 9. committed / live, case 2 steady state | at most 1.25 | %.2f (floor %.2f) | %s |\n", r, med["9. span floor at case 2 steady state", "shmalloc"], r <= 1.25 ? "met" : "**missed**"
    }
    function round_trip(where,   refill, raw, r) {
      refill = "8. refill round trip " where " (us)"; raw = "8. raw socket round trip " where " (us)"
      if (!((refill, "shmalloc") in med)) return
      r = med[refill, "shmalloc"] / med[raw, "shmalloc"]
      printf "| 8. refill round trip %s | at most 1.2 x a raw Unix-socket round trip | %.2f x | %s |\n", where, r, r <= 1.2 ? "met" : "**missed**"
    }
    function verdict(c, anchor, limit,   r) {
      r = med[c, "shmalloc"] / med[c, anchor]
      printf "| %s | at most %.1f x %s | %.2f x | %s |\n", c, limit, anchor, r, r <= limit ? "met" : "**missed**"
    }' "$work/summary.csv"
  echo
  echo "Case 7 counts the control round trips it made (row \"7. control round trips\"). Case 9 is the heap's committed"
  echo "bytes (heap and metadata) over the live bytes while case 7's gigabyte is live. At case 2's steady state"
  echo "(1,000 objects, about 230 KB, live) it is the bytes of the spans in use over the live bytes, since the heap"
  echo "keeps what case 7 committed until the scavenger returns it. Boost.Interprocess's figure is its segment's"
  echo "used bytes over the live bytes in both."
  echo
  echo "Case 8 alternates one refill round trip and one raw round trip (a forked echo process), 2,000 times, and"
  echo "takes the median of each. The daemon and the echo are pinned to CPU 0, the client to CPU 0 (on the same"
  echo "CPU) or CPU 1 (across CPUs). On these VMs waking a peer on an idle CPU costs about 20 us, far more than"
  echo "one on the caller's own, and left to the scheduler the forked echo tended to share the client's CPU while"
  echo "the daemon did not: the comparison then measured where the scheduler put them. The daemon's own handling"
  echo "of a refill is about 0.85 us (timed inside it). Each connection has its own thread in the daemon, which"
  echo "makes two system calls per request (recv, send), as the echo does."
  echo
  echo "Why case 9 misses at case 2's steady state: objects of different size classes never share a span (Go's"
  echo "design, which ours follows), and case 2's 1,000 objects (about 230 KB) spread over all 32 classes up to"
  echo "1 KiB. The row \"9. span floor\" is the least any design with one size class per span can reach for this"
  echo "plan, computed in the same run from the size-class table: each class's objects in as few whole spans as"
  echo "hold them. The measurement adds to that floor what the process keeps for speed: the unused part of each"
  echo "class's current span, spares, and the rest of a refill batch in the process pool. What earlier cases left"
  echo "in the caches goes back to the daemon once it has sat unused for 500 ms (\`SHMALLOC_CACHE_DECAY_MS\`),"
  echo "checked on the client's slow path; case 9 measures after two seconds of case 2, so past that decay."
  echo
  echo "What holds case 2 near 1.5 x mimalloc (profiled with perf's cpu-clock, 2026-11-27): the free takes about"
  echo "40% of shmalloc's time (the span found through the page map, the object's bit cleared in the span's bitmap"
  echo "in shared memory, the free counted in the thread's stats block), the allocation about 20%, the benchmark's"
  echo "own loop about 15%, the slow path about 12%. Go's spans are 8 KiB for every class up to 1 KiB, so a 1 KiB"
  echo "class holds 8 objects to a span where mimalloc's 64 KiB pages hold 64: the 1,000 objects make about 50"
  echo "slow-path entries a round (a new bitmap word, or a switch to a spare span), against about 35 for the least"
  echo "any bitmap of 64-bit words with these spans could make. Counting each allocation and free in shared memory"
  echo "costs about 0.35 ns a pair; it is what keeps the counters exact when a client crashes, and it stays."
  echo
  echo "![ns per operation by case and allocator](benchmarks.png)"
} >"$out"

# The plot: one cluster of bars per case.
awk -F, '{ med[$1, $2] = $3; if (!($1 in seen)) { seen[$1] = 1; cases[++k] = $1 } }
  END { for (i = 1; i <= k; i++) { c = cases[i]; printf "\"%s\" %s %s %s %s %s %s\n", c, med[c,"glibc"], med[c,"jemalloc"], med[c,"tcmalloc"], med[c,"mimalloc"], med[c,"boost.interprocess"], med[c,"shmalloc"] } }' \
  "$work/summary.csv" | sort -t'"' -k2,2n >"$work/plot.dat"
gnuplot <<GP
set terminal pngcairo size 1100,520 noenhanced
set output "docs/benchmarks.png"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set logscale y
set ylabel "ns per operation (log scale)"
set xtics rotate by -20
set key top left
plot "$work/plot.dat" using 2:xtic(1) title "glibc", '' using 3 title "jemalloc", '' using 4 title "TCMalloc", '' using 5 title "mimalloc", '' using 6 title "Boost.Interprocess", '' using 7 title "shmalloc"
GP
echo "bench/run.sh: wrote $out and docs/benchmarks.png"
