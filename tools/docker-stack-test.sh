#!/usr/bin/env bash
# End-to-end test of docker/: builds the images and runs the compose stack
# (shmallocd, the three example workers and Prometheus; not Grafana, whose
# image cannot be built from Debian packages) under a project name of its
# own, then checks:
#   a. the workers, each in its own container, allocate from the daemon's
#      heap: same /dev/shm object, mapped by their processes, listed by
#      `shmallocctl clients` with spans and live objects, mallocs counted;
#   b. a worker container killed with SIGKILL has its spans taken back:
#      its clients leave the list, the daemon logs spans taken back for each
#      of them, reclaimed bytes grow; it is started again;
#   c. the stack's Prometheus scrapes the daemon: /api/v1/targets shows the
#      shmallocd target up, and shmalloc_heap_inuse_bytes has data;
#   g. the shared cache is the workload of a container of its own
#      (cache-workload) on the daemon's heap: the same /dev/shm object,
#      mapped by its processes, which `shmallocctl clients` lists;
#      `shmallocctl caches --json` in the daemon's container shows the cache
#      "demo" with items and hits; a round of cache_workload completes with
#      every value read right and the cache consistent after its writer was
#      killed; the stack's Prometheus has shmalloc_cache_hits_total for it,
#      and every query of the dashboard's "Shared caches" row returns data;
#   d. the daemon restarts, twice: killed with SIGKILL from the host (a
#      crash; Docker's restart policy brings it back) and `compose restart`
#      (SIGTERM; compose runs it with --keep-heap). Each time the new daemon
#      adopts the heap (its checker passes), the workers' clients are listed
#      again, no worker process died or restarted, and allocation goes on.
#      Then alloc-churn stops and the daemon is killed and started once more:
#      the heap checker passes on what it left;
#   e. every container of the shmalloc image runs as uid/gid 10001 with no
#      capability and no-new-privileges, a read-only root filesystem where
#      compose.yaml says read_only; the daemon is on the internal network
#      only, the workers on none; Prometheus is published on 127.0.0.1 only;
#   f. `compose down -v` leaves no container, volume or network of the
#      project.
#
# Docker: uses the running engine, or starts dockerd (as root) and stops
# that one, by its pid, at the end. Nothing is pulled: the base image
# (debian:12) is made with debootstrap from the mirror apt uses, once; the
# root filesystem is cached as a tarball (SHMALLOC_DOCKER_CACHE, default
# /var/cache/shmalloc-docker) and the image stays in the engine. Images:
# shmalloc:local from docker/Dockerfile (the context from
# docker/build-context.py, so the classic builder gets the same context as
# BuildKit), tagged shmalloc:test-<pid> for this run's stack; and
# shmalloc-prometheus:local from docker/prometheus/Dockerfile.
#
# Exit: 0 every check passed; 1 a check failed (or the set-up did); 77 no
# Docker engine could be reached or started (ctest SKIP_RETURN_CODE).
#
# Settings (environment):
#   SHMALLOC_DOCKER_SOURCE  worktree (default): the working tree as it is;
#                           or a git revision (HEAD, ...): its committed files
#   SHMALLOC_DOCKER_CHECKS  the checks to run, space-separated (default all:
#                           clients reclaim prometheus cache security restart
#                           down; a, b, c, g, e, d, f above: the restarts come last
#                           but for down, as a failed one leaves the daemon
#                           down)
#   SHMALLOC_DOCKER_CACHE   where the debootstrap tarball is kept
#   SHMALLOC_DEBIAN_MIRROR  the mirror debootstrap uses (default: apt's)
#   SHMALLOC_DOCKER_KEEP=1  leave the stack up at the end (to look around;
#                           `docker-compose -p <project> -f docker/compose.yaml down -v`)
#
# Usage: tools/docker-stack-test.sh   (from anywhere; as root to start dockerd)
set -uo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
compose_file=$repo/docker/compose.yaml
project=shmalloc-test-$$
debian_image=debian:12
image=shmalloc:local
run_image=shmalloc:test-$$
prometheus_image=shmalloc-prometheus:local
cache_dir=${SHMALLOC_DOCKER_CACHE:-/var/cache/shmalloc-docker}
source_rev=${SHMALLOC_DOCKER_SOURCE:-worktree}
checks=${SHMALLOC_DOCKER_CHECKS:-clients reclaim prometheus cache security restart down}
tmp=$(mktemp -d /tmp/shmalloc-docker-stack-XXXXXX)
started=$(date +%s)

say() { printf '[%4ds] %s\n' "$(($(date +%s) - started))" "$*"; }
results=()
failures=0
pass() { results+=("PASS  $1"); say "PASS: $1"; }
fail() { results+=("FAIL  $1"); say "FAIL: $1"; failures=$((failures + 1)); }
# A set-up step failed: nothing to check.
abort() { say "ERROR: $*"; exit 1; }
skip_all() { say "SKIP: $*"; exit 77; }

# Polls a command (a shell function or program) until it succeeds, for up to
# $1 seconds, every $2 seconds.
wait_for() {
  local limit=$1 every=$2 t0
  shift 2
  t0=$(date +%s)
  while ! "$@"; do
    [ $(($(date +%s) - t0)) -ge "$limit" ] && return 1
    sleep "$every"
  done
}

# JSON from stdin: prints the value of a Python expression over d.
json() { python3 -c 'import json, sys; d = json.load(sys.stdin); r = eval(sys.argv[1]); print(json.dumps(r) if isinstance(r, (dict, list)) else r)' "$1"; }

