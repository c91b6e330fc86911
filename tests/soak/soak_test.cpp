// Soak: shmallocd and a changing crowd of clients under a mixed workload
// for a fixed time: objects of every size class and large ones, frees of
// each other's objects, a shared cache, trims; clients that end by
// themselves and clients SIGKILLed at random. The daemon's resident memory,
// descriptors and threads and the heap's committed bytes must stay bounded
// after warm-up, and the heap and the cache must check out at the end.
//
// SHMALLOC_SOAK_SECONDS sets the length (default 60, as in CI; hours for a
// real soak). The figures are printed either way.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "shmalloc/cache.hpp"
#include "shmalloc/shmalloc.h"
#include "support/daemon_process.hpp"

using namespace shmalloc;
using namespace shmalloc::test;

namespace {

constexpr int crowd = 4;  // clients alive at once

// Every byte of an object follows from its handle and a seed.
void fill(void* p, std::size_t n, std::uint8_t seed) {
  const std::uint64_t h = shmalloc_handle(p);
  auto* b = static_cast<unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i) b[i] = static_cast<unsigned char>((h >> 3) + i * 7 + seed);
}
bool intact(const void* p, std::size_t n, std::uint8_t seed) {
  const std::uint64_t h = shmalloc_handle(p);
  const auto* b = static_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i)
    if (b[i] != static_cast<unsigned char>((h >> 3) + i * 7 + seed)) return false;
  return true;
}

std::size_t random_size(std::mt19937_64& rng) {
  const auto r = rng() % 100;
  if (r < 60) return 1 + rng() % 256;
  if (r < 95) return 257 + rng() % 4000;
  if (r < 99) return 4257 + rng() % 28000;
  return 33000 + rng() % 300000;  // large
}

std::string value_for(std::uint32_t k, std::size_t n) {
  std::string v(n, '\0');
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<char>(k * 31 + i);
  return v;
}

// Each client records the objects it holds in a table of the shared heap,
// as a service that must survive its workers' crashes would: a slot is set
// after the allocation and cleared before the free, so a client killed at
// any point leaves every object it held listed at most once, and the test
// frees them (losing at most the one object between an allocation and its
// record). Without this every kill would leak a client's objects for good,
// and the heap could not stay flat.
constexpr int holdings = 400;
struct holding_table {
  std::uint64_t handle[holdings];  // 0 = empty; written by one client at a time
};

// One client's life: ops operations, then a clean exit (unless killed).
// Exit 0: every object and value checked out.
int client_life(const std::string& socket, holding_table* held, std::uint64_t seed, int ops) {
  if (shmalloc_attach(socket.c_str()) != 0) return 3;
  std::mt19937_64 rng(seed);
  auto cache = shmalloc::cache::open("soak", 8 << 20);
  std::vector<std::size_t> sizes(holdings, 0);
  auto slot = [held](std::size_t i) -> std::uint64_t& { return held->handle[i]; };
  for (int i = 0; i < ops; ++i) {
    const auto r = rng() % 100;
    const std::size_t k = rng() % holdings;
    if (r < 45 && slot(k) == 0) {
      const std::size_t n = random_size(rng);
      void* p = shmalloc_alloc(n);
      if (p == nullptr) return 4;
      fill(p, n, static_cast<std::uint8_t>(seed));
      sizes[k] = n;
      std::atomic_ref<std::uint64_t>(slot(k)).store(shmalloc_handle(p), std::memory_order_release);
    } else if (r < 85 && slot(k) != 0) {
      void* p = shmalloc_pointer(slot(k));
      if (!intact(p, sizes[k], static_cast<std::uint8_t>(seed))) return 5;
      std::atomic_ref<std::uint64_t>(slot(k)).store(0, std::memory_order_release);
      shmalloc_free(p);
    } else if (r < 97) {
      const auto key_n = static_cast<std::uint32_t>(rng() % 3000);
      const std::string key = "k" + std::to_string(key_n);
      if (auto v = cache.get(key)) {
        if (v->str() != value_for(key_n, v->size())) return 6;
      } else {
        cache.put(key, value_for(key_n, 16 + key_n % 700));
      }
    } else {
      shmalloc_trim();
    }
  }
  for (std::size_t k = 0; k < holdings; ++k)
    if (const std::uint64_t h = slot(k); h != 0) {
      std::atomic_ref<std::uint64_t>(slot(k)).store(0, std::memory_order_release);
      shmalloc_free(shmalloc_pointer(h));
    }
  return 0;
}

// Frees what a killed client still held.
void free_holdings(holding_table* held) {
  for (std::uint64_t& h : held->handle)
    if (h != 0) {
      shmalloc_free(shmalloc_pointer(h));
      h = 0;
    }
}

struct sample {
  double t;
  std::uint64_t rss_kib, fds, threads, heap_sys;
};

std::uint64_t status_kib(pid_t pid, const char* field) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(field, 0) == 0) return std::strtoull(line.c_str() + std::strlen(field), nullptr, 10);
  return 0;
}

std::uint64_t entries(const std::string& dir) {
  std::error_code ec;
  return static_cast<std::uint64_t>(std::distance(std::filesystem::directory_iterator(dir, ec), {}));
}

sample take_sample(const daemon_process& d, double t) {
  raw_client c(d.socket);
  const std::string proc = "/proc/" + std::to_string(d.pid());
  return {t, status_kib(d.pid(), "VmRSS:"), entries(proc + "/fd"), entries(proc + "/task"),
          c.connected() ? daemon_stats(c).heap_sys_bytes : 0};
}

