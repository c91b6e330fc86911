// crash_workload: the client side of the crash-point campaign
// (client_crash_test.cpp), linked with libshmalloc built with crash points.
//
//   crash_workload run <socket> <dir>   a deterministic workload over every
//       slow path: refills of several classes, releases, tiny objects, large
//       objects and the cache of freed ones, publish/lookup/unpublish, remote
//       frees (of <dir>/foreign, objects another process allocated, and of
//       objects another thread allocated), trims, threads that come and go.
//       Every object it holds is in <dir>/record (crash_record.hpp). It frees
//       everything, detaches and exits 0, unless a crash point kills it.
//   crash_workload prep <socket> <dir>  frees what <dir>/foreign and
//       <dir>/record say is held, removes the record, unpublishes the run's
//       names, and allocates new foreign objects into <dir>/foreign.
//   crash_workload clean <socket> <dir>  the same without new foreign objects.
//   crash_workload cache <socket> <dir>  puts values of mixed sizes (large
//       ones among them) into the shared cache "crash-cache" and erases some
//       keys: the cache's put, replace, erase and reclaim paths.
//   crash_workload cache-clean <socket> <dir>  opens that cache (making it
//       if need be), checks it (which settles a dead writer's slot), erases
//       every key and checks again, so that the cache holds nothing retired
//       either; exits 0 only if both checks found nothing wrong.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "shmalloc/cache.h"
#include "shmalloc/shmalloc.h"
#include "tests/crash/crash_record.hpp"

using namespace shmalloc::crash_test;

namespace {

constexpr int rounds = 5;
constexpr int foreign_objects = 48;
constexpr std::size_t small_sizes[] = {8, 24, 48, 100, 256, 500, 1024, 3000, 8192, 20000, 32768};

struct object {
  void* p;
  char kind;
};

class workload {
 public:
  explicit workload(const std::string& dir) : rec_(dir + "/record") {}
  bool ok() const noexcept { return rec_.ok(); }

  object alloc(std::size_t n, char kind) {
    void* p = kind == 't' ? shmalloc_alloc_noscan(n) : shmalloc_alloc(n);
    if (p == nullptr) {
      std::fprintf(stderr, "crash_workload: allocation of %zu failed\n", n);
      std::exit(3);
    }
    rec_.held(kind, shmalloc_handle(p));
    std::memset(p, 0x5a, n < 64 ? n : 64);
    return {p, kind};
  }
  void release(void* p) {
    rec_.freeing(shmalloc_handle(p));
    shmalloc_free(p);
  }
  void release(std::uint64_t h) {
    rec_.freeing(h);
    shmalloc_free(shmalloc_pointer(h));
  }

  void round(int r, std::vector<std::uint64_t>& foreign) {
    // Small objects of several classes, half freed at once (refills, full
    // spans given back in batches).
    std::vector<void*> batch;
    for (int i = 0; i < 300; ++i)
      batch.push_back(alloc(small_sizes[static_cast<std::size_t>(i + r) % std::size(small_sizes)], 's').p);
    for (std::size_t i = 0; i < batch.size(); ++i) {
      if (i % 2 == 0) release(batch[i]);
      else held_.push_back(batch[i]);
    }
    // Tiny objects.
    for (int i = 0; i < 120; ++i) {
      void* p = alloc(static_cast<std::size_t>(1 + (i + r) % 15), 't').p;
      if (i % 3 == 0) held_.push_back(p);
      else release(p);
    }
    // Large objects: freed ones come back from the process's cache.
    for (int i = 0; i < 3; ++i) {
      const std::size_t n = 40000 + static_cast<std::size_t>((r * 3 + i) % 7) * 90000;
      void* a = alloc(n, 'l').p;
      release(a);
      held_.push_back(alloc(n, 'l').p);
    }
    // A root, published, looked up and taken down.
    const std::string name = "crash-" + std::to_string(r % 4);
    const std::uint64_t h = shmalloc_handle(held_.back());
    std::uint64_t got = 0;
    if (shmalloc_publish(name.c_str(), h) != 0 || shmalloc_lookup(name.c_str(), &got) != 0 || got != h ||
        shmalloc_unpublish(name.c_str()) != 0)
      std::exit(4);
    // Remote frees of another process's objects.
    for (int i = 0; i < foreign_objects / rounds && !foreign.empty(); ++i) {
      release(foreign.back());
      foreign.pop_back();
    }
    // A thread: its own cache (opened, then closed or kept spare), its own
    // objects, and remote frees of this thread's.
    std::thread t([this, r] {
      std::vector<void*> mine;
      for (int i = 0; i < 200; ++i) mine.push_back(alloc(small_sizes[static_cast<std::size_t>(i * 3 + r) % 6], 's').p);
      for (std::size_t i = 0; i < mine.size(); i += 2) release(mine[i]);
      for (int i = 0; i < 40 && !held_.empty(); ++i) {
        release(held_.back());
        held_.pop_back();
      }
      for (std::size_t i = 1; i < mine.size(); i += 2) held_.push_back(mine[i]);
    });
    t.join();
    if (r % 3 == 2) shmalloc_trim();
  }