# ---- cleanup ----------------------------------------------------------------
dockerd_pid=
stack_up=0
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$stack_up" = 1 ]; then
    if [ "${SHMALLOC_DOCKER_KEEP:-0}" = 1 ]; then
      say "SHMALLOC_DOCKER_KEEP=1: the stack stays up as project $project (SHMALLOC_IMAGE=$run_image)"
    else
      say "cleanup: down -v (project $project)"
      compose down -v --remove-orphans --timeout 10 >"$tmp/down-cleanup.log" 2>&1 ||
        { say "cleanup: down failed:"; tail -n 20 "$tmp/down-cleanup.log"; }
    fi
  fi
  if [ -n "$dockerd_pid" ] && [ "${SHMALLOC_DOCKER_KEEP:-0}" = 1 ] && [ "$stack_up" = 1 ]; then
    say "SHMALLOC_DOCKER_KEEP=1: the dockerd this test started stays up too (pid $dockerd_pid)"
  elif [ -n "$dockerd_pid" ]; then
    docker image rm "$run_image" >/dev/null 2>&1
    say "cleanup: stopping the dockerd this test started (pid $dockerd_pid)"
    kill -TERM "$dockerd_pid" 2>/dev/null
    local n=0
    while kill -0 "$dockerd_pid" 2>/dev/null && [ $n -lt 60 ]; do sleep 0.5; n=$((n + 1)); done
    kill -0 "$dockerd_pid" 2>/dev/null && { say "cleanup: dockerd still up after 30 s; SIGKILL"; kill -KILL "$dockerd_pid"; }
    wait "$dockerd_pid" 2>/dev/null
  elif [ "${SHMALLOC_DOCKER_KEEP:-0}" != 1 ]; then
    docker image rm "$run_image" >/dev/null 2>&1
  fi
  rm -rf "$tmp"
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 1' INT TERM

# ---- the engine ---------------------------------------------------------------
command -v docker >/dev/null || skip_all "no docker command (Debian: apt-get install docker.io)"
engine_up() { docker info >/dev/null 2>&1; }
if engine_up; then
  say "using the running Docker engine ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
else
  command -v dockerd >/dev/null || skip_all "no Docker engine runs and there is no dockerd to start (apt-get install docker.io)"
  [ "$(id -u)" = 0 ] || skip_all "no Docker engine runs, and starting dockerd needs root"
  [ -S /var/run/docker.sock ] && say "note: /var/run/docker.sock exists but no engine answers on it"
  say "starting dockerd (log: $tmp/dockerd.log)"
  # A session of its own: a Ctrl-C of this script must not stop it before the
  # cleanup has run compose down. (setsid does not fork here: a background
  # job of a script is no process group leader, so $! is dockerd's pid.)
  setsid dockerd >"$tmp/dockerd.log" 2>&1 </dev/null &
  dockerd_pid=$!
  if ! wait_for 60 0.5 engine_up; then
    tail -n 20 "$tmp/dockerd.log" >&2
    if kill -0 "$dockerd_pid" 2>/dev/null; then
      kill -TERM "$dockerd_pid"
      wait "$dockerd_pid" 2>/dev/null
    fi
    dockerd_pid=
    skip_all "dockerd did not come up within 60 s (its log above)"
  fi
  say "dockerd is up (pid $dockerd_pid, $(docker info -f '{{.Driver}}, cgroup v{{.CgroupVersion}}' 2>/dev/null))"
fi

# Compose v2 (the docker plugin) if there is one, else Debian 12's docker-compose 1.29.
if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null; then
  compose_cmd=(docker-compose)
else
  abort "neither 'docker compose' nor docker-compose is installed (Debian: apt-get install docker-compose)"
fi
compose() { "${compose_cmd[@]}" -f "$compose_file" -p "$project" "$@"; }
say "compose: ${compose_cmd[*]} ($("${compose_cmd[@]}" version --short 2>/dev/null || echo '?'))"
command -v python3 >/dev/null || abort "python3 is needed (docker-compose depends on it)"
command -v curl >/dev/null || abort "curl is needed (apt-get install curl)"

# ---- the base image -------------------------------------------------------------
# The mirror apt already uses for bookworm (one-line or deb822 sources), or
# for bookworm-security with suite "security".
apt_mirror() {
  python3 - "$1" <<'EOF'
import glob, re, sys
want = sys.argv[1]
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*")):
    try:
        text = open(path).read()
    except OSError:
        continue
    if path.endswith(".sources"):
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if "deb" in fields.get("Types", "").split() and want in fields.get("Suites", "").split():
                print(fields.get("URIs", "").split()[0]); sys.exit()
    else:
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == want:
                print(words[1]); sys.exit()
EOF
}

make_base_image() {
  local tarball=$cache_dir/debian-12-minbase.tar.gz
  mkdir -p "$cache_dir" || abort "cannot make $cache_dir"
  exec 8>"$cache_dir/.lock"
  flock 8  # another run may be making it
  if docker image inspect "$debian_image" >/dev/null 2>&1; then
    exec 8>&-
    return 0
  fi
  if [ ! -s "$tarball" ]; then
    command -v debootstrap >/dev/null ||
      abort "no $debian_image image and no debootstrap to make one (apt-get install debootstrap)"
    local mirror=${SHMALLOC_DEBIAN_MIRROR:-$(apt_mirror bookworm)}
    local security
    security=$(apt_mirror bookworm-security)
    mirror=${mirror:-http://deb.debian.org/debian}
    local root
    root=$(mktemp -d "$cache_dir/rootfs.XXXXXX")
    say "making $debian_image: debootstrap --variant=minbase bookworm from $mirror (a minute or two; log $tmp/debootstrap.log)"
    if ! debootstrap --variant=minbase bookworm "$root" "$mirror" >"$tmp/debootstrap.log" 2>&1; then
      tail -n 20 "$tmp/debootstrap.log"
      rm -rf "$root"
      abort "debootstrap failed"
    fi
    {
      echo "deb $mirror bookworm main"
      echo "deb $mirror bookworm-updates main"
      [ -n "$security" ] && echo "deb $security bookworm-security main"
    } >"$root/etc/apt/sources.list"
    # As Docker's own Debian images: no service starts at package install,
    # no .deb kept after it, and an empty apt cache.
    printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 0755 "$root/usr/sbin/policy-rc.d"
    printf 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\nAPT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };\nDir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";\n' \
      >"$root/etc/apt/apt.conf.d/docker-clean"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | gzip -1 >"$tarball.part" && mv "$tarball.part" "$tarball"
    rm -rf "$root"
    [ -s "$tarball" ] || abort "could not write $tarball"
  fi
  say "importing $tarball as $debian_image"
  docker import -c 'CMD ["bash"]' "$tarball" "$debian_image" >/dev/null || abort "docker import failed"
  exec 8>&-
}