template <class F>
std::uint64_t max_of(const std::vector<sample>& s, std::size_t from, F f) {
  std::uint64_t m = 0;
  for (std::size_t i = from; i < s.size(); ++i) m = std::max<std::uint64_t>(m, f(s[i]));
  return m;
}

}  // namespace

TEST_CASE("soak: the daemon's memory, descriptors and threads stay bounded while clients come, go and die") {
  const char* env = std::getenv("SHMALLOC_SOAK_SECONDS");
  const double seconds = env != nullptr ? std::max(5.0, std::atof(env)) : 60.0;
  daemon_process d({"--keep-heap", "--capacity", "1G"});
  REQUIRE(d.started());

  REQUIRE(shmalloc_attach(d.socket.c_str()) == 0);  // the test frees what killed clients held
  std::vector<holding_table*> tables(crowd);
  for (auto& t : tables) {
    t = static_cast<holding_table*>(shmalloc_alloc(sizeof(holding_table)));
    REQUIRE(t != nullptr);
    std::memset(t, 0, sizeof *t);
  }
  std::mt19937_64 rng(2026);
  std::vector<pid_t> alive(crowd, -1);  // by table
  int started = 0, ended = 0, killed = 0, failed = 0;
  auto start_client = [&](int slot) {
    const std::uint64_t seed = rng();
    const int ops = 20000 + static_cast<int>(rng() % 200000);
    const pid_t pid = fork();
    if (pid == 0) {
      // A quarter of the clients sample their allocations: sampled objects
      // are freed by other processes too, and some clients die mid-sample.
      if (seed % 4 == 0) setenv("SHMALLOC_PROFILE_RATE", "262144", 1);
      int rc = 2;
      try {
        rc = client_life(d.socket, tables[static_cast<std::size_t>(slot)], seed, ops);
      } catch (...) {
      }
      _exit(rc);
    }
    alive[static_cast<std::size_t>(slot)] = pid;
    ++started;
  };
  for (int i = 0; i < crowd; ++i) start_client(i);

  std::vector<sample> samples;
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  double next_sample = 0;
  while (elapsed() < seconds) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (rng() % 20 == 0) {  // about twice a second, a client dies mid-work
      kill(alive[rng() % crowd], SIGKILL);
      ++killed;
    }
    for (int i = 0; i < crowd; ++i) {
      int status = 0;
      const auto slot = static_cast<std::size_t>(i);
      if (waitpid(alive[slot], &status, WNOHANG) != alive[slot]) continue;
      if (WIFEXITED(status) && WEXITSTATUS(status) != 0) {
        ++failed;
        MESSAGE("client ", alive[slot], " exited with ", WEXITSTATUS(status));
      }
      if (WIFEXITED(status)) ++ended;
      free_holdings(tables[slot]);
      start_client(i);
    }
    if (elapsed() >= next_sample) {
      samples.push_back(take_sample(d, elapsed()));
      next_sample += 1.0;
    }
  }
  for (pid_t pid : alive) kill(pid, SIGKILL);
  for (pid_t pid : alive) waitpid(pid, nullptr, 0);
  killed += crowd;
  for (holding_table* t : tables) {
    free_holdings(t);
    shmalloc_free(t);
  }
  CHECK(failed == 0);

  // Bounded after warm-up (the first third): no more than a little above
  // what the middle third reached, for each figure.
  REQUIRE(samples.size() >= 5);
  const std::size_t warm = samples.size() / 3, late = 2 * samples.size() / 3;
  auto rss = [](const sample& s) { return s.rss_kib; };
  auto fds = [](const sample& s) { return s.fds; };
  auto threads = [](const sample& s) { return s.threads; };
  auto heap = [](const sample& s) { return s.heap_sys; };
  const std::vector<sample> middle(samples.begin() + static_cast<long>(warm), samples.begin() + static_cast<long>(late));
  MESSAGE("soak ", seconds, " s: ", started, " clients started, ", ended, " ended by themselves, ", killed,
          " killed; daemon RSS max ", max_of(middle, 0, rss), " KiB (middle third) / ", max_of(samples, late, rss),
          " KiB (last third), fds ", max_of(middle, 0, fds), " / ", max_of(samples, late, fds), ", threads ",
          max_of(middle, 0, threads), " / ", max_of(samples, late, threads), ", heap_sys ",
          max_of(middle, 0, heap) >> 20, " / ", max_of(samples, late, heap) >> 20, " MiB");
  CHECK(max_of(samples, late, rss) <= max_of(middle, 0, rss) + 16 * 1024);
  // One descriptor and one thread per connection: the crowd plus observers.
  CHECK(max_of(samples, warm, fds) <= max_of(samples, 0, fds) + 2);
  CHECK(max_of(samples, warm, fds) <= 32);
  CHECK(max_of(samples, warm, threads) <= 8 + 2 * crowd);
  CHECK(max_of(samples, late, heap) <= max_of(middle, 0, heap) + max_of(middle, 0, heap) / 2 + (16 << 20));

  // The cache checks out (a killed writer's shard repaired, dead readers
  // taken back), then the heap does once the daemon has stopped.
  {
    auto cache = shmalloc::cache::open("soak");
    CHECK(cache.check() == 0);
    MESSAGE("cache: ", cache.stats().items, " items, ", cache.stats().repairs, " shard repairs");
  }
  // The profile table reads back, and holds no more than it can.
  std::string sites;
  CHECK(run_ctl("leaks --sites --json --socket " + d.socket, &sites) == 0);
  MESSAGE("leaks --sites at the end: ", sites.substr(0, 200));
  shmalloc_detach();
  check_heap_after(d);
}
