#!/usr/bin/env bash
# Checks docker/ without a Docker engine (none is needed, nor started):
#   a. docker-compose parses docker/compose.yaml (`config -q`);
#   b. promtool accepts docker/prometheus/prometheus.yml, and parses every
#      PromQL expression of the Grafana dashboard (as recording rules);
#   c. the dashboard JSON parses, every panel has a title and queries, panel
#      ids are unique and panels do not overlap on the 24-column grid, and
#      every metric name its queries use is one a live shmallocd exports: the
#      daemon from <build-dir> is started on a heap and socket of its own with
#      --metrics 127.0.0.1:0, its port read from `shmallocctl stats --json`,
#      the build's examples/cache_workload run against it for half a second
#      (the shmalloc_cache_* families appear only once a cache is in the
#      heap), /metrics fetched with curl, the daemon stopped by its pid, and
#      /dev/shm checked for anything left behind.
# A missing docker-compose or promtool skips that step with a message; the
# rest still runs. Exit 0: all passed; 1: a check failed; 77: nothing failed
# but a step was skipped (ctest SKIP_RETURN_CODE).
#
# Usage: tests/docker/check_docker.sh <build-dir>
set -euo pipefail

build=$(cd "${1:?usage: check_docker.sh <build-dir>}" && pwd)
repo=$(cd "$(dirname "$0")/../.." && pwd)
compose=$repo/docker/compose.yaml
prometheus_yml=$repo/docker/prometheus/prometheus.yml
dashboard=$repo/docker/grafana/dashboards/shmalloc.json

failed=0
skipped=0
fail() { echo "check_docker: FAIL: $*" >&2; failed=1; }
skip() { echo "check_docker: SKIP: $*" >&2; skipped=1; }
pass() { echo "check_docker: ok: $*"; }

