// churn_bench: working sets held for real (issue 21, part 2), for one
// allocator per binary (linked in, never preloaded), as alloc_bench.
//
//   churn_bench SCENARIO [THREADS]
//
// Scenarios (one per process, so that each starts from a fresh allocator:
// what one case leaves in an allocator's caches and arenas would otherwise
// count in the next one's committed bytes):
//   server-1k-N   T threads (default 2) each hold N live objects of random
//                 sizes 8..1,000 bytes (uniform) and replace one at random
//                 per operation (free it, allocate a new size);
//                 N = 1000, 10000 or 100000.
//   server-64k-N  the same with sizes 8..65,536 bytes (uniform: about half of
//                 them above 32 KiB, shmalloc's large objects).
//   pc-threads    one thread allocates objects of 8..1,000 bytes and passes
//                 them through a bounded ring (4,096 slots) to another thread,
//                 which frees them.
//   pc-processes  the same between two processes, handles in a MAP_SHARED
//                 ring (shmalloc and Boost.Interprocess only).
//
// Each scenario warms up (the server: N objects live, then N replacements;
// the ring: a tenth of the timed count), then runs a fixed number of
// operations, timed from a barrier to a barrier. Output: CSV lines
// "METRIC:case,allocator,value":
//   rate:  M operations per second (server: replacements, all threads; ring:
//          objects freed by the consumer);
//   rt:    (shmalloc) the daemon's control_requests_total over the timed
//          phase per million operations, the observer's own stats requests
//          taken out (measured: two stats requests back to back);
//   cl:    committed bytes over live bytes at the steady state, all objects
//          of the timed phase still live (the ring: filled to its 4,096
//          slots). Committed is what each allocator says it holds
//          (committed_bytes below says which figure); live is the sum of the
//          requested sizes.
//
// Keeping the optimizer honest: every object gets its size in its first four
// bytes and a tag in its last byte, both checked before it is freed (a
// mismatch aborts); the RNGs are seeded per thread.
// SHMALLOC_BENCH_CHURN_SCALE (default 1) multiplies the operation counts.
#include <dlfcn.h>
#include <malloc.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "bench_allocator.hpp"

namespace {

using clock_type = std::chrono::steady_clock;

// splitmix64: cheap next to an allocation, unlike mt19937_64.
struct rng_type {
  std::uint64_t s;
  std::uint64_t next() {
    std::uint64_t z = (s += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, n) (multiply-high: no division).
  std::uint32_t below(std::uint32_t n) { return static_cast<std::uint32_t>(((next() >> 32) * n) >> 32); }
};

// An object carries its size in its first four bytes and a tag derived from
// it in its last byte.
char tag_of(std::uint32_t size) { return static_cast<char>((size * 2654435761u) >> 24); }
char* make_object(std::uint32_t size) {
  auto* p = static_cast<char*>(BENCH_ALLOC(size));
  if (p == nullptr) {
    std::fprintf(stderr, "churn_bench: %s: allocation of %u bytes failed\n", allocator_name, size);
    std::exit(1);
  }
  std::memcpy(p, &size, sizeof size);
  p[size - 1] = tag_of(size);
  return p;
}
// Checks the object and frees it; returns its size.
std::uint32_t check_and_free(char* p, std::uint32_t expected) {
  std::uint32_t size;
  std::memcpy(&size, p, sizeof size);
  if ((expected != 0 && size != expected) || size < 8 || p[size - 1] != tag_of(size)) {
    std::fprintf(stderr, "churn_bench: %s: object %p corrupted (size %u, expected %u)\n", allocator_name,
                 static_cast<void*>(p), size, expected);
    std::abort();
  }
  BENCH_FREE(p);
  return size;
}

// A barrier that works across threads and across processes (it lives in
// MAP_SHARED memory): spins briefly, then sleeps in 50 us steps, so that a
// coordinator waiting through a timed phase takes no CPU from the workers.
struct spin_barrier {
  std::atomic<int> count{0};
  std::atomic<int> generation{0};
  int parties = 0;
  void wait() {
    const int g = generation.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) + 1 == parties) {
      count.store(0, std::memory_order_relaxed);
      generation.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int i = 0; generation.load(std::memory_order_acquire) == g; ++i) {
      if (i < 200)
        __builtin_ia32_pause();
      else
        usleep(50);
    }
  }
};

template <class T>
T* make_shared() {
  void* m = mmap(nullptr, sizeof(T), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) {
    std::perror("churn_bench: mmap");
    std::exit(1);
  }
  return new (m) T{};
}