# ---- the images --------------------------------------------------------------------
build_images() {
  # BuildKit through buildx if the CLI has it, else the classic builder; the
  # context on stdin is the same for both (docker/build-context.py).
  local builder=classic
  if docker buildx version >/dev/null 2>&1; then
    export DOCKER_BUILDKIT=1
    builder=BuildKit
  else
    export DOCKER_BUILDKIT=0
  fi
  local context_args=() revision
  if [ "$source_rev" = worktree ]; then
    revision=$(git -C "$repo" describe --always --abbrev=12 2>/dev/null || echo unknown)
    say "building $image from the working tree ($revision; $builder builder; log $tmp/build-shmalloc.log)"
  else
    git -C "$repo" rev-parse --verify -q "$source_rev^{commit}" >/dev/null || abort "SHMALLOC_DOCKER_SOURCE=$source_rev: no such revision"
    context_args=(--rev "$source_rev")
    revision=$(git -C "$repo" describe --always --abbrev=12 "$source_rev")
    say "building $image from revision $source_rev ($revision; $builder builder; log $tmp/build-shmalloc.log)"
  fi
  local t0
  t0=$(date +%s)
  if ! python3 "$repo/docker/build-context.py" "${context_args[@]}" |
    docker build -f docker/Dockerfile --build-arg DEBIAN_IMAGE="$debian_image" \
      --build-arg SHMALLOC_REVISION="$revision" -t "$image" -t "$run_image" - >"$tmp/build-shmalloc.log" 2>&1; then
    tail -n 40 "$tmp/build-shmalloc.log"
    abort "docker build of $image failed"
  fi
  say "built $image in $(($(date +%s) - t0)) s"
  t0=$(date +%s)
  if ! docker build --build-arg DEBIAN_IMAGE="$debian_image" -t "$prometheus_image" "$repo/docker/prometheus" \
    >"$tmp/build-prometheus.log" 2>&1; then
    tail -n 40 "$tmp/build-prometheus.log"
    abort "docker build of $prometheus_image failed"
  fi
  say "built $prometheus_image in $(($(date +%s) - t0)) s"
}

# ---- the stack -----------------------------------------------------------------------
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# The services the test runs: every service but Grafana.
services=(shmallocd span-workers alloc-churn cache-workload prometheus)

container_of() { compose ps -q "$1" 2>/dev/null | head -n 1; }
inspect() { docker inspect -f "$2" "$1" 2>/dev/null; }
ctl() { docker exec "$daemon" shmallocctl "$@"; }
healthy() { [ "$(inspect "$daemon" '{{.State.Health.Status}}')" = healthy ]; }

start_stack() {
  export SHMALLOC_IMAGE=$run_image PROMETHEUS_IMAGE=$prometheus_image
  PROMETHEUS_PORT=$(free_port)
  export PROMETHEUS_PORT
  say "compose up -d ${services[*]} (project $project, Prometheus on 127.0.0.1:$PROMETHEUS_PORT)"
  stack_up=1
  if ! compose up -d --no-build "${services[@]}" >"$tmp/up.log" 2>&1; then
    cat "$tmp/up.log"
    compose logs --no-color --tail 30 >&2
    abort "compose up failed"
  fi
  daemon=$(container_of shmallocd)
  span_workers=$(container_of span-workers)
  churn=$(container_of alloc-churn)
  cache_workers=$(container_of cache-workload)
  prometheus=$(container_of prometheus)
  [ -n "$daemon" ] && [ -n "$span_workers" ] && [ -n "$churn" ] && [ -n "$cache_workers" ] && [ -n "$prometheus" ] ||
    abort "a service has no container: $(compose ps)"
  wait_for 60 1 healthy || abort "shmallocd is not healthy after 60 s: $(docker logs --tail 20 "$daemon" 2>&1)"
  say "stack up and shmallocd healthy ($(inspect "$daemon" '{{.Name}}'))"
}

# ---- checks ---------------------------------------------------------------------------
# Each check is a function check_<name> that calls pass or fail (as often as
# it has things to say) and leaves the stack running as it found it; the list
# to run is $checks. A new check is a function and a word in that list (before
# restart, which may leave the daemon down, and down). A new workload (as
# the shared cache's, cache-workload) is a service in compose.yaml, its name
# in $services, its container looked up in start_stack, and a check_<name>
# of its own (and a place in check_security).

