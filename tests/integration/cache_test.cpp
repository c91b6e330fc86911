// The shared cache (cache/) against a live shmallocd: the C and C++ APIs,
// bad input, the byte budget, TTLs, threads and processes hammering one
// cache with content checks, and processes SIGKILLed mid-operation with
// the cache then checked consistent and its memory accounted for.
#include <doctest/doctest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "shmalloc/cache.hpp"
#include "shmalloc/shmalloc.h"
#include "support/daemon_process.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc::test;

namespace {

struct attached {
  daemon_process d;
  attached() {
    REQUIRE(d.started());
    REQUIRE(shmalloc_attach(d.socket.c_str()) == 0);
  }
  ~attached() { shmalloc_detach(); }
  std::uint64_t live_objects() {
    raw_client c(d.socket);
    REQUIRE(c.connected());
    return daemon_stats(c).heap_objects;
  }
};

// Values describe themselves: the key's number, the version and the length
// come first, and every other byte follows from them. A value torn, mixed
// with another key's or read after it was freed and reused cannot check out.
std::string key_of(std::uint32_t k) { return "key:" + std::to_string(k); }

std::string value_of(std::uint32_t k, std::uint32_t version, std::size_t len) {
  std::string v(std::max<std::size_t>(len, 12), '\0');
  std::memcpy(v.data(), &k, 4);
  std::memcpy(v.data() + 4, &version, 4);
  const auto n = static_cast<std::uint32_t>(v.size());
  std::memcpy(v.data() + 8, &n, 4);
  for (std::size_t i = 12; i < v.size(); ++i) v[i] = static_cast<char>(k * 131 + version * 7 + i);
  return v;
}

bool value_ok(std::uint32_t k, std::string_view v) {
  if (v.size() < 12) return false;
  std::uint32_t key = 0, version = 0, n = 0;
  std::memcpy(&key, v.data(), 4);
  std::memcpy(&version, v.data() + 4, 4);
  std::memcpy(&n, v.data() + 8, 4);
  return key == k && n == v.size() && v == value_of(k, version, n);
}

// Values up to 600 bytes, and with large_ones one in 50 over 32 KiB (a
// span of its own; the cache's budget must allow it: 4 MiB and more).
std::size_t random_len(std::mt19937& rng, bool large_ones) {
  return 12 + rng() % 600 + (large_ones && rng() % 50 == 0 ? 40000 : 0);
}

// A share of a mixed workload: puts, gets (checked), erases. Returns false
// on a value that does not check out.
bool hammer(shmalloc::cache& c, std::uint32_t seed, int ops, std::uint32_t keys) {
  const bool large_ones = c.stats().max_bytes >= (4 << 20);
  std::mt19937 rng(seed);
  for (int i = 0; i < ops; ++i) {
    const std::uint32_t k = rng() % keys;
    const auto r = rng() % 10;
    if (r < 6) {
      if (auto v = c.get(key_of(k)); v && !value_ok(k, v->str())) return false;
    } else if (r < 9) {
      c.put(key_of(k), value_of(k, rng(), random_len(rng, large_ones)));
    } else {
      c.erase(key_of(k));
    }
  }
  return true;
}

// Runs fn in a forked child that never returns into the test runner: any
// exception ends the child with 2 (else it would run the rest of the suite).
template <class Fn>
pid_t fork_child(Fn fn) {
  const pid_t pid = fork();
  if (pid != 0) return pid;
  int rc = 2;
  try {
    rc = fn() ? 0 : 1;
  } catch (...) {
  }
  _exit(rc);
}

int wait_exit(pid_t pid) {
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace

TEST_SUITE("shared cache") {
  TEST_CASE("cache put, get, replace, erase through the C++ and C APIs") {
    attached a;
    auto c = shmalloc::cache::open("basic", 8 << 20);
    CHECK_FALSE(c.get("absent"));
    c.put("greeting", "hello");
    {
      auto v = c.get("greeting");
      REQUIRE(v);
      CHECK(v->str() == "hello");
    }
    c.put("greeting", "hello again, a longer value");
    std::string copy;
    CHECK(c.get_copy("greeting", copy));
    CHECK(copy == "hello again, a longer value");
    c.put("empty", "");
    CHECK(c.get_copy("empty", copy));
    CHECK(copy.empty());

    // The C API: copy into a buffer, too small says how much is needed.
    char buf[64];
    size_t n = 0;
    CHECK(shmalloc_cache_get(c.native(), "greeting", 8, buf, 4, &n) == -16);
    CHECK(n == 27);
    CHECK(shmalloc_cache_get(c.native(), "greeting", 8, buf, sizeof buf, &n) == 0);
    CHECK(std::string(buf, n) == "hello again, a longer value");
    CHECK(shmalloc_cache_get(c.native(), "nope", 4, buf, sizeof buf, &n) == -7);

    CHECK(c.erase("greeting"));
    CHECK_FALSE(c.erase("greeting"));
    CHECK_FALSE(c.get("greeting"));
    const auto s = c.stats();
    CHECK(s.items == 1);  // "empty"
    CHECK(s.puts == 3);
    CHECK(s.erases == 1);
    CHECK(s.hits == 5);   // two views, a copy, two C copies (one too small: still a hit)
    CHECK(s.misses == 3);
    CHECK(c.check() == 0);

    // Another opener of the same name sees the same entries; the budget
    // stays the creator's.
    auto again = shmalloc::cache::open("basic");
    CHECK(again.get_copy("empty", copy));
    CHECK(again.stats().max_bytes == 8 << 20);
  }

  TEST_CASE("cache: a thread that used a cache may outlive shmalloc_detach and exit cleanly") {
    // In a child: a crash there is a failed status here, not a dead runner.
    daemon_process d;
    REQUIRE(d.started());
    const std::string socket = d.socket;
    const int rc = run_in_child([&socket] {
      if (shmalloc_attach(socket.c_str()) != 0) return 1;
      shmalloc_cache* c = nullptr;
      if (shmalloc_cache_open("outlives", 1 << 20, &c) != 0) return 2;
      std::atomic<int> stage{0};
      std::atomic<bool> ok{true};
      std::thread reader([&] {
        for (std::uint32_t k = 0; k < 200; ++k) {
          const std::string key = key_of(k), value = value_of(k, 1, 100);
          if (shmalloc_cache_put(c, key.data(), key.size(), value.data(), value.size(), 0) != 0) ok = false;
          const void* v = nullptr;
          std::size_t n = 0;
          if (shmalloc_cache_pin(c, key.data(), key.size(), &v, &n) != 0) ok = false;
          shmalloc_cache_unpin(c);
        }
        stage = 1;
        while (stage.load() != 2) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      });  // holds its reader slot and its thread cache until it exits
      while (stage.load() != 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      shmalloc_detach();
      stage = 2;
      reader.join();
      return ok.load() ? 0 : 3;
    });
    CHECK(rc == 0);
    raw_client observer(d.socket);
    CHECK(daemon_stats(observer).clients == 0);
  }

  TEST_CASE("cache bad input gets a clear error and changes nothing") {
    attached a;
    shmalloc_cache* c = nullptr;
    CHECK(shmalloc_cache_open("missing", 0, &c) == -7);                 // open-only, none there
    CHECK(shmalloc_cache_open("has space", 1 << 20, &c) == -4);
    CHECK(shmalloc_cache_open("", 1 << 20, &c) == -4);
    CHECK(shmalloc_cache_open(std::string(58, 'n').c_str(), 1 << 20, &c) == -4);
    CHECK(shmalloc_cache_open("tiny", 1000, &c) == -4);                 // under 1 MiB
    CHECK(shmalloc_cache_open(nullptr, 1 << 20, &c) == -4);

    // A root of that name that is not a cache.
    void* other = shmalloc_alloc(100);
    std::memset(other, 0xab, 100);
    REQUIRE(shmalloc_publish("cache:impostor", shmalloc_handle(other)) == 0);
    CHECK(shmalloc_cache_open("impostor", 1 << 20, &c) == -9);

    REQUIRE(shmalloc_cache_open("strict", 1 << 20, &c) == 0);
    const std::string huge((1 << 20) / 64 + 1, 'x');  // over a shard's share of the budget
    CHECK(shmalloc_cache_put(c, "k", 1, huge.data(), huge.size(), 0) == -15);
    CHECK(shmalloc_cache_put(c, "", 0, "v", 1, 0) == -15);
    const std::string long_key(4097, 'k');
    CHECK(shmalloc_cache_put(c, long_key.data(), long_key.size(), "v", 1, 0) == -15);
    CHECK(shmalloc_cache_put(c, nullptr, 3, "v", 1, 0) == -4);
    size_t n = 0;
    CHECK(shmalloc_cache_get(c, "", 0, nullptr, 0, &n) == -15);
    CHECK(shmalloc_cache_erase(c, "", 0) == -15);
    shmalloc_cache_stats s{};
    REQUIRE(shmalloc_cache_stats_get(c, &s) == 0);
    CHECK(s.items == 0);
    CHECK(s.puts == 0);
    CHECK(shmalloc_cache_check(c) == 0);
    shmalloc_cache_close(c);
    CHECK(std::string(shmalloc_strerror(-15)) == "key or value too large for the cache");
  }

  TEST_CASE("cache keeps to its byte budget by eviction, and expires entries") {
    attached a;
    const std::uint64_t budget = 2 << 20;
    auto c = shmalloc::cache::open("budget", budget);
    std::mt19937 rng(7);
    for (std::uint32_t k = 0; k < 20000; ++k) c.put(key_of(k), value_of(k, 1, 100 + rng() % 900));
    auto s = c.stats();
    CHECK(s.bytes <= budget);
    CHECK(s.bytes > budget / 2);  // eviction takes what it must, not everything
    CHECK(s.evictions > 0);
    CHECK(s.items + s.evictions == 20000);
    CHECK(s.retired_items <= 16 * 64);  // freed in batches: at most a batch per shard waits
    CHECK(s.bytes + s.retired_bytes <= budget + budget / 8);
    int found = 0;
    for (std::uint32_t k = 0; k < 20000; ++k) {
      std::string v;
      if (c.get_copy(key_of(k), v)) {
        ++found;
        REQUIRE(value_ok(k, v));
      }
    }
    CHECK(found == static_cast<int>(s.items));
    CHECK(c.check() == 0);

    // A TTL: the entry is a miss once its time has passed, then swept.
    c.put("short-lived", "soon gone", std::chrono::milliseconds(1));
    c.put("long-lived", "stays", std::chrono::hours(1));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    CHECK_FALSE(c.get("short-lived"));
    CHECK(c.get("long-lived"));
  }

  TEST_CASE("cache expired entries are taken out by later puts, and counted") {
    attached a;
    auto c = shmalloc::cache::open("ttl", 64 << 20);  // far from full: no eviction
    for (std::uint32_t k = 0; k < 200; ++k) c.put(key_of(k), value_of(k, 1, 50), std::chrono::milliseconds(1));
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // past every deadline
    for (std::uint32_t k = 0; k < 200; ++k) CHECK_FALSE(c.get(key_of(k)));
    // Each put moves its shard's hand one bucket: enough puts pass them all.
    const std::uint32_t buckets = 64 * 4096;  // shards x buckets per shard at 64 MiB
    for (std::uint32_t k = 1000; k < 1000 + 4 * buckets; ++k) c.put(key_of(k % 5000 + 1000), "x");
    const auto s = c.stats();
    CHECK(s.expirations == 200);
    CHECK(s.evictions == 0);
    CHECK(s.items == 5000);
    CHECK(c.check() == 0);
  }

  TEST_CASE("cache memory is all given back: live objects are the cache's own") {
    attached a;
    auto c = shmalloc::cache::open("accounted", 1 << 20);
    const std::uint64_t base = a.live_objects();  // the header and its 64 bucket arrays among them
    std::mt19937 rng(3);
    for (std::uint32_t k = 0; k < 5000; ++k) c.put(key_of(k % 700), value_of(k, k, random_len(rng, false)));
    for (std::uint32_t k = 0; k < 700; k += 3) c.erase(key_of(k));
    REQUIRE(c.check() == 0);
    const auto s = c.stats();
    CHECK(s.retired_items == 0);
    CHECK(a.live_objects() == base + s.items);
  }

  TEST_CASE("cache threads: readers and writers of one process, values always whole") {
    attached a;
    auto c = shmalloc::cache::open("threads", 4 << 20);
    std::atomic<bool> bad{false};
    std::vector<std::thread> ts;
    for (std::uint32_t t = 0; t < 4; ++t)
      ts.emplace_back([&, t] {
        try {
          if (!hammer(c, 100 + t, 6000, 300)) bad = true;
        } catch (...) {
          bad = true;
        }
      });
    for (auto& t : ts) t.join();
    CHECK_FALSE(bad.load());
    CHECK(c.check() == 0);
    const auto s = c.stats();
    CHECK(s.hits + s.misses > 0);
    CHECK(s.retired_items == 0);
  }

  TEST_CASE("cache processes: four processes and their threads share one cache") {
    attached a;
    auto c = shmalloc::cache::open("procs", 4 << 20);
    const std::uint64_t base = a.live_objects();
    std::vector<pid_t> kids;
    for (std::uint32_t p = 0; p < 4; ++p) {
      kids.push_back(fork_child([&] {
        bool thread_ok = false;
        std::thread t([&] {
          try {
            thread_ok = hammer(c, 1000 + p, 4000, 500);
          } catch (...) {
          }
        });
        const bool ok = hammer(c, 2000 + p, 4000, 500);
        t.join();
        return ok && thread_ok;
      }));
    }
    for (pid_t pid : kids) CHECK(wait_exit(pid) == 0);
    REQUIRE(c.check() == 0);
    const auto s = c.stats();
    CHECK(s.puts > 0);
    CHECK(s.hits > 0);
    CHECK(s.retired_items == 0);
    CHECK(a.live_objects() == base + s.items);  // nothing leaked by processes that exited
    for (std::uint32_t k = 0; k < 500; ++k)
      if (auto v = c.get(key_of(k))) CHECK(value_ok(k, v->str()));
  }

  TEST_CASE("cache survives processes SIGKILLed in the middle of puts, erases and evictions") {
    attached a;
    // A small budget, so most puts evict and reclaim as well.
    auto c = shmalloc::cache::open("crashes", 1 << 20);
    const std::uint64_t base = a.live_objects();
    std::mt19937 rng(11);
    constexpr int kills = 40;
    for (int round = 0; round < kills; ++round) {
      const pid_t pid = fork_child([&] { return hammer(c, 5000 + static_cast<std::uint32_t>(round), 1 << 30, 2000); });
      // Wherever the kill lands, the checks below must hold: the delay only
      // spreads the points.
      std::this_thread::sleep_for(std::chrono::microseconds(500 + rng() % 20000));
      kill(pid, SIGKILL);
      CHECK(wait_exit(pid) == 128 + SIGKILL);
      if (round % 5 == 0) CHECK(hammer(c, 9000 + static_cast<std::uint32_t>(round), 500, 2000));
    }
    CHECK(c.check() == 0);
    const auto s = c.stats();
    CHECK(s.bytes <= (1 << 20));
    CHECK(s.retired_items == 0);
    for (std::uint32_t k = 0; k < 2000; ++k)
      if (auto v = c.get(key_of(k))) REQUIRE(value_ok(k, v->str()));
    // Every live object is an entry of the cache, but for at most one in
    // flight per kill (between the allocator's return and the pending store,
    // or between leaving the retire list and the free).
    const std::uint64_t live = a.live_objects();
    CHECK(live >= base + s.items);
    CHECK(live - (base + s.items) <= static_cast<std::uint64_t>(kills));
    MESSAGE("objects lost to ", kills, " kills: ", live - (base + s.items), "; shard repairs: ", s.repairs);
  }

  // Found by review: a child that dropped a pin it inherited ended its
  // parent's read section, and the parent's pinned value was freed and
  // reused under it.
  TEST_CASE("cache a forked child unpinning what it inherited leaves the parent's pin alone") {
    attached a;
    auto c = shmalloc::cache::open("forkpin", 1 << 20);
    const std::string original(1000, 'A');
    c.put("k", original);
    auto pinned = c.get("k");
    REQUIRE(pinned);
    const pid_t pid = fork_child([&] {
      shmalloc_cache_unpin(c.native());  // the parent's pin, inherited
      return true;
    });
    CHECK(wait_exit(pid) == 0);
    // Replacements retire the pinned entry and reclaim in batches: without
    // the parent's epoch in its slot, its value would be freed and reused.
    for (int i = 0; i < 200; ++i) c.put("k", std::string(1000, static_cast<char>('a' + i % 26)));
    CHECK(pinned->str() == original);
  }

  TEST_CASE("cache closed while a view lives keeps the view's value until it goes") {
    attached a;
    auto writer = shmalloc::cache::open("closing", 1 << 20);
    const std::string original(1000, 'B');
    writer.put("k", original);
    shmalloc_cache* c = nullptr;
    REQUIRE(shmalloc_cache_open("closing", 0, &c) == 0);
    const void* v = nullptr;
    size_t n = 0;
    REQUIRE(shmalloc_cache_pin(c, "k", 1, &v, &n) == 0);
    shmalloc_cache_close(c);  // a misuse, but the pin must still hold
    for (int i = 0; i < 200; ++i) writer.put("k", std::string(1000, static_cast<char>('a' + i % 26)));
    CHECK(std::string(static_cast<const char*>(v), n) == original);
    shmalloc_cache_unpin(c);  // the last pin gives the slot back
    CHECK(writer.check() == 0);
    CHECK(writer.stats().retired_items == 0);
  }

  // Found by review: a value within a shard's share of the budget whose
  // size class was not got put, then evicted with its whole shard.
  TEST_CASE("cache a value whose size class is over a shard's share is refused, not put and evicted") {
    attached a;
    shmalloc_cache* c = nullptr;
    REQUIRE(shmalloc_cache_open("edge", 1600000, &c) == 0);  // 25,000 bytes a shard
    const std::string v(24600, 'x');                          // 24,664 bytes with its header: a 27,264-byte class
    CHECK(shmalloc_cache_put(c, "k", 1, v.data(), v.size(), 0) == -15);
    const std::string fits(20000, 'y');
    CHECK(shmalloc_cache_put(c, "k", 1, fits.data(), fits.size(), 0) == 0);
    size_t n = 0;
    std::string out(30000, '\0');
    CHECK(shmalloc_cache_get(c, "k", 1, out.data(), out.size(), &n) == 0);
    CHECK(n == fits.size());
    shmalloc_cache_stats st{};
    REQUIRE(shmalloc_cache_stats_get(c, &st) == 0);
    CHECK(st.evictions == 0);
    shmalloc_cache_close(c);
  }

  TEST_CASE("cache a forked child gets reader slots of its own") {
    attached a;
    auto c = shmalloc::cache::open("forked", 1 << 20);
    c.put("before", "fork");
    auto pinned = c.get("before");  // the parent holds a read section across the fork
    REQUIRE(pinned);
    const pid_t pid = fork_child([&] {
      auto v = c.get("before");
      if (!v || v->str() != "fork") return false;
      c.put("child", "was here");
      return true;
    });
    CHECK(wait_exit(pid) == 0);
    std::string v;
    CHECK(c.get_copy("child", v));
    CHECK(v == "was here");
    CHECK(c.stats().readers >= 2);
  }
}
