// A cache writer killed mid-put (issue 23, item 3): a writer process puts
// values of mixed sizes (large ones among them) and is killed with SIGKILL
// after a random count of puts, many times over. Then a last process checks
// the cache, erases every key and leaves; once the daemon has no client,
// its stats must be back at the baseline taken before the first writer:
// nothing a kill interrupted stays allocated, and heap_alloc_bytes does not
// drift. Moments are counted (puts a writer reports), not timed.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "shmalloc/cache.h"
#include "shmalloc/shmalloc.h"
#include "support/daemon_process.hpp"

using namespace shmalloc;
using namespace shmalloc::test;

namespace {

constexpr int keys = 64;
constexpr std::uint64_t budget = 64ULL << 20;
constexpr std::size_t value_sizes[] = {100, 3000, 20000, 40000, 100000, 250000};
constexpr char cache_name[] = "crash-cache";

std::string key(int i) { return "key:" + std::to_string(i); }

std::uint64_t kills_from_env() {
  const char* v = std::getenv("SHMALLOC_CACHE_KILLS");
  const long n = v == nullptr ? 0 : std::strtol(v, nullptr, 10);
  return n > 0 ? static_cast<std::uint64_t>(n) : 200;
}

// The child: puts forever, writing a byte to `out` after each put.
[[noreturn]] void writer(const std::string& socket, int out, unsigned seed) {
  if (shmalloc_attach(socket.c_str()) != 0) _exit(2);
  shmalloc_cache* c = nullptr;
  if (shmalloc_cache_open(cache_name, budget, &c) != 0) _exit(3);
  std::vector<char> value(value_sizes[std::size(value_sizes) - 1], 'v');
  for (unsigned i = seed;; ++i) {
    const std::string k = key(static_cast<int>(i % keys));
    const std::size_t n = value_sizes[(i / keys + i) % std::size(value_sizes)];
    if (shmalloc_cache_put(c, k.data(), k.size(), value.data(), n, 0) != 0) _exit(4);
    const char b = 1;
    if (write(out, &b, 1) != 1) _exit(5);
  }
}

// Starts a writer, lets it make `puts` puts, kills it; its exit status.
int kill_writer_after(const std::string& socket, int puts, unsigned seed) {
  int p[2];
  REQUIRE(pipe(p) == 0);
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    close(p[0]);
    writer(socket, p[1], seed);
  }
  close(p[1]);
  char b = 0;
  for (int i = 0; i < puts && read(p[0], &b, 1) == 1; ++i) {
  }
  kill(pid, SIGKILL);
  int status = 0;
  waitpid(pid, &status, 0);
  close(p[0]);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

// In a child process: opens the cache (making it if need be), checks it,
// erases every key if asked, checks again (which frees what was retired)
// and detaches. 0, or what went wrong.
int settle(const std::string& socket, bool erase_all) {
  const pid_t pid = fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    if (shmalloc_attach(socket.c_str()) != 0) _exit(2);
    shmalloc_cache* c = nullptr;
    if (shmalloc_cache_open(cache_name, budget, &c) != 0) _exit(3);
    if (shmalloc_cache_check(c) != 0) _exit(4);
    for (int i = 0; erase_all && i < keys; ++i) shmalloc_cache_erase(c, key(i).data(), key(i).size());
    if (shmalloc_cache_check(c) != 0) _exit(5);
    shmalloc_cache_stats s{};
    shmalloc_cache_stats_get(c, &s);
    if (erase_all && (s.items != 0 || s.retired_items != 0)) _exit(6);
    shmalloc_cache_close(c);
    shmalloc_detach();
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

// The daemon's stats once it has no client left (the dead reclaimed).
proto::stats_msg stats_without_clients(const std::string& socket) {
  for (int i = 0; i < 10000; ++i) {
    raw_client c(socket);
    REQUIRE(c.connected());
    const proto::stats_msg s = daemon_stats(c);
    if (s.clients == 0) return s;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  FAIL("the daemon keeps a client");
  return {};
}

}  // namespace

TEST_SUITE("cache crash") {
  TEST_CASE("a cache writer killed mid-put leaves nothing allocated once every key is erased") {
    daemon_process d({"--keep-heap"}, "cache-crash");
    REQUIRE(d.started());
    REQUIRE(settle(d.socket, false) == 0);  // the cache exists: its header and buckets are the baseline
    const proto::stats_msg before = stats_without_clients(d.socket);

    const std::uint64_t kills = kills_from_env();
    std::mt19937 rng(23);
    std::uint64_t killed = 0;
    for (std::uint64_t k = 0; k < kills; ++k) {
      const int puts = std::uniform_int_distribution<int>(1, 40)(rng);
      if (kill_writer_after(d.socket, puts, static_cast<unsigned>(rng())) == 128 + SIGKILL) ++killed;
    }
    CHECK(killed == kills);
    CHECK(settle(d.socket, true) == 0);
    const proto::stats_msg after = stats_without_clients(d.socket);
    std::printf("cache crash: %llu writers killed; heap_objects %llu -> %llu, large_objects %llu -> %llu, "
                "large_bytes %llu -> %llu, heap_alloc_bytes %llu -> %llu\n",
                static_cast<unsigned long long>(killed), static_cast<unsigned long long>(before.heap_objects),
                static_cast<unsigned long long>(after.heap_objects),
                static_cast<unsigned long long>(before.large_objects),
                static_cast<unsigned long long>(after.large_objects),
                static_cast<unsigned long long>(before.large_bytes), static_cast<unsigned long long>(after.large_bytes),
                static_cast<unsigned long long>(before.heap_alloc_bytes),
                static_cast<unsigned long long>(after.heap_alloc_bytes));
    CHECK(after.large_objects == before.large_objects);
    CHECK(after.large_bytes == before.large_bytes);
    CHECK(after.heap_objects == before.heap_objects);
    CHECK(after.heap_alloc_bytes == before.heap_alloc_bytes);
    check_heap_after(d);
  }
}
