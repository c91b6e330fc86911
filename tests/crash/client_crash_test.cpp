// Crash points, the client (issue 14): crash_workload, linked with a
// libshmalloc built with crash points (shm/crash_point.hpp), is killed with
// SIGKILL at SHMALLOC_CRASH_POINTS_CLIENT (default 1,000) hits spread over a
// whole run: refills, releases, tiny and large objects and the large cache,
// publish, remote frees, trims, threads' caches. After each kill, once the
// daemon (production shmallocd) reports the client gone: the heap checks
// out, and the objects live in the heap are those the workload's record says
// it held, give or take the one in flight. A cleanup process then frees
// them, so every run starts from the same heap. Two lanes, each with a
// daemon of its own, share the points.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "crash/crash_record.hpp"
#include "crash/crash_support.hpp"
#include "shm/segment.hpp"
#include "shm/verify.hpp"
#include "support/daemon_process.hpp"

using namespace shmalloc;
using namespace shmalloc::crash_test;
using namespace shmalloc::test;

namespace {

constexpr int lanes = 2;

struct lane_result {
  std::uint64_t runs = 0, kills = 0, completed = 0, lost = 0, max_lost_per_kill = 0;
  std::map<std::string, std::uint64_t> by_point;
  std::vector<std::string> failures;  // each names the hit and point that reproduce it
};

// The daemon's count of registered clients; false if it does not answer.
bool clients_of(const std::string& socket, std::uint64_t* n) {
  raw_client c(socket);
  if (!c.connected()) return false;
  auto f = c.call(proto::msg::stats);
  if (!f) return false;
  auto parts = proto::split_reply(f->payload);
  if (!parts) return false;
  auto s = proto::decode_stats(parts->body);
  if (!s) return false;
  *n = s->clients;
  return true;
}

// Waits until the daemon reports no client (the killed one reclaimed).
bool wait_no_clients(const std::string& socket) {
  for (int i = 0; i < 20000; ++i) {
    std::uint64_t n = 0;
    if (!clients_of(socket, &n)) return false;
    if (n == 0) return true;
    std::this_thread::sleep_for(std::chrono::microseconds(500));
  }
  return false;
}

// The heap's check and live objects with the daemon stopped (SIGSTOP), so
// that no housekeeping runs under the walk. A daemon stopped inside a
// change shows it half done: a failed look is taken again after the daemon
// finished its work (a stats round trip takes the heap lock).
struct heap_look {
  verify_report report;
  std::uint64_t live = 0;
};
heap_look look_at(pid_t daemon, const std::string& socket, mheap& h, std::uint64_t want) {
  heap_look l;
  for (int attempt = 0; attempt < 4; ++attempt) {
    std::uint64_t n = 0;
    clients_of(socket, &n);
    kill(daemon, SIGSTOP);
    int status = 0;
    waitpid(daemon, &status, WUNTRACED);
    l.report = verify_heap(h);
    l.live = live_objects(h);
    kill(daemon, SIGCONT);
    waitpid(daemon, &status, WCONTINUED);
    if (l.report.ok() && (l.live == want || l.live == want + 1)) break;
  }
  return l;
}

void run_lane(const daemon_process& d, const std::vector<std::uint64_t>& points, lane_result& out) {
  const std::string dir = d.dir, log = dir + "/crash.log";
  auto seg = segment::attach(d.heap);
  if (!seg) {
    out.failures.push_back("cannot attach the heap");
    return;
  }
  mheap h(*seg.value());
  const std::string workload = SHMALLOC_CRASH_WORKLOAD_PATH;
  auto helper = [&](const char* mode) {
    child_env env(0, false, log);
    return wait_status(spawn({workload, mode, d.socket, dir}, env));
  };
  if (helper("prep") != 0) {
    out.failures.push_back("prep failed");
    return;
  }
  for (const std::uint64_t at : points) {
    std::remove(log.c_str());
    child_env env(at, true, log);
    const int rc = wait_status(spawn({workload, "run", d.socket, dir}, env));
    ++out.runs;
    std::uint64_t hit = 0;
    const std::string point = last_point(log, &hit);
    if (rc == 0) {
      ++out.completed;
    } else if (rc == 128 + SIGKILL && !point.empty()) {
      ++out.kills;
      ++out.by_point[point];
    } else {
      out.failures.push_back("SHMALLOC_CRASH_AT=" + std::to_string(at) + ": the workload ended with " +
                             std::to_string(rc) + " (last point '" + point + "')");
    }
    if (!wait_no_clients(d.socket)) {
      out.failures.push_back("SHMALLOC_CRASH_AT=" + std::to_string(at) + " (" + point + "): the client stays registered");
      return;
    }
    holdings held;
    apply_record(dir + "/foreign", held);
    apply_record(dir + "/record", held);
    const std::uint64_t want = heap_count_of(held) + out.lost;
    const heap_look l = look_at(d.pid(), d.socket, h, want);
    const std::string where = "SHMALLOC_CRASH_AT=" + std::to_string(at) + " (" + point + ")";
    if (!l.report.ok()) out.failures.push_back(where + ": heap check: " + l.report.summary());
    if (l.live < want || l.live > want + 1)
      out.failures.push_back(where + ": " + std::to_string(l.live) + " objects live, the record says " +
                             std::to_string(want));
    if (!out.failures.empty()) return;  // the first failure is the one to reproduce
    if (helper("prep") != 0) {
      out.failures.push_back(where + ": the cleanup process failed");
      return;
    }
    // What the kill lost shows once everything recorded is freed: a tiny
    // block that kept its bias shows only when its last object goes.
    holdings fresh;
    apply_record(dir + "/foreign", fresh);
    const std::uint64_t base = heap_count_of(fresh) + out.lost;
    const heap_look after = look_at(d.pid(), d.socket, h, base);
    if (!after.report.ok()) out.failures.push_back(where + ": after the cleanup: heap check: " + after.report.summary());
    if (after.live < base || after.live > base + 1) {
      out.failures.push_back(where + ": after the cleanup " + std::to_string(after.live) + " objects live, " +
                             std::to_string(base) + " expected (foreign and lost so far)");
      return;
    }
    out.lost += after.live - base;
    out.max_lost_per_kill = std::max(out.max_lost_per_kill, after.live - base);
  }
  if (helper("clean") != 0) out.failures.push_back("the last cleanup failed");
  const heap_look l = look_at(d.pid(), d.socket, h, out.lost);
  if (!l.report.ok()) out.failures.push_back("at the end: heap check: " + l.report.summary());
  if (l.live != out.lost)
    out.failures.push_back("at the end: " + std::to_string(l.live) + " objects live, " + std::to_string(out.lost) +
                           " lost in flight");
}


// The cache campaign (issue 23, item 3): what the heap holds, as its walk
// and the daemon's counters say.
struct figures {
  std::uint64_t live = 0, heap_objects = 0, heap_alloc_bytes = 0, large_objects = 0, large_bytes = 0;
  bool operator==(const figures&) const = default;
  std::string text() const {
    return "live " + std::to_string(live) + ", heap_objects " + std::to_string(heap_objects) + ", heap_alloc_bytes " +
           std::to_string(heap_alloc_bytes) + ", large_objects " + std::to_string(large_objects) + ", large_bytes " +
           std::to_string(large_bytes);
  }
};

figures figures_of(const daemon_process& d, mheap& h, std::uint64_t want_live, verify_report* report) {
  const heap_look l = look_at(d.pid(), d.socket, h, want_live);
  *report = l.report;
  raw_client c(d.socket);
  const proto::stats_msg s = daemon_stats(c);
  return {l.live, s.heap_objects, s.heap_alloc_bytes, s.large_objects, s.large_bytes};
}

}  // namespace