heap=shmalloc-test-docker-$$
tmp=$(mktemp -d /tmp/shmalloc-test-docker-XXXXXX)
daemon=
cleanup() {
  if [ -n "$daemon" ]; then
    kill -TERM "$daemon" 2>/dev/null || true
    wait "$daemon" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# ---- a. compose ----------------------------------------------------------
if command -v docker-compose >/dev/null; then
  if out=$(docker-compose -f "$compose" config -q 2>&1); then
    pass "docker-compose config -q: $compose"
  else
    fail "docker-compose config -q: $out"
  fi
elif docker compose version >/dev/null 2>&1; then
  if out=$(docker compose -f "$compose" config -q 2>&1); then
    pass "docker compose config -q: $compose"
  else
    fail "docker compose config -q: $out"
  fi
else
  skip "docker-compose is not installed (Debian: apt-get install docker-compose); compose.yaml not checked"
fi

# ---- c (parsing). the dashboard: JSON, titles, metric names --------------
# Prints the metric names its queries use, one a line, after checking the
# JSON parses, every panel has a title and every query panel an expression.
# Also writes every expression, with Grafana's variables filled in, as a
# Prometheus rules file ($tmp/rules.yml) for promtool to parse.
names=$(python3 - "$dashboard" "$tmp/rules.yml" <<'EOF'
import json, re, sys

path, rules_path = sys.argv[1], sys.argv[2]
try:
    d = json.load(open(path))
except (OSError, ValueError) as e:
    sys.exit(f"check_docker: FAIL: {path} does not parse: {e}")

problems, exprs = [], []

def walk(panels):
    for p in panels:
        where = f"panel {p.get('id', '?')} ({p.get('type', '?')})"
        if not str(p.get("title", "")).strip():
            problems.append(f"{where} has no title")
        if p.get("type") != "row":
            targets = p.get("targets") or []
            if not targets:
                problems.append(f"{where} '{p.get('title')}' has no query")
            for t in targets:
                if not str(t.get("expr", "")).strip():
                    problems.append(f"{where} '{p.get('title')}' has a target without expr")
                else:
                    exprs.append(t["expr"])
        walk(p.get("panels") or [])

walk(d.get("panels") or [])
if not d.get("panels"):
    problems.append("the dashboard has no panels")

# Layout: ids unique (nested panels of collapsed rows included), and the
# top-level panels inside the 24 columns and not overlapping one another.
ids = []
def collect_ids(panels):
    for p in panels:
        ids.append(p.get("id"))
        collect_ids(p.get("panels") or [])
collect_ids(d.get("panels") or [])
for i in sorted({i for i in ids if ids.count(i) > 1}, key=str):
    problems.append(f"panel id {i} is used {ids.count(i)} times")
boxes = []
for p in d.get("panels") or []:
    g = p.get("gridPos") or {}
    where = f"panel {p.get('id', '?')} '{p.get('title')}'"
    try:
        x, y, w, h = (int(g[k]) for k in ("x", "y", "w", "h"))
    except (KeyError, TypeError, ValueError):
        problems.append(f"{where} has no complete gridPos: {g}")
        continue
    if x < 0 or y < 0 or w < 1 or h < 1 or x + w > 24:
        problems.append(f"{where} is off the 24-column grid: {g}")
    for other, (ox, oy, ow, oh) in boxes:
        if x < ox + ow and ox < x + w and y < oy + oh and oy < y + h:
            problems.append(f"{where} overlaps {other}: {g}")
    boxes.append((where, (x, y, w, h)))
for v in d.get("templating", {}).get("list", []):
    if v.get("type") == "query":
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else str(q or "")
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", q)
        exprs.append(m.group(1) if m else q)
if problems:
    sys.exit("\n".join("check_docker: FAIL: " + p for p in problems))

# Grafana's variables, filled in so that promtool can parse the expressions.
def fill(e):
    e = re.sub(r"\$__(rate_)?interval|\$__range", "5m", e)
    return re.sub(r"\$\{?\w+\}?", "x", e)

with open(rules_path, "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        f.write(f"      - record: dashboard:expr_{i}\n        expr: {json.dumps(fill(e))}\n")

# Metric names: drop strings, label matchers {...}, ranges [...], the label
# lists of by/without/on/ignoring/group_left/group_right, then keep each
# identifier that is not a function call, keyword or number. Suffixes such as
# _bucket stay: they are compared with the exposed series names.
keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan", "atan2"}
names = set()
for e in exprs:
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", e)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word, rest = m.group(0), e[m.end():].lstrip()
        if word.lower() in keywords or rest.startswith("("):
            continue
        names.add(word)
if not names:
    sys.exit("check_docker: FAIL: no metric names found in the dashboard's queries")
print("\n".join(sorted(names)))
EOF
) || { echo "$names" >&2; failed=1; names=; }
if [ -n "$names" ]; then
  pass "dashboard parses, every panel has a title; it uses $(echo "$names" | wc -l) metric names"
fi

# ---- b. promtool ---------------------------------------------------------
if command -v promtool >/dev/null; then
  if out=$(promtool check config "$prometheus_yml" 2>&1); then
    pass "promtool check config: $prometheus_yml"
  else
    fail "promtool check config: $out"
  fi
  if [ -s "$tmp/rules.yml" ]; then
    if out=$(promtool check rules "$tmp/rules.yml" 2>&1); then
      pass "promtool parses every dashboard expression"
    else
      fail "a dashboard expression does not parse: $out"
    fi
  fi
else
  skip "promtool is not installed (Debian: apt-get install prometheus); prometheus.yml not checked"
fi

# ---- d. the Dockerfile's package lists -------------------------------------
# The build stage installs every -dev package of tools/setup-debian.sh (but
# clang's runtimes, which only tools/fuzz.sh links); the
# runtime stage installs the package of every shared library the built
# programs load (ldd, dpkg-query -S), but for libc6 and libgcc-s1 (in every Debian
# image) and the sanitizer runtimes of a sanitizer build.
if command -v dpkg-query >/dev/null && command -v ldd >/dev/null; then
  if out=$(python3 - "$repo" "$build" <<'EOF' 2>&1
import os, re, subprocess, sys

repo, build = sys.argv[1], sys.argv[2]
text = open(f"{repo}/docker/Dockerfile").read().replace("\\\n", " ")
stages = re.split(r"^FROM\s", text, flags=re.M)[1:]
def installs(stage):
    pkgs = set()
    for m in re.finditer(r"apt-get install ([^&\n]*)", stage):
        pkgs |= {w for w in m.group(1).split() if not w.startswith("-")}
    return pkgs
build_pkgs, runtime_pkgs = installs(stages[0]), installs(stages[-1])

setup = open(f"{repo}/tools/setup-debian.sh").read()
listed = set(re.search(r"packages=\(([^)]*)\)", setup).group(1).split())
problems = [f"docker/Dockerfile's build stage does not install {p} (tools/setup-debian.sh lists it)"
            for p in sorted(p for p in listed if p.endswith("-dev") and p not in build_pkgs
                            and not p.startswith("libclang-rt-"))]  # the fuzzers' runtime: tests only

def package_of(path):
    real = os.path.realpath(path)
    for candidate in (path, real, re.sub(r"^/usr", "", real), "/usr" + real):
        r = subprocess.run(["dpkg-query", "-S", candidate], capture_output=True, text=True)
        if r.returncode == 0:
            return r.stdout.split(":")[0]
    return None

needed = {}
for prog in ("service/shmallocd", "service/shmallocctl", "examples/span_workers", "examples/cache_workload",
             "examples/heap_demo"):
    out = subprocess.run(["ldd", f"{build}/{prog}"], capture_output=True, text=True, check=True).stdout
    for m in re.finditer(r"^\s*(\S+) => (/\S+)", out, flags=re.M):
        lib, path = m.groups()
        if re.match(r"lib(a|ub|t|l|hwa)san\.", lib):
            continue
        pkg = package_of(path)
        if pkg is None:
            problems.append(f"{prog} loads {path}, which no Debian package holds")
        elif pkg not in ("libc6", "libgcc-s1") and pkg not in runtime_pkgs:
            needed.setdefault(pkg, set()).add(f"{prog} ({lib})")
problems += [f"docker/Dockerfile's runtime stage does not install {p}, needed by {', '.join(sorted(w))}"
             for p, w in sorted(needed.items())]
if problems:
    sys.exit("\n".join(problems))
EOF
  ); then
    pass "the Dockerfile installs the build packages and every runtime library the programs load"
  else
    fail "$out"
  fi
else
  skip "dpkg-query or ldd is missing; the Dockerfile's package lists not checked"
fi

# ---- c (live). every name is exported by a running daemon ----------------
if [ -n "$names" ]; then
  "$build/service/shmallocd" --heap "$heap" --socket "$tmp/s.sock" --metrics 127.0.0.1:0 --log-level warn &
  daemon=$!
  up=
  for _ in $(seq 100); do
    if "$build/service/shmallocctl" ping --socket "$tmp/s.sock" >/dev/null 2>&1; then up=1; break; fi
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.05
  done
  port=
  if [ -z "$up" ]; then
    fail "shmallocd did not answer on $tmp/s.sock"
  else
    port=$("$build/service/shmallocctl" stats --json --socket "$tmp/s.sock" |
      python3 -c 'import json, sys; print(json.load(sys.stdin).get("metrics_port", 0))')
    [ "${port:-0}" != 0 ] || { fail "shmallocd reports no metrics port (metrics_port 0)"; port=; }
  fi
  # A cache in the heap, so that its shmalloc_cache_* families are exported:
  # the stack's cache-workload service runs the same program.
  if [ -n "$port" ]; then
    if "$build/examples/cache_workload" --socket "$tmp/s.sock" --seconds 0.5 --readers 1 >"$tmp/cache_workload.log" 2>&1; then
      pass "examples/cache_workload ran against it: $(grep -m1 'hit ratio' "$tmp/cache_workload.log" | sed 's/^ *//')"
    else
      fail "examples/cache_workload failed against shmallocd: $(tail -n 5 "$tmp/cache_workload.log")"
    fi
  fi
  if [ -n "$port" ]; then
    if ! curl -sSf --max-time 5 "http://127.0.0.1:$port/metrics" >"$tmp/metrics.txt"; then
      fail "cannot fetch http://127.0.0.1:$port/metrics"
    else
      # Every sample name in the exposition (histogram series keep their
      # _bucket/_sum/_count suffixes, as the queries use them), and every
      # family a "# TYPE" line declares with its series' names: a labelled
      # counter such as shmalloc_control_request_failures_total has no
      # sample until its first failure.
      exported=$( (grep -v '^#' "$tmp/metrics.txt" | sed -n 's/^\([A-Za-z_:][A-Za-z0-9_:]*\).*/\1/p'
                   awk '$1 == "#" && $2 == "TYPE" {
                          print $3
                          if ($4 == "histogram") print $3 "_bucket"
                          if ($4 == "histogram" || $4 == "summary") { print $3 "_sum"; print $3 "_count" }
                        }' "$tmp/metrics.txt") | sort -u)
      missing=$(comm -23 <(echo "$names" | sort -u) <(echo "$exported"))
      if [ -n "$missing" ]; then
        fail "the dashboard uses names the daemon does not export:$(printf ' %s' $missing)"
      else
        pass "every metric name of the dashboard is exported by shmallocd on :$port"
      fi
    fi
  fi
  kill -TERM "$daemon" 2>/dev/null || true
  wait "$daemon" 2>/dev/null || true
  daemon=
  [ ! -e "/dev/shm/$heap" ] || { fail "shmallocd left /dev/shm/$heap behind"; rm -f "/dev/shm/$heap"; }
fi

if [ "$failed" != 0 ]; then exit 1; fi
if [ "$skipped" != 0 ]; then
  echo "check_docker: every check that ran passed; some were skipped"
  exit 77
fi
echo "check_docker: all checks passed"