# The clients the daemon lists, as JSON (an empty list if it does not answer).
clients_json() { ctl clients --json 2>/dev/null || echo '{"clients": []}'; }
stat_of() { ctl stats --json 2>/dev/null | json "d['$1']"; }
# The ids of connected clients named $1, space-separated.
client_ids() { clients_json | json "' '.join(str(c['id']) for c in d['clients'] if c['name'] == '$1')"; }
# Both alloc-churn processes connected and holding spans.
churn_listed() {
  [ "$(clients_json | json "sum(1 for c in d['clients'] if c['name'] == 'alloc-churn' and c['spans_held'] > 0)")" -ge 2 ]
}

check_clients() {
  if ! wait_for 30 1 churn_listed; then
    fail "a: alloc-churn's two processes are not listed with spans by shmallocctl clients: $(ctl clients 2>&1)"
    return
  fi
  local listing
  listing=$(clients_json | json "'; '.join('%s id %d pid %s (%s in its container %s): %d spans, %d objects live, %d bytes' % (c['name'], c['id'], c['pid'], c.get('pid_in_client'), c.get('container'), c['spans_held'], c['objects_live'], c['bytes_held']) for c in d['clients'])")
  pass "a: shmallocctl clients in the daemon's container lists the workers: $listing"

  # The same heap object: the daemon's /dev/shm/shmalloc and the worker's are one file.
  local here there
  here=$(docker exec "$daemon" stat -c '%d:%i' /dev/shm/shmalloc 2>&1)
  there=$(docker exec "$churn" stat -c '%d:%i' /dev/shm/shmalloc 2>&1)
  if [ "$here" = "$there" ] && [ "$(inspect "$daemon" '{{.Id}}')" != "$(inspect "$churn" '{{.Id}}')" ]; then
    pass "a: /dev/shm/shmalloc is the same file (device:inode $here) in the daemon's and alloc-churn's containers"
  else
    fail "a: /dev/shm/shmalloc differs: daemon $here, alloc-churn $there"
  fi
  # The worker's processes (host pids) map it.
  local pids mapped=0 total=0 pid
  pids=$(docker top "$churn" -o pid 2>/dev/null | tail -n +2)
  for pid in $pids; do
    total=$((total + 1))
    grep -q ' /dev/shm/shmalloc' "/proc/$pid/maps" 2>/dev/null && mapped=$((mapped + 1))
  done
  if [ "$mapped" -ge 2 ]; then
    pass "a: $mapped of alloc-churn's $total processes (host pids $(echo $pids)) map /dev/shm/shmalloc"
  else
    fail "a: only $mapped of alloc-churn's processes ($pids) map /dev/shm/shmalloc"
  fi
  local mallocs objects
  mallocs=$(stat_of mallocs_total)
  objects=$(stat_of heap_objects)
  if [ "${mallocs:-0}" -gt 0 ] && [ "${objects:-0}" -gt 0 ]; then
    pass "a: stats: mallocs_total $mallocs, heap_objects $objects"
  else
    fail "a: stats: mallocs_total '$mallocs', heap_objects '$objects'"
  fi
  # span-workers (the protocol-level clients, a round every 5 s) come and go;
  # each worker prints a line per round.
  if wait_for 20 1 sh -c "docker logs '$span_workers' 2>&1 | grep -q 'objects allocated and checked'"; then
    pass "a: span-workers completes rounds: $(docker logs "$span_workers" 2>&1 | grep -m1 'objects allocated and checked')"
  else
    fail "a: span-workers shows no completed round: $(docker logs --tail 5 "$span_workers" 2>&1)"
  fi
  # Which container each client runs in: the daemon cannot see the pids of
  # other PID namespaces (SO_PEERCRED gives 0, shown as null), so each client
  # says its own pid and container in hello. alloc-churn's clients must name
  # its container (docker's short id) and pids its container has.
  local churn_short own_pids named
  churn_short=$(inspect "$churn" '{{.Id}}' | cut -c1-12)
  own_pids=" $(docker exec "$churn" sh -c 'echo /proc/[0-9]*' | tr ' ' '\n' | sed 's|/proc/||' | tr '\n' ' ') "
  named=$(clients_json | json "' '.join('%s:%s' % (c.get('container'), c.get('pid_in_client')) for c in d['clients'] if c['name'] == 'alloc-churn')")
  local ok=1 item
  [ -n "$named" ] || ok=0
  for item in $named; do
    [ "${item%%:*}" = "$churn_short" ] || ok=0
    case $own_pids in *" ${item##*:} "*) ;; *) ok=0 ;; esac
  done
  if [ "$ok" = 1 ]; then
    pass "a: alloc-churn's clients name their container ($churn_short) and pids of their own namespace: $named"
  else
    fail "a: alloc-churn's clients give container:pid '$named', expected $churn_short and pids among$own_pids"
  fi
}

check_reclaim() {
  local ids before after
  ids=$(client_ids alloc-churn)
  before=$(stat_of reclaimed_bytes_total)
  [ -n "$ids" ] || { fail "b: no alloc-churn client to kill"; return; }
  local since
  since=$(date -u +%Y-%m-%dT%H:%M:%S)
  say "b: docker kill -s KILL alloc-churn (daemon client ids $ids; reclaimed_bytes_total $before)"
  docker kill -s KILL "$churn" >/dev/null || { fail "b: docker kill failed"; return; }
  gone() {
    local now id
    now=" $(clients_json | json "' '.join(str(c['id']) for c in d['clients'])") "
    for id in $ids; do case $now in *" $id "*) return 1 ;; esac; done
  }
  if wait_for 15 0.5 gone; then
    pass "b: clients $ids left shmallocctl clients"
  else
    fail "b: clients $ids still listed 15 s after the kill"
  fi
  local id line spans
  for id in $ids; do
    line=$(docker logs --since "$since" "$daemon" 2>&1 | grep -m1 "client $id \"alloc-churn\" (.*) disconnected")
    spans=$(printf '%s' "$line" | sed -n 's/.*disconnected; \([0-9]*\) spans taken back.*/\1/p')
    if [ "${spans:-0}" -gt 0 ]; then
      pass "b: the daemon took back client $id's spans: ${line#*] }"
    else
      fail "b: no spans taken back for client $id: '${line:-no log line}'"
    fi
  done
  after=$(stat_of reclaimed_bytes_total)
  if [ "${after:-0}" -gt "${before:-0}" ]; then
    pass "b: reclaimed_bytes_total grew from $before to $after"
  else
    fail "b: reclaimed_bytes_total did not grow ($before, then $after)"
  fi
  # docker kill counts as a manual stop: the restart policy leaves it down.
  docker start "$churn" >/dev/null || { fail "b: alloc-churn does not start again"; return; }
  if wait_for 30 1 churn_listed; then
    pass "b: alloc-churn started again and its new clients hold spans ($(client_ids alloc-churn))"
  else
    fail "b: alloc-churn started again but its clients are not listed: $(docker logs --tail 5 "$churn" 2>&1)"
  fi
}