TEST_CASE("a client killed at any crash point loses at most the object in flight and the daemon takes back the rest") {
  const auto t0 = std::chrono::steady_clock::now();
  const std::uint64_t n = count_from_env("SHMALLOC_CRASH_POINTS_CLIENT", 1000);
  std::vector<std::unique_ptr<daemon_process>> daemons;
  for (int i = 0; i < lanes; ++i) {
    daemons.push_back(std::make_unique<daemon_process>(std::vector<std::string>{"--keep-heap"}, "crash-client"));
    REQUIRE(daemons.back()->started());
  }
  // One full run counts the hits: the kill points are spread over them.
  const daemon_process& first = *daemons.front();
  const std::string calib = first.dir + "/calibration.log";
  {
    child_env env(0, false, calib);
    REQUIRE(wait_status(spawn({SHMALLOC_CRASH_WORKLOAD_PATH, "prep", first.socket, first.dir}, env)) == 0);
    child_env counting(0, true, calib);
    REQUIRE(wait_status(spawn({SHMALLOC_CRASH_WORKLOAD_PATH, "run", first.socket, first.dir}, counting)) == 0);
  }
  const std::uint64_t total = total_hits(calib);
  REQUIRE(total > 0);
  // SHMALLOC_CRASH_AT_ONLY=N reproduces one kill the campaign reported.
  const std::uint64_t only = count_from_env("SHMALLOC_CRASH_AT_ONLY", 0);
  const std::vector<std::uint64_t> points = only != 0 ? std::vector<std::uint64_t>{only} : spread(total, n);
  std::vector<std::vector<std::uint64_t>> share(lanes);
  for (std::size_t i = 0; i < points.size(); ++i) share[i % lanes].push_back(points[i]);

  std::vector<lane_result> results(lanes);
  std::vector<std::thread> threads;
  for (int i = 0; i < lanes; ++i)
    threads.emplace_back([&, i] { run_lane(*daemons[i], share[i], results[i]); });
  for (auto& t : threads) t.join();

  lane_result all;
  for (const auto& r : results) {
    all.runs += r.runs, all.kills += r.kills, all.completed += r.completed, all.lost += r.lost;
    all.max_lost_per_kill = std::max(all.max_lost_per_kill, r.max_lost_per_kill);
    for (const auto& [p, k] : r.by_point) all.by_point[p] += k;
    for (const auto& f : r.failures) all.failures.push_back(f);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("client crash points: %llu hits in a full run, %llu runs (%llu killed, %llu ran to the end), "
              "%zu distinct points hit, %llu objects lost in flight (at most %llu per kill), %.1f s\n",
              static_cast<unsigned long long>(total), static_cast<unsigned long long>(all.runs),
              static_cast<unsigned long long>(all.kills), static_cast<unsigned long long>(all.completed),
              all.by_point.size(), static_cast<unsigned long long>(all.lost),
              static_cast<unsigned long long>(all.max_lost_per_kill), secs);
  for (const auto& [p, k] : all.by_point) std::printf("  %-28s %llu\n", p.c_str(), static_cast<unsigned long long>(k));
  for (const auto& f : all.failures) FAIL_CHECK(f);
  CHECK(all.failures.empty());
  CHECK(all.runs == points.size());
  CHECK(all.max_lost_per_kill <= 1);
  for (auto& d : daemons) check_heap_after(*d);
}

// A cache writer (crash_workload cache) killed at hits spread over its run
// (SHMALLOC_CRASH_POINTS_CACHE, default 300): the cache's own points in put,
// replace, erase, reclaim and repair, and the client library's under them
// (large objects of up to 250,000 bytes among them). After each kill a
// second process checks the cache, erases every key and leaves; with no
// client left, the heap must hold exactly what it held before the run and
// the daemon's counters must not have moved: no kill, in the cache or in
// the allocator under it, loses anything. (The allocator's own campaign
// above allows one object in flight per kill: its caller there has nowhere
// to put it before it returns; the cache's put has its pending slot.)
TEST_CASE("a cache writer killed at any crash point of put or erase loses nothing and leaves the counters exact") {
  const std::uint64_t n = count_from_env("SHMALLOC_CRASH_POINTS_CACHE", 300);
  daemon_process d({"--keep-heap"}, "crash-cache");
  REQUIRE(d.started());
  const std::string log = d.dir + "/crash.log";
  auto run = [&](const char* mode, std::uint64_t at, bool armed) {
    child_env env(at, armed, log);
    return wait_status(spawn({SHMALLOC_CRASH_WORKLOAD_PATH, mode, d.socket, d.dir}, env));
  };
  REQUIRE(run("cache-clean", 0, false) == 0);  // makes the cache: its header and buckets stay
  REQUIRE(run("cache", 0, true) == 0);         // counts the hits of a whole run
  const std::uint64_t total = total_hits(log);
  REQUIRE(total > 0);
  REQUIRE(run("cache-clean", 0, false) == 0);
  REQUIRE(wait_no_clients(d.socket));
  auto seg = segment::attach(d.heap);
  REQUIRE(seg);
  mheap h(*seg.value());
  verify_report report;
  figures base = figures_of(d, h, 0, &report);
  base = figures_of(d, h, base.live, &report);
  REQUIRE(report.ok());

  const std::uint64_t only = count_from_env("SHMALLOC_CRASH_AT_ONLY", 0);
  const std::vector<std::uint64_t> points = only != 0 ? std::vector<std::uint64_t>{only} : spread(total, n);
  std::uint64_t kills = 0;
  std::map<std::string, std::uint64_t> by_point;
  std::vector<std::string> failures;
  for (const std::uint64_t at : points) {
    std::remove(log.c_str());
    const int rc = run("cache", at, true);
    std::uint64_t hit = 0;
    const std::string point = last_point(log, &hit);
    const std::string where = "SHMALLOC_CRASH_AT=" + std::to_string(at) + " (" + point + ")";
    if (rc == 128 + SIGKILL && !point.empty()) {
      ++kills;
      ++by_point[point];
    } else if (rc != 0) {
      failures.push_back(where + ": the writer ended with " + std::to_string(rc));
    }
    if (!wait_no_clients(d.socket)) failures.push_back(where + ": the writer stays registered");
    if (const int crc = run("cache-clean", 0, false); crc != 0)
      failures.push_back(where + ": the cache does not check out (cache-clean ended with " + std::to_string(crc) + ")");
    if (!wait_no_clients(d.socket)) failures.push_back(where + ": the cleaner stays registered");
    const figures now = figures_of(d, h, base.live, &report);
    if (!report.ok()) failures.push_back(where + ": heap check: " + report.summary());
    if (!failures.empty()) break;  // the first failure is the one to reproduce
    if (now != base) failures.push_back(where + ": the heap went from " + base.text() + " to " + now.text());
  }
  std::printf("cache crash points: %llu hits in a full run, %zu runs (%llu killed), %zu distinct points hit\n",
              static_cast<unsigned long long>(total), points.size(), static_cast<unsigned long long>(kills),
              by_point.size());
  for (const auto& [p, k] : by_point) std::printf("  %-28s %llu\n", p.c_str(), static_cast<unsigned long long>(k));
  for (const auto& f : failures) FAIL_CHECK(f);
  CHECK(failures.empty());
  CHECK(kills > 0);
  check_heap_after(d);
}
