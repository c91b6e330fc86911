// What the daemon reports of the shared caches (cache/), against a live
// shmallocd: clients in two processes use a cache through its library, then
// `shmallocctl caches` and the daemon's /metrics must show what they did.
// The daemon never writes a cache; it reads the counters the clients keep.
#include <doctest/doctest.h>
#include <nlohmann/json.hpp>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <regex>
#include <string>

#include "shm/segment.hpp"
#include "shmalloc/cache.hpp"
#include "shmalloc/shmalloc.h"
#include "support/daemon_process.hpp"
#include "support/http_get.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;
using namespace shmalloc::test;
using json = nlohmann::json;

namespace {

// shmallocd with metrics on a free loopback port. daemon_process turns
// metrics off (tests run in parallel and a flag may be given once), so this
// starts it with spawn_daemon on a heap and socket of its own and, like
// daemon_process, stops it by pid and removes what it made.
struct metrics_daemon {
  std::string heap = unique_heap_name("cache-daemon");
  std::string dir, socket;
  pid_t pid = -1;

  metrics_daemon() {
    char tmpl[] = "/tmp/shmalloc-test-XXXXXX";
    dir = mkdtemp(tmpl);
    socket = dir + "/shmallocd.sock";
    pid = spawn_daemon({"--heap", heap, "--socket", socket, "--capacity", "256M", "--log-level", "warn", "--metrics",
                        "127.0.0.1:0"},
                       socket);
  }
  ~metrics_daemon() {
    if (pid > 0) stop(SIGKILL);
    segment::remove(heap);
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
  metrics_daemon(const metrics_daemon&) = delete;
  metrics_daemon& operator=(const metrics_daemon&) = delete;

  // Its exit status (128 + signal if killed).
  int stop(int sig = SIGTERM) {
    kill(pid, sig);
    int status = 0;
    waitpid(pid, &status, 0);
    pid = -1;
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
  }
  std::uint16_t metrics_port() const {
    raw_client c(socket);
    REQUIRE(c.connected());
    return static_cast<std::uint16_t>(daemon_stats(c).metrics_port);
  }
};

std::string key(int i) { return "key:" + std::to_string(i); }

// The line of the series `name{cache="cache"}` in a scrape, or "".
std::string series(const std::string& scrape, const std::string& name, const std::string& cache) {
  const std::string head = "\n" + name + "{cache=\"" + cache + "\"} ";
  const auto at = scrape.find(head);
  if (at == std::string::npos) return {};
  return scrape.substr(at + 1, scrape.find('\n', at + 1) - at - 1);
}

const json* find_cache(const json& rows, const std::string& name) {
  for (const json& r : rows)
    if (r["name"] == name) return &r;
  return nullptr;
}

constexpr int put_count = 10, erased = 1;
constexpr int parent_hits = 10, parent_misses = 4, child_hits = 5, child_misses = 1;
constexpr std::uint64_t budget = 4ULL << 20;

// The parent's share: puts, hits on every key, misses on keys never put,
// and one erase.
shmalloc_cache_stats use_cache(cache& c) {
  for (int i = 0; i < put_count; ++i) c.put(key(i), std::string(100 + i, 'v'));
  std::string value;
  for (int i = 0; i < parent_hits; ++i) REQUIRE(c.get_copy(key(i), value));
  for (int i = 0; i < parent_misses; ++i) REQUIRE_FALSE(c.get_copy(key(1000 + i), value));
  REQUIRE(c.erase(key(put_count - 1)));
  return c.stats();
}

// Another process opens the same cache by name and reads from it.
int child_reads(const std::string& socket) {
  if (shmalloc_attach(socket.c_str()) != 0) return 2;
  int rc = 0;
  {
    auto c = cache::open("ctl-cache");
    std::string value;
    for (int i = 0; i < child_hits; ++i) rc |= c.get_copy(key(i), value) && value.size() == 100u + i ? 0 : 3;
    for (int i = 0; i < child_misses; ++i) rc |= c.get_copy(key(put_count - 1), value) ? 4 : 0;  // the erased key
  }
  shmalloc_detach();
  return rc;
}

}  // namespace

TEST_SUITE("cache daemon") {
  TEST_CASE("shmallocctl caches and /metrics count what clients of two processes did to a cache") {
    metrics_daemon d;
    REQUIRE(d.pid > 0);
    REQUIRE(shmalloc_attach(d.socket.c_str()) == 0);
    shmalloc_cache_stats mine{};
    {
      auto c = cache::open("ctl-cache", budget);
      auto other = cache::open("other", budget);  // a second cache, never used
      mine = use_cache(c);
      CHECK(run_in_child([&d] { return child_reads(d.socket); }) == 0);
      CHECK(c.stats().hits == parent_hits + child_hits);  // the library agrees before the daemon is asked
    }  // closed: a cache lives on in the heap, and the daemon still finds it

    constexpr int hits = parent_hits + child_hits, misses = parent_misses + child_misses;
    std::string out;
    REQUIRE(run_ctl("caches --json --socket " + d.socket, &out) == 0);
    const json t = json::parse(out);
    CHECK(t["total"] == 2);
    CHECK(t["shown"] == 2);
    CHECK(t["left_out"] == 0);
    REQUIRE(t["caches"].size() == 2);
    CHECK(t["caches"][0]["name"] == "ctl-cache");  // by name
    const json* r = find_cache(t["caches"], "ctl-cache");
    REQUIRE(r);
    CHECK((*r)["max_bytes"] == budget);
    CHECK((*r)["items"] == put_count - erased);
    CHECK((*r)["bytes"] == mine.bytes);
    CHECK((*r)["bytes"].get<std::uint64_t>() >= (put_count - erased) * 100);
    CHECK((*r)["hits"] == hits);
    CHECK((*r)["misses"] == misses);
    CHECK((*r)["hit_ratio"].get<double>() == doctest::Approx(0.75));
    CHECK((*r)["puts"] == put_count);
    CHECK((*r)["evictions"] == 0);
    CHECK((*r)["expirations"] == 0);
    CHECK((*r)["repairs"] == 0);
    CHECK((*r)["readers"].get<std::uint64_t>() >= 2);  // a thread of each process
    const json* unused = find_cache(t["caches"], "other");
    REQUIRE(unused);
    CHECK((*unused)["hit_ratio"].is_null());  // no lookup yet
    CHECK((*unused)["items"] == 0);

    REQUIRE(run_ctl("caches --socket " + d.socket, &out) == 0);
    CHECK(std::regex_search(out, std::regex("^name +max_bytes +items +bytes +retired_bytes +hits +misses +hit_ratio "
                                            "+puts +evictions +expirations +repairs +readers\n")));
    CHECK(std::regex_search(out, std::regex("\nctl-cache +4194304 +9 +[0-9]+ +[0-9]+ +15 +5 +0\\.75 +10 +0 +0 +0 +")));
    CHECK(std::regex_search(out, std::regex("\nother +4194304 +0 +0 +0 +0 +0 +- +0 ")));

    const std::uint16_t port = d.metrics_port();
    REQUIRE(port != 0);
    const std::string scrape = http_get(port);
    CHECK(series(scrape, "shmalloc_cache_hits_total", "ctl-cache") ==
          "shmalloc_cache_hits_total{cache=\"ctl-cache\"} " + std::to_string(hits));
    CHECK(series(scrape, "shmalloc_cache_misses_total", "ctl-cache").ends_with(" " + std::to_string(misses)));
    CHECK(series(scrape, "shmalloc_cache_puts_total", "ctl-cache").ends_with(" " + std::to_string(put_count)));
    CHECK(series(scrape, "shmalloc_cache_items", "ctl-cache").ends_with(" " + std::to_string(put_count - erased)));
    CHECK(series(scrape, "shmalloc_cache_bytes", "ctl-cache").ends_with(" " + std::to_string(mine.bytes)));
    CHECK(series(scrape, "shmalloc_cache_max_bytes", "ctl-cache").ends_with(" " + std::to_string(budget)));
    CHECK(series(scrape, "shmalloc_cache_evictions_total", "ctl-cache").ends_with(" 0"));
    CHECK(series(scrape, "shmalloc_cache_hits_total", "other").ends_with(" 0"));
    CHECK(scrape.find("\nshmalloc_control_requests_total{op=\"caches\"} 2\n") != std::string::npos);  // the two ctl runs

    shmalloc_detach();
    CHECK(d.stop() == 0);
    CHECK_FALSE(segment::exists(d.heap));
  }
}