prom() { curl -fsS --max-time 5 "http://127.0.0.1:$PROMETHEUS_PORT$1"; }
target_up() {
  [ "$(prom /api/v1/targets 2>/dev/null | json "[t['health'] for t in d['data']['activeTargets'] if t['labels'].get('job') == 'shmallocd']")" = '["up"]' ]
}
series_of() {
  prom "/api/v1/query?query=$1" 2>/dev/null | json "d['data']['result'][0]['value'][1] if d['status'] == 'success' and d['data']['result'] else ''"
}
has_inuse() { [ -n "$(series_of shmalloc_heap_inuse_bytes)" ]; }

check_prometheus() {
  # The first scrape comes within the scrape interval (15 s) of the start.
  if wait_for 60 2 target_up; then
    pass "c: Prometheus (127.0.0.1:$PROMETHEUS_PORT) has the shmallocd target up: $(prom /api/v1/targets | json "', '.join(t['scrapeUrl'] + ' ' + t['health'] for t in d['data']['activeTargets'])")"
  else
    fail "c: the shmallocd target is not up: $(prom /api/v1/targets 2>&1 | head -c 600)"
  fi
  if wait_for 30 2 has_inuse; then
    pass "c: shmalloc_heap_inuse_bytes = $(series_of shmalloc_heap_inuse_bytes), shmalloc_clients = $(series_of shmalloc_clients) (from Prometheus's query API)"
  else
    fail "c: no data for shmalloc_heap_inuse_bytes: $(prom /api/v1/query?query=shmalloc_heap_inuse_bytes 2>&1 | head -c 600)"
  fi
}

# ---- g. the shared cache ----
# The caches the daemon lists, as JSON (an empty list if it does not answer).
caches_json() { ctl caches --json 2>/dev/null || echo '{"caches": []}'; }
# The cache "demo" (examples/cache_workload's) with entries and hits.
demo_busy() {
  [ "$(caches_json | json "sum(1 for c in d['caches'] if c['name'] == 'demo' and c['items'] > 0 and c['hits'] > 0)")" = 1 ]
}
# At least two of cache-workload's processes connected (the parent and its
# workers; they come and go between rounds).
cache_clients_listed() {
  [ "$(clients_json | json "sum(1 for c in d['clients'] if c['name'] == 'cache_workload')")" -ge 2 ]
}
# A round of cache_workload has printed its result.
cache_round_done() { docker logs "$cache_workers" 2>&1 | grep -q 'cache check after the kill:'; }
# Prometheus's instant query API: the results of a PromQL expression, one
# "labels = value" per series (nothing if none).
prom_query() {
  curl -fsS --max-time 5 -G --data-urlencode "query=$1" "http://127.0.0.1:$PROMETHEUS_PORT/api/v1/query" 2>/dev/null |
    json "'\\n'.join('%s = %s' % (','.join('%s=%s' % kv for kv in sorted(r['metric'].items()) if kv[0] not in ('job', 'instance')) or '{}', r['value'][1]) for r in d['data']['result']) if d['status'] == 'success' else ''"
}
demo_hits_scraped() { prom_query 'shmalloc_cache_hits_total{cache="demo"} > 0' | grep -q .; }
# The expressions of the dashboard's "Shared caches" row (the panels between
# that row and the next), one a line, with Grafana's variables filled in as
# Grafana would for this stack (all jobs and instances; a 15 s scrape
# interval makes $__rate_interval 1m).
cache_row_queries() {
  python3 - "$repo/docker/grafana/dashboards/shmalloc.json" <<'PY'
import json, sys
panels = json.load(open(sys.argv[1]))["panels"]
rows = sorted(p["gridPos"]["y"] for p in panels if p["type"] == "row")
top = next(p["gridPos"]["y"] for p in panels if p["type"] == "row" and p["title"] == "Shared caches")
bottom = min([y for y in rows if y > top] or [10 ** 6])
for p in panels:
    if p["type"] != "row" and top < p["gridPos"]["y"] < bottom:
        for t in p.get("targets", []):
            e = t["expr"].replace("$__rate_interval", "1m").replace("$job", ".+").replace("$instance", ".+")
            print(p["title"] + "\t" + e)
PY
}
cache_row_has_data() {
  local title expr
  missing_queries=
  while IFS=$'\t' read -r title expr; do
    prom_query "$expr" | grep -q 'cache=demo ' || missing_queries+="$title: $expr; "
  done < <(cache_row_queries)
  [ -z "$missing_queries" ]
}