// ---------------------------------------------------------------------------
// What the allocator holds, and the daemon's request count (shmalloc).
#ifdef BENCH_SHMALLOC
shmalloc::proto::stats_msg daemon_stats() {
  shmalloc::control_client c(shmalloc::default_socket_path());
  auto body = c.request(shmalloc::proto::msg::stats);
  if (!body) {
    std::fprintf(stderr, "churn_bench: stats request failed\n");
    std::exit(1);
  }
  return shmalloc::proto::decode_stats(body.value()).value_or(shmalloc::proto::stats_msg{});
}
#endif

std::uint64_t control_requests() {
#ifdef BENCH_SHMALLOC
  return daemon_stats().control_requests_total;
#else
  return 0;
#endif
}

// Committed bytes as each allocator reports them; a negative value when it
// has no cheap figure.
//   shmalloc: the daemon's heap_inuse_bytes: the spans and large objects in
//             use, whole, including those sitting in client caches (case 9's
//             steady-state figure);
//   Boost.Interprocess: the segment's size less its free memory;
//   glibc: mallinfo2 arena + hblkhd (heap obtained with sbrk/mmap, all arenas);
//   jemalloc: stats.resident; TCMalloc: generic.heap_size less
//   tcmalloc.pageheap_unmapped_bytes; mimalloc: mi_process_info's commit.
double committed_bytes() {
#ifdef BENCH_SHMALLOC
  return double(daemon_stats().heap_inuse_bytes);
#elif defined(BENCH_BOOST_IPC)
  return double(segment->get_size() - segment->get_free_memory());
#else
  const std::string_view a = allocator_name;
  if (a == "glibc") {
    const struct mallinfo2 mi = mallinfo2();
    return double(mi.arena + mi.hblkhd);
  }
  if (a == "jemalloc") {
    using mallctl_fn = int (*)(const char*, void*, std::size_t*, void*, std::size_t);
    auto mallctl = reinterpret_cast<mallctl_fn>(dlsym(RTLD_DEFAULT, "mallctl"));
    if (mallctl == nullptr) return -1;
    std::uint64_t epoch = 1;
    std::size_t len = sizeof epoch;
    mallctl("epoch", &epoch, &len, &epoch, len);
    std::size_t resident = 0;
    len = sizeof resident;
    if (mallctl("stats.resident", &resident, &len, nullptr, 0) != 0) return -1;
    return double(resident);
  }
  if (a == "tcmalloc") {
    using prop_fn = int (*)(const char*, std::size_t*);
    auto get = reinterpret_cast<prop_fn>(dlsym(RTLD_DEFAULT, "MallocExtension_GetNumericProperty"));
    std::size_t heap = 0, unmapped = 0;
    if (get == nullptr || !get("generic.heap_size", &heap) || !get("tcmalloc.pageheap_unmapped_bytes", &unmapped))
      return -1;
    return double(heap - unmapped);
  }
  if (a == "mimalloc") {
    using info_fn = void (*)(std::size_t*, std::size_t*, std::size_t*, std::size_t*, std::size_t*, std::size_t*,
                             std::size_t*, std::size_t*);
    auto info = reinterpret_cast<info_fn>(dlsym(RTLD_DEFAULT, "mi_process_info"));
    if (info == nullptr) return -1;
    std::size_t elapsed, user, sys, rss, peak_rss, commit = 0, peak_commit, faults;
    info(&elapsed, &user, &sys, &rss, &peak_rss, &commit, &peak_commit, &faults);
    return commit > 0 ? double(commit) : -1;
  }
  return -1;
#endif
}

double scale() {
  const char* s = std::getenv("SHMALLOC_BENCH_CHURN_SCALE");
  const double v = s != nullptr ? std::atof(s) : 1.0;
  return v > 0 ? v : 1.0;
}

// What one scenario measured.
struct result {
  double ops = 0;          // operations in the timed phase
  double seconds = 0;      // its wall time
  double requests = 0;     // control requests in it (shmalloc), the observer's taken out
  double committed = -1;   // at the steady state
  double live = 0;         // bytes live then
};

// The observer's own requests per stats request: two back to back.
double observer_cost() {
#ifdef BENCH_SHMALLOC
  const std::uint64_t a = control_requests();
  const std::uint64_t b = control_requests();
  return double(b - a);
#else
  return 0;
#endif
}

// ---------------------------------------------------------------------------
// The server simulation.
struct server_shared {
  spin_barrier barrier;
  std::atomic<std::uint64_t> live{0};
};