  void finish() {
    for (void* p : held_) release(p);
    held_.clear();
    shmalloc_trim();
  }

 private:
  record_writer rec_;
  std::vector<void*> held_;
};

std::vector<std::uint64_t> read_foreign(const std::string& dir) {
  holdings f;
  apply_record(dir + "/foreign", f);
  std::vector<std::uint64_t> v;
  for (const auto& [h, kind] : f) v.push_back(h);
  return v;
}

int run(const std::string& dir) {
  std::vector<std::uint64_t> foreign = read_foreign(dir);
  workload w(dir);
  if (!w.ok()) return 2;
  for (int r = 0; r < rounds; ++r) w.round(r, foreign);
  w.finish();
  shmalloc_detach();
  return 0;
}

int prep(const std::string& dir, int foreign) {
  holdings held;
  apply_record(dir + "/foreign", held);
  apply_record(dir + "/record", held);
  for (const auto& [h, kind] : held) shmalloc_free(shmalloc_pointer(h));
  std::remove((dir + "/record").c_str());
  std::remove((dir + "/foreign").c_str());
  for (int r = 0; r < 4; ++r) shmalloc_unpublish(("crash-" + std::to_string(r)).c_str());
  {
    record_writer f(dir + "/foreign");
    for (int i = 0; i < foreign; ++i) {
      const std::size_t n = i % 8 == 7 ? 50000 : small_sizes[static_cast<std::size_t>(i) % std::size(small_sizes)];
      void* p = shmalloc_alloc(n);
      if (p == nullptr) return 3;
      f.held(n > 32768 ? 'l' : 's', shmalloc_handle(p));
    }
  }
  shmalloc_detach();
  return 0;
}

constexpr char cache_name[] = "crash-cache";
constexpr std::uint64_t cache_budget = 64ULL << 20;
constexpr int cache_keys = 32;
constexpr std::size_t cache_value_sizes[] = {100, 3000, 20000, 40000, 100000, 250000};

std::string cache_key(int i) { return "key:" + std::to_string(i); }

int cache_run() {
  shmalloc_cache* c = nullptr;
  if (shmalloc_cache_open(cache_name, cache_budget, &c) != 0) return 3;
  std::vector<char> value(cache_value_sizes[std::size(cache_value_sizes) - 1], 'v');
  for (int i = 0; i < 120; ++i) {
    const std::string k = cache_key(i % cache_keys);
    const std::size_t n = cache_value_sizes[static_cast<std::size_t>(i * 5 + i / cache_keys) % std::size(cache_value_sizes)];
    if (shmalloc_cache_put(c, k.data(), k.size(), value.data(), n, 0) != 0) return 4;
    if (i % 4 == 3) {
      const std::string gone = cache_key((i * 7) % cache_keys);
      shmalloc_cache_erase(c, gone.data(), gone.size());
    }
  }
  shmalloc_cache_close(c);
  shmalloc_detach();
  return 0;
}

int cache_clean() {
  shmalloc_cache* c = nullptr;
  if (shmalloc_cache_open(cache_name, cache_budget, &c) != 0) return 3;
  if (shmalloc_cache_check(c) != 0) return 4;
  for (int i = 0; i < cache_keys; ++i) shmalloc_cache_erase(c, cache_key(i).data(), cache_key(i).size());
  if (shmalloc_cache_check(c) != 0) return 5;
  shmalloc_cache_stats s{};
  shmalloc_cache_stats_get(c, &s);
  if (s.items != 0 || s.retired_items != 0) return 6;
  shmalloc_cache_close(c);
  shmalloc_detach();
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: crash_workload run|prep|clean|cache|cache-clean <socket> <dir>\n");
    return 2;
  }
  if (shmalloc_attach(argv[2]) != 0) return 2;
  const std::string mode = argv[1];
  if (mode == "run") return run(argv[3]);
  if (mode == "prep") return prep(argv[3], foreign_objects);
  if (mode == "clean") return prep(argv[3], 0);
  if (mode == "cache") return cache_run();
  if (mode == "cache-clean") return cache_clean();
  return 2;
}