check_cache() {
  # Its own container, on the daemon's heap.
  local here there
  here=$(docker exec "$daemon" stat -c '%d:%i' /dev/shm/shmalloc 2>&1)
  there=$(docker exec "$cache_workers" stat -c '%d:%i' /dev/shm/shmalloc 2>&1)
  if [ "$here" = "$there" ] && [ "$(inspect "$daemon" '{{.Id}}')" != "$(inspect "$cache_workers" '{{.Id}}')" ]; then
    pass "g: /dev/shm/shmalloc is the same file (device:inode $here) in the daemon's and cache-workload's containers"
  else
    fail "g: /dev/shm/shmalloc differs: daemon $here, cache-workload $there"
  fi
  if wait_for 30 1 cache_clients_listed; then
    pass "g: shmallocctl clients lists $(clients_json | json "sum(1 for c in d['clients'] if c['name'] == 'cache_workload')") cache_workload processes"
  else
    fail "g: cache-workload's processes are not listed by shmallocctl clients: $(ctl clients 2>&1 | tail -n +2); its log: $(docker logs --tail 5 "$cache_workers" 2>&1)"
  fi
  # Its processes (host pids) map the heap. A round's processes come and go
  # (a second's pause every 20 s): look until two do.
  local pids mapped total
  cache_pids_mapped() {
    local pid
    mapped=0 total=0
    pids=$(docker top "$cache_workers" -o pid,comm 2>/dev/null | awk 'NR > 1 && $2 == "cache_workload" { print $1 }')
    for pid in $pids; do
      total=$((total + 1))
      grep -q ' /dev/shm/shmalloc' "/proc/$pid/maps" 2>/dev/null && mapped=$((mapped + 1))
    done
    [ "$mapped" -ge 2 ]
  }
  if wait_for 10 1 cache_pids_mapped; then
    pass "g: $mapped of the $total cache_workload processes in cache-workload's container (host pids $(echo $pids)) map /dev/shm/shmalloc"
  else
    fail "g: only $mapped of cache-workload's cache_workload processes ($(echo $pids)) map /dev/shm/shmalloc"
  fi
  if wait_for 30 1 demo_busy; then
    pass "g: shmallocctl caches --json in the daemon's container: $(caches_json | json "'; '.join('%s: %d items, %d of %d bytes, %d hits, %d misses (hit ratio %s), %d puts, %d evictions, %d expirations, %d repairs, %d retired bytes' % (c['name'], c['items'], c['bytes'], c['max_bytes'], c['hits'], c['misses'], c['hit_ratio'], c['puts'], c['evictions'], c['expirations'], c['repairs'], c['retired_bytes']) for c in d['caches'])")"
  else
    fail "g: no cache \"demo\" with items and hits in shmallocctl caches --json: $(ctl caches 2>&1)"
  fi
  # A round's own verdict: every value read was right, and the cache checked
  # out after its writer was killed mid-put. The first round ends 20 s after
  # the container started.
  if wait_for 45 1 cache_round_done; then
    local result
    result=$(docker logs "$cache_workers" 2>&1 | sed -n '/^-- result/,/cache check after the kill/p' | tail -n 6)
    if printf '%s\n' "$result" | grep -q 'wrong: 0$' && printf '%s\n' "$result" | grep -q 'after the kill: consistent' &&
       ! docker logs "$cache_workers" 2>&1 | grep -q 'cache_workload: FAILED'; then
      pass "g: cache_workload completes rounds:$(printf '%s\n' "$result" | grep -E 'gets:|hit ratio|values checked|after the kill' | sed 's/^ */ /' | tr '\n' ';')"
    else
      fail "g: a cache_workload round failed: $(docker logs --tail 12 "$cache_workers" 2>&1)"
    fi
  else
    fail "g: cache_workload completed no round in 45 s: $(docker logs --tail 8 "$cache_workers" 2>&1)"
  fi
  # Its CPU cap (compose.yaml: cpus 1.0), so its spinning readers leave the
  # host room.
  local nano
  nano=$(inspect "$cache_workers" '{{.HostConfig.NanoCpus}}')
  if [ "${nano:-0}" = 1000000000 ]; then
    pass "g: cache-workload is capped at one CPU (NanoCpus $nano)"
  else
    fail "g: cache-workload's CPU cap: NanoCpus '$nano', not 1000000000"
  fi
  # Prometheus scrapes the cache's counters, and the dashboard's "Shared
  # caches" queries have data (the rates need two scrapes of the cache).
  if wait_for 60 2 demo_hits_scraped; then
    pass "g: Prometheus has shmalloc_cache_hits_total: $(prom_query 'shmalloc_cache_hits_total' | tr '\n' ' ')"
  else
    fail "g: Prometheus has no shmalloc_cache_hits_total for cache demo: $(prom_query 'shmalloc_cache_hits_total')"
  fi
  if wait_for 60 3 cache_row_has_data; then
    pass "g: every query of the dashboard's \"Shared caches\" row ($(cache_row_queries | wc -l)) returns data for cache demo; hit ratio $(prom_query "$(cache_row_queries | awk -F'\t' '$1 == "Cache hit ratio" { print $2; exit }')" | tr '\n' ' ')"
  else
    fail "g: queries of the \"Shared caches\" row without data for cache demo: $missing_queries"
  fi
}