void server_worker(server_shared* sh, int tid, std::uint32_t n, std::uint32_t max_size, std::uint64_t ops) {
  rng_type rng{0x5eed0000ULL + 7919ULL * std::uint64_t(tid) + n + max_size};
  const std::uint32_t span = max_size - 8 + 1;
  std::vector<char*> objs(n);
  std::vector<std::uint32_t> sizes(n);
  std::uint64_t live = 0;
  for (std::uint32_t i = 0; i < n; ++i) {
    sizes[i] = 8 + rng.below(span);
    objs[i] = make_object(sizes[i]);
    live += sizes[i];
  }
  auto replace = [&] {
    const std::uint32_t i = rng.below(n);
    live -= check_and_free(objs[i], sizes[i]);
    sizes[i] = 8 + rng.below(span);
    objs[i] = make_object(sizes[i]);
    live += sizes[i];
  };
  for (std::uint32_t k = 0; k < n; ++k) replace();  // warm-up
  sh->barrier.wait();                               // A: the coordinator reads the counters
  sh->barrier.wait();                               // B: go
  for (std::uint64_t k = 0; k < ops; ++k) replace();
  sh->live.fetch_add(live);
  sh->barrier.wait();  // C: stop; the coordinator measures with everything live
  sh->barrier.wait();  // D
  for (std::uint32_t i = 0; i < n; ++i) check_and_free(objs[i], sizes[i]);
}

// The coordinator's side of a timed phase: the workers warm up before
// barrier A and run the timed operations between B and C; the clock and the
// daemon's count of requests are read around them, the observer's own
// requests taken off.
void time_phase(spin_barrier& barrier, result& r) {
  barrier.wait();  // A
  const double obs = observer_cost();
  const std::uint64_t before = control_requests();
  const auto t0 = clock_type::now();
  barrier.wait();  // B
  barrier.wait();  // C
  r.seconds = std::chrono::duration<double>(clock_type::now() - t0).count();
  r.requests = double(control_requests() - before) - obs;
}

result server(int threads, std::uint32_t n, std::uint32_t max_size, std::uint64_t ops_per_thread) {
  auto* sh = make_shared<server_shared>();
  sh->barrier.parties = threads + 1;
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) workers.emplace_back(server_worker, sh, t, n, max_size, ops_per_thread);
  result r;
  time_phase(sh->barrier, r);
  r.committed = committed_bytes();
  r.live = double(sh->live.load());
  r.ops = double(ops_per_thread) * threads;
  sh->barrier.wait();  // D
  for (auto& w : workers) w.join();
  munmap(sh, sizeof *sh);
  return r;
}

// ---------------------------------------------------------------------------
// Producer/consumer: a bounded single-producer single-consumer ring of
// pointers (threads) or handles (processes). Each side caches the other's
// index and reloads it only when the ring looks full or empty.
struct pc_shared {
  static constexpr std::uint64_t slots = 4096;
  spin_barrier barrier;
  alignas(64) std::atomic<std::uint64_t> head{0};
  alignas(64) std::atomic<std::uint64_t> tail{0};
  alignas(64) std::atomic<std::uint64_t> live{0};
  alignas(64) std::uint64_t cells[slots];
};

void backoff(int& spins) {
  if (++spins < 1000)
    __builtin_ia32_pause();
  else
    sched_yield();
}

void produce(pc_shared* sh, rng_type& rng, std::uint64_t count, bool handles, std::uint64_t* live) {
  std::uint64_t head = sh->head.load(std::memory_order_relaxed);
  std::uint64_t tail = sh->tail.load(std::memory_order_acquire);
  for (std::uint64_t k = 0; k < count; ++k) {
    const std::uint32_t size = 8 + rng.below(993);
    char* p = make_object(size);
    if (live != nullptr) *live += size;
    for (int spins = 0; head - tail == pc_shared::slots; backoff(spins)) tail = sh->tail.load(std::memory_order_acquire);
    sh->cells[head % pc_shared::slots] = handles ? to_handle(p) : reinterpret_cast<std::uintptr_t>(p);
    sh->head.store(++head, std::memory_order_release);
  }
}

void consume(pc_shared* sh, std::uint64_t count, bool handles) {
  std::uint64_t tail = sh->tail.load(std::memory_order_relaxed);
  std::uint64_t head = sh->head.load(std::memory_order_acquire);
  for (std::uint64_t k = 0; k < count; ++k) {
    for (int spins = 0; head == tail; backoff(spins)) head = sh->head.load(std::memory_order_acquire);
    const std::uint64_t c = sh->cells[tail % pc_shared::slots];
    check_and_free(static_cast<char*>(handles ? from_handle(c) : reinterpret_cast<void*>(c)), 0);
    sh->tail.store(++tail, std::memory_order_release);
  }
}

void producer_side(pc_shared* sh, std::uint64_t warm, std::uint64_t count, bool handles) {
  rng_type rng{0xc0ffeeULL};
  produce(sh, rng, warm, handles, nullptr);
  sh->barrier.wait();  // A
  sh->barrier.wait();  // B
  produce(sh, rng, count, handles, nullptr);
  sh->barrier.wait();  // C: the consumer has freed everything
  std::uint64_t live = 0;
  produce(sh, rng, pc_shared::slots, handles, &live);  // the ring full: its steady-state working set
  sh->live.store(live);
  sh->barrier.wait();  // D: the coordinator measures
  sh->barrier.wait();  // E
}