# After a daemon restart at $1 (docker logs --since): the heap adopted,
# workers back, nothing lost. $2 says which restart.
restart_checks() {
  local since=$1 what=$2 churn_started=$3 churn_restarts=$4 mallocs_before=$5
  if ! wait_for 60 0.5 healthy; then
    fail "d: $what: shmallocd not healthy 60 s later; its log since: $(daemon_log_summary "$since")"
    return
  fi
  local serving
  serving=$(docker logs --since "$since" "$daemon" 2>&1 | grep 'shmallocd serving heap' | tail -n 1)
  case $serving in
    *adopted*) pass "d: $what: the new daemon adopted the heap (its checker passed): ${serving#*] }" ;;
    *) fail "d: $what: the daemon did not adopt the heap: '${serving:-no start line}'; log: $(docker logs --since "$since" "$daemon" 2>&1 | tail -n 5)" ;;
  esac
  if wait_for 30 1 churn_listed; then
    pass "d: $what: alloc-churn's clients are listed again with spans ($(client_ids alloc-churn))"
  else
    fail "d: $what: alloc-churn's clients are not back within 30 s: $(ctl clients 2>&1 | tail -n +2)"
  fi
  # Allocation goes on: mallocs_total moves, on the same counters.
  local m1 m2
  m1=$(stat_of mallocs_total)
  sleep 3
  m2=$(stat_of mallocs_total)
  if [ "${m2:-0}" -gt "${m1:-0}" ] && [ "${m1:-0}" -ge "${mallocs_before:-0}" ]; then
    pass "d: $what: mallocs_total goes on growing ($mallocs_before before; $m1, then $m2 after)"
  else
    fail "d: $what: mallocs_total $mallocs_before before, $m1 and $m2 after"
  fi
  # No worker process died: the container was neither restarted nor left, and
  # the library reported nothing.
  local now_started now_restarts complaints
  now_started=$(inspect "$churn" '{{.State.StartedAt}}')
  now_restarts=$(inspect "$churn" '{{.RestartCount}}')
  complaints=$(docker logs --since "$since" "$churn" 2>&1 | grep -E 'shmalloc:|alloc-churn: the producer' | head -n 3)
  if [ "$now_started" = "$churn_started" ] && [ "$now_restarts" = "$churn_restarts" ] && [ -z "$complaints" ] &&
     [ "$(inspect "$churn" '{{.State.Running}}')" = true ]; then
    pass "d: $what: alloc-churn ran through it (same start, no restart, nothing reported)"
  else
    fail "d: $what: alloc-churn did not survive it (started $churn_started -> $now_started, restarts $churn_restarts -> $now_restarts): ${complaints:-no message}"
  fi
}

restart_round() {
  local what=$1
  shift
  local since churn_started churn_restarts mallocs_before
  churn_listed || wait_for 30 1 churn_listed
  churn_started=$(inspect "$churn" '{{.State.StartedAt}}')
  churn_restarts=$(inspect "$churn" '{{.RestartCount}}')
  mallocs_before=$(stat_of mallocs_total)
  since=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
  say "d: $what"
  "$@" || { fail "d: $what: the command failed"; return; }
  restart_checks "$since" "$what" "$churn_started" "$churn_restarts" "$mallocs_before"
}

compose_quiet() { compose "$@" >>"$tmp/compose.log" 2>&1; }

# What the daemon said since $1: its errors (the first, and how many lines
# in all) or else its last lines.
daemon_log_summary() {
  local log first
  log=$(docker logs --since "$1" "$daemon" 2>&1)
  first=$(printf '%s\n' "$log" | grep -m1 -E 'shmallocd: |\[(error|critical)\]')
  if [ -n "$first" ]; then
    printf '%s (%d lines logged; the first error above)' "$first" "$(printf '%s\n' "$log" | wc -l)"
  else
    printf '%s\n' "$log" | tail -n 3 | tr '\n' ' '
  fi
}

crash_daemon() {
  local pid
  pid=$(inspect "$daemon" '{{.State.Pid}}')
  [ "${pid:-0}" -gt 0 ] && kill -KILL "$pid"
  # The restart policy (unless-stopped) starts it again; wait for the new pid.
  new_pid() { local p; p=$(inspect "$daemon" '{{.State.Pid}}'); [ "${p:-0}" -gt 0 ] && [ "$p" != "$pid" ]; }
  wait_for 30 0.5 new_pid
}

check_restart() {
  restart_round "daemon killed with SIGKILL from the host, brought back by the restart policy" crash_daemon
  restart_round "compose restart shmallocd (SIGTERM, --keep-heap)" compose_quiet restart -t 10 shmallocd

  # What alloc-churn leaves must pass the heap checker: stop it (it frees
  # and detaches), then a crash and a restart make the daemon check the heap.
  # span-workers stays up: the /dev/shm volume lasts only while some
  # container has it mounted.
  say "d: stopping alloc-churn, then the daemon crashes once more and adopts what it left"
  local since serving
  if ! healthy; then
    fail "d: the heap check after alloc-churn stops is not run: the daemon is down (above)"
    return
  fi
  compose_quiet stop -t 10 alloc-churn
  since=$(date -u +%Y-%m-%dT%H:%M:%S.%NZ)
  if crash_daemon && wait_for 60 0.5 healthy; then
    serving=$(docker logs --since "$since" "$daemon" 2>&1 | grep 'shmallocd serving heap' | tail -n 1)
    case $serving in
      *adopted*) pass "d: after alloc-churn stopped, the heap passes the checker: ${serving#*] }; $(ctl stats 2>&1 | grep -E '^(heap_objects|heap_alloc_bytes|large_objects|clients) ' | tr '\n' ' ')" ;;
      *) fail "d: after alloc-churn stopped, the heap was not adopted: $(daemon_log_summary "$since")" ;;
    esac
  else
    fail "d: the daemon did not come back after the last crash: $(daemon_log_summary "$since")"
  fi
  compose_quiet start alloc-churn
}

# Host-side view of a container's processes: uid, gid, capabilities, no_new_privs.
# A field of a /proc/<pid>/status text read before.
status_field() { printf '%s\n' "$1" | awk -v k="$2:" '$1 == k { print $2; exit }'; }