void consumer_side(pc_shared* sh, std::uint64_t warm, std::uint64_t count, bool handles) {
  consume(sh, warm, handles);
  sh->barrier.wait();  // A
  sh->barrier.wait();  // B
  consume(sh, count, handles);
  sh->barrier.wait();  // C
  sh->barrier.wait();  // D
  sh->barrier.wait();  // E
  consume(sh, pc_shared::slots, handles);
}

result producer_consumer(std::uint64_t count, bool processes) {
  auto* sh = make_shared<pc_shared>();
  sh->barrier.parties = 3;
  const std::uint64_t warm = count / 10;
  std::vector<std::thread> threads;
  pid_t pids[2] = {0, 0};
  if (processes) {
    for (int k = 0; k < 2; ++k) {
      pids[k] = fork();
      if (pids[k] < 0) {
        std::perror("churn_bench: fork");
        std::exit(1);
      }
      if (pids[k] == 0) {
        if (k == 0)
          producer_side(sh, warm, count, true);
        else
          consumer_side(sh, warm, count, true);
#ifdef BENCH_SHMALLOC
        shmalloc_detach();
#endif
        _exit(0);
      }
    }
  } else {
    threads.emplace_back(producer_side, sh, warm, count, false);
    threads.emplace_back(consumer_side, sh, warm, count, false);
  }
  result r;
  time_phase(sh->barrier, r);
  r.ops = double(count);
  sh->barrier.wait();  // D: the ring is full
  r.committed = committed_bytes();
  r.live = double(sh->live.load());
  sh->barrier.wait();  // E
  for (auto& t : threads) t.join();
  for (pid_t pid : pids) {
    int status = 0;
    if (pid > 0 && (waitpid(pid, &status, 0) != pid || !WIFEXITED(status) || WEXITSTATUS(status) != 0)) {
      std::fprintf(stderr, "churn_bench: %s: a ring process failed\n", allocator_name);
      std::exit(1);
    }
  }
  munmap(sh, sizeof *sh);
  return r;
}

void report(const char* label, const result& r) {
  std::printf("rate:%s,%s,%.2f\n", label, allocator_name, r.ops / r.seconds / 1e6);
#ifdef BENCH_SHMALLOC
  std::printf("rt:%s,%s,%.2f\n", label, allocator_name, r.requests * 1e6 / r.ops);
#endif
  if (r.committed >= 0 && r.live > 0) std::printf("cl:%s,%s,%.3f\n", label, allocator_name, r.committed / r.live);
  std::fflush(stdout);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: churn_bench server-1k-N|server-64k-N|pc-threads|pc-processes [THREADS]\n"
                 "  N: 1000, 10000 or 100000\n");
    return 2;
  }
  const std::string scenario = argv[1];
  const int threads = argc > 2 ? std::atoi(argv[2]) : 2;
  const allocator_setup setup("churn_bench");
  if (!setup.ok()) return 1;
  const double k = scale();
  auto count = [k](double base) { return static_cast<std::uint64_t>(base * k) + 1; };
  int rc = 0;
  if (scenario.rfind("server-", 0) == 0) {
    const bool big = scenario.rfind("server-64k-", 0) == 0;
    const bool small = scenario.rfind("server-1k-", 0) == 0;
    const std::uint32_t n = static_cast<std::uint32_t>(std::atol(scenario.c_str() + (big ? 11 : 10)));
    if ((!big && !small) || (n != 1000 && n != 10000 && n != 100000)) {
      std::fprintf(stderr, "churn_bench: unknown scenario %s\n", scenario.c_str());
      return 2;
    }
    // Operations per thread: about 0.5..1 s for glibc with 2 threads here.
    const double base = big ? 0.25e6 : (n >= 100000 ? 2e6 : n >= 10000 ? 4e6 : 8e6);
    const result r = server(threads, n, big ? 65536 : 1000, count(base));
    char label[96];
    std::snprintf(label, sizeof label, "%d. server %s N=%u", (big ? 4 : 1) + (n == 1000 ? 0 : n == 10000 ? 1 : 2),
                  big ? "8..65536 B" : "8..1000 B", n);
    report(label, r);
  } else if (scenario == "pc-threads") {
    report("7. producer/consumer two threads", producer_consumer(count(10e6), false));
  } else if (scenario == "pc-processes") {
#ifdef BENCH_SHARED
    report("8. producer/consumer two processes", producer_consumer(count(10e6), true));
#else
    std::fprintf(stderr, "churn_bench: %s has no cross-process heap\n", allocator_name);
#endif
  } else {
    std::fprintf(stderr, "churn_bench: unknown scenario %s\n", scenario.c_str());
    rc = 2;
  }
#ifdef BENCH_SHMALLOC
  shmalloc_detach();
#endif
  return rc;
}