check_security() {
  local service c pid ok detail st
  for service in shmallocd span-workers alloc-churn cache-workload; do
    c=$(container_of "$service")
    ok=1
    detail=
    [ "$(inspect "$c" '{{.Config.User}}')" = 10001:10001 ] || { ok=0; detail+=" user $(inspect "$c" '{{.Config.User}}');"; }
    for pid in $(docker top "$c" -o pid 2>/dev/null | tail -n +2); do
      # Read once: a short-lived worker may have ended since docker top.
      st=$(cat "/proc/$pid/status" 2>/dev/null) || continue
      [ -n "$st" ] || continue
      [ "$(status_field "$st" Uid)" = 10001 ] || { ok=0; detail+=" pid $pid uid $(status_field "$st" Uid);"; }
      [ "$(status_field "$st" Gid)" = 10001 ] || { ok=0; detail+=" pid $pid gid $(status_field "$st" Gid);"; }
      [ "$(status_field "$st" CapEff)" = 0000000000000000 ] || { ok=0; detail+=" pid $pid CapEff $(status_field "$st" CapEff);"; }
      [ "$(status_field "$st" NoNewPrivs)" = 1 ] || { ok=0; detail+=" pid $pid NoNewPrivs $(status_field "$st" NoNewPrivs);"; }
    done
    [ "$(docker exec "$c" id -u 2>/dev/null)" = 10001 ] || { ok=0; detail+=" exec id -u $(docker exec "$c" id -u 2>&1);"; }
    if [ $ok = 1 ]; then
      pass "e: $service runs as uid/gid 10001, no capabilities, no_new_privs (every process, from /proc on the host)"
    else
      fail "e: $service:$detail"
    fi
    # compose.yaml says read_only for these four services.
    if [ "$(inspect "$c" '{{.HostConfig.ReadonlyRootfs}}')" = true ] &&
       ! docker exec "$c" sh -c ': >/probe' 2>/dev/null && ! docker exec "$c" sh -c ': >/usr/probe' 2>/dev/null; then
      pass "e: $service has a read-only root filesystem (writing / and /usr fails)"
    else
      fail "e: $service's root filesystem is writable (ReadonlyRootfs $(inspect "$c" '{{.HostConfig.ReadonlyRootfs}}'))"
    fi
  done
  # Networks: the daemon only on the internal backend, the workers on none.
  local nets internal
  nets=$(inspect "$daemon" '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}')
  internal=$(docker network inspect -f '{{.Internal}}' ${nets:-none} 2>/dev/null | sort -u | tr '\n' ' ')
  if [ "$(echo $nets)" = "${project}_backend" ] && [ "$internal" = "true " ]; then
    pass "e: shmallocd is on the internal network ${project}_backend only"
  else
    fail "e: shmallocd's networks: '$nets' (internal: $internal)"
  fi
  for c in "$span_workers" "$churn" "$cache_workers"; do
    [ "$(inspect "$c" '{{.HostConfig.NetworkMode}}')" = none ] ||
      fail "e: $(inspect "$c" '{{.Name}}') has network mode $(inspect "$c" '{{.HostConfig.NetworkMode}}'), not none"
  done
  pass "e: the workers have network mode none"
  local published
  published=$(inspect "$prometheus" '{{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{.HostIp}}:{{.HostPort}} {{end}}{{end}}')
  if [ "$(echo $published)" = "127.0.0.1:$PROMETHEUS_PORT" ] && [ -z "$(inspect "$daemon" '{{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{.HostPort}}{{end}}{{end}}')" ]; then
    pass "e: only Prometheus is published, on 127.0.0.1:$PROMETHEUS_PORT; the daemon's :9464 is not"
  else
    fail "e: published ports: Prometheus '$published', shmallocd '$(inspect "$daemon" '{{json .NetworkSettings.Ports}}')'"
  fi
}

check_down() {
  local label=com.docker.compose.project=$project left
  say "f: compose down -v"
  if compose down -v --remove-orphans --timeout 10 >"$tmp/down.log" 2>&1; then
    stack_up=0
  else
    fail "f: compose down -v failed: $(tail -n 5 "$tmp/down.log")"
  fi
  left=$( {
    docker ps -a -q --filter "label=$label" | sed 's/^/container /'
    docker volume ls -q --filter "label=$label" | sed 's/^/volume /'
    docker network ls -q --filter "label=$label" | sed 's/^/network /'
    docker volume ls -q | grep "^${project}_" | sed 's/^/volume /'
    docker network ls --format '{{.Name}}' | grep "^${project}_" | sed 's/^/network /'
  } | sort -u | tr '\n' ' ')
  if [ -z "$left" ]; then
    pass "f: down -v left no container, volume or network of project $project"
  else
    fail "f: left behind by down -v: $left"
  fi
}

# ---- run ---------------------------------------------------------------------------
cd "$repo" || abort "cannot cd to $repo"
make_base_image
build_images
start_stack
for check in $checks; do
  if declare -F "check_$check" >/dev/null; then
    say "---- check: $check"
    "check_$check"
  else
    fail "no check named '$check' (SHMALLOC_DOCKER_CHECKS)"
  fi
done

if [ "$failures" -ne 0 ] && [ "$stack_up" = 1 ]; then
  say "logs of the stack (last 15 lines per service):"
  compose logs --no-color --tail 15 2>&1 | sed 's/^/    /'
fi
echo
echo "docker-stack-test: results (project $project, $(($(date +%s) - started)) s):"
printf '  %s\n' "${results[@]}"
if [ "$failures" -ne 0 ]; then
  echo "docker-stack-test: $failures check(s) FAILED"
  exit 1
fi
echo "docker-stack-test: all checks passed"
exit 0
