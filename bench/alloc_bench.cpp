// alloc_bench: the allocation cases of issue 6, for one allocator per
// binary (the allocator is linked in, never preloaded). bench/run.sh builds
// one binary per allocator, runs them interleaved, and writes the table.
//
// Output: one CSV line per case, "case,allocator,ns" with the nanoseconds
// per operation of one timed repetition; run.sh takes medians over rounds.
//
// Keeping the optimizer honest: every object is touched, pointers go through
// a volatile sink, and each repetition does a fixed, seeded amount of work.
#include <dlfcn.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#ifdef BENCH_SHMALLOC
#include <sys/socket.h>

#include "proto/control_client.hpp"
#include "shm/size_classes.hpp"
#include "shmalloc/shmalloc.h"
#define BENCH_ALLOC(n) shmalloc_alloc(n)
#define BENCH_FREE(p) shmalloc_free(p)
#define BENCH_SHARED 1
static const char* allocator_name = "shmalloc";
static std::uint64_t to_handle(void* p) { return shmalloc_handle(p); }
static void* from_handle(std::uint64_t h) { return shmalloc_pointer(h); }
#elif defined(BENCH_BOOST_IPC)
// Boost.Interprocess managed_shared_memory: its default rbtree_best_fit
// segment manager behind a process-shared mutex (what people use today).
#include <boost/interprocess/managed_shared_memory.hpp>
namespace bip = boost::interprocess;
static bip::managed_shared_memory* segment;
#define BENCH_ALLOC(n) segment->allocate(n)
#define BENCH_FREE(p) segment->deallocate(p)
#define BENCH_SHARED 1
static const char* allocator_name = "boost.interprocess";
static std::uint64_t to_handle(void* p) { return static_cast<std::uint64_t>(segment->get_handle_from_address(p)); }
static void* from_handle(std::uint64_t h) {
  return segment->get_address_from_handle(static_cast<bip::managed_shared_memory::handle_t>(h));
}
#else
#define BENCH_ALLOC(n) std::malloc(n)
#define BENCH_FREE(p) std::free(p)
static const char* allocator_name = BENCH_ALLOCATOR;
static std::uint64_t to_handle(void* p) { return reinterpret_cast<std::uintptr_t>(p); }
static void* from_handle(std::uint64_t h) { return reinterpret_cast<void*>(h); }
#endif

namespace {

volatile std::uintptr_t sink;

using clock_type = std::chrono::steady_clock;
double ns_since(clock_type::time_point t0, double ops) {
  return std::chrono::duration<double, std::nano>(clock_type::now() - t0).count() / ops;
}

// Case 1: allocate and free 64 bytes at once.
double pairs(int n) {
  const auto t0 = clock_type::now();
  for (int i = 0; i < n; ++i) {
    auto* p = static_cast<char*>(BENCH_ALLOC(64));
    p[0] = static_cast<char>(i);
    sink = reinterpret_cast<std::uintptr_t>(p);
    BENCH_FREE(p);
  }
  return ns_since(t0, n);
}

// Case 2: 1,000 objects of 8..1024 bytes (about 70% at most 128), touched,
// freed in shuffled order.
struct mixed_plan {
  std::vector<std::size_t> sizes;
  std::vector<std::size_t> order;
  explicit mixed_plan(std::uint64_t seed) {
    std::mt19937_64 rng(seed);
    for (int i = 0; i < 1000; ++i) sizes.push_back(rng() % 10 < 7 ? 8 + rng() % 121 : 129 + rng() % 896);
    for (std::size_t i = 0; i < 1000; ++i) order.push_back(i);
    std::shuffle(order.begin(), order.end(), rng);
  }
};

double mixed(const mixed_plan& plan, int rounds) {
  std::vector<char*> objs(plan.sizes.size());
  const auto t0 = clock_type::now();
  for (int r = 0; r < rounds; ++r) {
    for (std::size_t i = 0; i < objs.size(); ++i) {
      objs[i] = static_cast<char*>(BENCH_ALLOC(plan.sizes[i]));
      objs[i][0] = static_cast<char>(i);
    }
    for (std::size_t i : plan.order) BENCH_FREE(objs[i]);
  }
  sink = reinterpret_cast<std::uintptr_t>(objs[0]);
  return ns_since(t0, double(rounds) * double(objs.size()));
}

// Case 3: large pairs, first and last byte touched.
double large(std::size_t bytes, int n) {
  const auto t0 = clock_type::now();
  for (int i = 0; i < n; ++i) {
    auto* p = static_cast<char*>(BENCH_ALLOC(bytes));
    p[0] = 1;
    p[bytes - 1] = 2;
    sink = reinterpret_cast<std::uintptr_t>(p);
    BENCH_FREE(p);
  }
  return ns_since(t0, n);
}

// Case 4: two threads of one process running case 2 at once (ns per object
// per thread, wall time).
double mixed_two_threads(int rounds) {
  double a = 0, b = 0;
  std::thread t1([&] { a = mixed(mixed_plan(1), rounds); });
  std::thread t2([&] { b = mixed(mixed_plan(2), rounds); });
  t1.join();
  t2.join();
  return std::max(a, b);
}

// Case 10: the floor, a thread-local free list of pre-carved 64-byte blocks,
// behind out-of-line calls as an allocator's entry points are.
struct floor_block {
  floor_block* next;
  char rest[56];
};
thread_local floor_block* floor_head = nullptr;
__attribute__((noinline)) void* floor_pop() {
  floor_block* p = floor_head;
  floor_head = p->next;
  return p;
}
__attribute__((noinline)) void floor_push(void* p) {
  auto* b = static_cast<floor_block*>(p);
  b->next = floor_head;
  floor_head = b;
}

double floor_case(int n) {
  static thread_local floor_block blocks[64];
  for (auto& b : blocks) floor_push(&b);
  const auto t0 = clock_type::now();
  for (int i = 0; i < n; ++i) {
    auto* p = static_cast<char*>(floor_pop());
    p[8] = static_cast<char>(i);
    sink = reinterpret_cast<std::uintptr_t>(p);
    floor_push(p);
  }
  return ns_since(t0, n);
}

// Memory two processes (or threads) share for coordination: a barrier and a
// ring of handles. Anonymous and shared, made before fork.
struct shared_area {
  std::atomic<int> ready;
  std::atomic<std::uint64_t> head, tail;
  double result[2];
  static constexpr std::size_t slots = 4096;
  std::atomic<std::uint64_t> cells[slots];
};
shared_area* make_shared_area() {
  void* m = mmap(nullptr, sizeof(shared_area), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  return new (m) shared_area{};
}

void barrier(shared_area* a, int parties) {
  a->ready.fetch_add(1);
  while (a->ready.load() < parties) {
  }
}

// Case 5: two processes running case 2 at once. For the shared allocators
// both use one heap; for the private ones, each process has its own (the
// no-sharing ideal). Wall time per object of the slower process.
double mixed_two_processes(int rounds) {
  shared_area* a = make_shared_area();
  pid_t pids[2];
  for (int k = 0; k < 2; ++k) {
    pids[k] = fork();
    if (pids[k] == 0) {
      const mixed_plan plan(static_cast<std::uint64_t>(k + 1));
      mixed(plan, 5);  // warm this process's caches
      barrier(a, 2);
      a->result[k] = mixed(plan, rounds);
#ifdef BENCH_SHMALLOC
      shmalloc_detach();
#endif
      _exit(0);
    }
  }
  for (pid_t pid : pids) waitpid(pid, nullptr, 0);
  const double r = std::max(a->result[0], a->result[1]);
  munmap(a, sizeof(shared_area));
  return r;
}

// Case 6: one side allocates 64-byte objects and passes handles through a
// ring; the other frees them. Across processes for the shared allocators,
// across threads for the private ones. ns per object.
void produce(shared_area* a, int n) {
  for (int i = 0; i < n; ++i) {
    auto* p = static_cast<char*>(BENCH_ALLOC(64));
    p[0] = static_cast<char>(i);
    while (a->head.load(std::memory_order_relaxed) - a->tail.load(std::memory_order_acquire) == shared_area::slots) {
    }
    const std::uint64_t h = a->head.load(std::memory_order_relaxed);
    a->cells[h % shared_area::slots].store(to_handle(p), std::memory_order_relaxed);
    a->head.store(h + 1, std::memory_order_release);
  }
}
void consume(shared_area* a, int n) {
  for (int i = 0; i < n; ++i) {
    while (a->tail.load(std::memory_order_relaxed) == a->head.load(std::memory_order_acquire)) {
    }
    const std::uint64_t t = a->tail.load(std::memory_order_relaxed);
    BENCH_FREE(from_handle(a->cells[t % shared_area::slots].load(std::memory_order_relaxed)));
    a->tail.store(t + 1, std::memory_order_release);
  }
}
double cross_free(int n) {
  shared_area* a = make_shared_area();
  const auto t0 = clock_type::now();
#ifdef BENCH_SHARED
  const pid_t consumer = fork();
  if (consumer == 0) {
    consume(a, n);
#ifdef BENCH_SHMALLOC
    shmalloc_detach();
#endif
    _exit(0);
  }
  produce(a, n);
  waitpid(consumer, nullptr, 0);
#else
  std::thread consumer([a, n] { consume(a, n); });
  produce(a, n);
  consumer.join();
#endif
  const double r = ns_since(t0, n);
  munmap(a, sizeof(shared_area));
  return r;
}

// Case 7: grow to 1 GiB in 64-byte objects, then free it all (ns per object).
// Case 9 reads the heap's committed bytes while all of it is live.
std::vector<void*>* growth_objects;
double heap_growth(std::size_t bytes) {
  const std::size_t n = bytes / 64;
  growth_objects = new std::vector<void*>(n);
  const auto t0 = clock_type::now();
  for (std::size_t i = 0; i < n; ++i) {
    auto* p = static_cast<char*>(BENCH_ALLOC(64));
    if (p == nullptr) {
      std::fprintf(stderr, "alloc_bench: %s ran out of memory in case 7\n", allocator_name);
      std::exit(1);
    }
    p[0] = 1;
    (*growth_objects)[i] = p;
  }
  return ns_since(t0, double(n));
}
double free_growth() {
  const auto t0 = clock_type::now();
  for (void* p : *growth_objects) BENCH_FREE(p);
  const double ns = ns_since(t0, double(growth_objects->size()));
  delete growth_objects;
  return ns;
}

#ifdef BENCH_SHMALLOC
shmalloc::proto::stats_msg daemon_stats() {
  shmalloc::control_client c(shmalloc::default_socket_path());
  auto body = c.request(shmalloc::proto::msg::stats);
  return body ? shmalloc::proto::decode_stats(body.value()).value_or(shmalloc::proto::stats_msg{})
              : shmalloc::proto::stats_msg{};
}

// Case 8: one refill round trip (hello'd client, one span), next to a raw
// Unix-socket round trip of the same sizes (a forked echo process). The two
// alternate, so that both see the same moments of a noisy machine. Median
// microseconds of n round trips each.
//
// The echo runs on the CPUs SHMALLOC_BENCH_ECHO_CPUS lists (bench/run.sh
// gives the daemon's): a round trip to a peer on the client's own CPU costs
// a different amount than one to a peer on another CPU, so the two peers
// must be placed alike for the comparison to measure the daemon.
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
// Pins the calling process to a comma-separated list of CPUs (no list: no pin).
void pin_to(const char* cpus) {
  if (cpus == nullptr || *cpus == '\0') return;
  cpu_set_t set;
  CPU_ZERO(&set);
  for (const char* p = cpus; *p != '\0';) {
    CPU_SET(std::atoi(p), &set);
    p += std::strcspn(p, ",");
    if (*p == ',') ++p;
  }
  if (sched_setaffinity(0, sizeof set, &set) != 0) std::perror("alloc_bench: sched_setaffinity");
}

std::pair<double, double> round_trips(int n) {
  namespace proto = shmalloc::proto;
  shmalloc::control_client c(shmalloc::default_socket_path());
  c.hello("bench");
  const auto request = proto::make_request(proto::msg::refill, 1, proto::encode(proto::refill_msg{20, 1}));
  // The reply's size, for the echo: one refill first.
  c.send_bytes(request);
  auto first = c.read_frame();
  if (!first) return {0, 0};
  const std::size_t reply_bytes = proto::header_bytes + first->payload.size();
  std::vector<std::uint32_t> got;
  auto keep = [&got](const std::vector<std::uint8_t>& payload) {
    if (auto parts = proto::split_reply(payload))
      if (auto list = proto::decode_span_list(parts->body, proto::max_refill)) got.push_back(list->span_ids[0]);
  };
  keep(first->payload);

  int sv[2];
  socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
  const pid_t echo = fork();
  if (echo == 0) {
    close(sv[0]);
    pin_to(std::getenv("SHMALLOC_BENCH_ECHO_CPUS"));
    std::vector<char> in(request.size()), out(reply_bytes);
    for (int i = 0; i < n; ++i) {
      if (recv(sv[1], in.data(), in.size(), MSG_WAITALL) <= 0) break;
      send(sv[1], out.data(), out.size(), 0);
    }
    _exit(0);
  }
  close(sv[1]);
  std::vector<char> out(request.size()), in(reply_bytes);
  std::vector<double> refill_us, raw_us;
  for (int i = 0; i < n; ++i) {
    auto t0 = clock_type::now();
    c.send_bytes(request);
    auto f = c.read_frame();
    refill_us.push_back(ns_since(t0, 1000.0));
    if (!f) break;
    keep(f->payload);
    t0 = clock_type::now();
    send(sv[0], out.data(), out.size(), 0);
    recv(sv[0], in.data(), in.size(), MSG_WAITALL);
    raw_us.push_back(ns_since(t0, 1000.0));
    if (got.size() == proto::max_release) {
      c.request(proto::msg::release, proto::encode(proto::span_list_msg{got}));
      got.clear();
    }
  }
  if (!got.empty()) c.request(proto::msg::release, proto::encode(proto::span_list_msg{got}));
  close(sv[0]);
  waitpid(echo, nullptr, 0);
  return {median(refill_us), median(raw_us)};
}
#endif

// Which library really serves malloc in this binary (never trust the name).
std::string malloc_provider() {
#ifdef BENCH_SHMALLOC
  return "libshmalloc (C API)";
#elif defined(BENCH_BOOST_IPC)
  return "boost::interprocess::managed_shared_memory (rbtree_best_fit, interprocess mutex)";
#else
  Dl_info info{};
  void* sym = dlsym(RTLD_DEFAULT, "malloc");
  if (sym == nullptr || dladdr(sym, &info) == 0 || info.dli_fname == nullptr) return "unknown";
  return info.dli_fname;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  const int reps = argc > 1 ? std::atoi(argv[1]) : 5;
  // A case-name prefix: only the cases it starts (for profiling one case);
  // with a leading '-', every case but those.
  const char* only = argc > 2 ? argv[2] : "";
  const bool except = only[0] == '-';
  if (except) ++only;
  auto run = [only, except](const char* name) { return (std::strncmp(name, only, std::strlen(only)) == 0) != except; };
  const std::string provider = malloc_provider();
  std::fprintf(stderr, "%s: malloc is served by %s\n", allocator_name, provider.c_str());
#ifdef BENCH_SHMALLOC
  if (shmalloc_attach(nullptr) != 0) {
    std::fprintf(stderr, "alloc_bench: cannot attach to shmallocd\n");
    return 1;
  }
#elif defined(BENCH_BOOST_IPC)
  const std::string segment_name = "shmalloc-bench-bip-" + std::to_string(getpid());
  bip::shared_memory_object::remove(segment_name.c_str());
  bip::managed_shared_memory seg(bip::create_only, segment_name.c_str(), 3ULL << 30);
  segment = &seg;
  struct remover {
    std::string name;
    ~remover() { bip::shared_memory_object::remove(name.c_str()); }
  } remove_at_exit{segment_name};
#else
  const std::string want = BENCH_LIBRARY;
  if (provider.find(want) == std::string::npos) {
    std::fprintf(stderr, "alloc_bench: %s expected malloc from %s, got %s\n", allocator_name, want.c_str(),
                 provider.c_str());
    return 1;
  }
#endif
  const mixed_plan plan(42);
  pairs(200000);  // warm up
  mixed(plan, 20);
  if (run("4.")) mixed_two_threads(20);  // what threads leave behind for the next ones (a pool, a cache)
  for (int r = 0; r < reps; ++r) {  // NOLINT: r is read by case 7
    // Each repetition warms its case first: the cases between two
    // repetitions leave an allocator's caches as they leave them (shmalloc
    // gives a class's spans back after 500 ms without use, and the first
    // allocations after that cost a round trip each).
    if (run("1.")) {
      pairs(20'000);
      std::printf("1. pairs 64 B,%s,%.2f\n", allocator_name, pairs(2'000'000));
    }
    if (run("2.")) {
      mixed(plan, 20);
      std::printf("2. mixed batch,%s,%.2f\n", allocator_name, mixed(plan, 400));
    }
    if (run("3.")) {
      std::printf("3. large 64 KiB,%s,%.2f\n", allocator_name, large(64 << 10, 20000));
      std::printf("3. large 256 KiB,%s,%.2f\n", allocator_name, large(256 << 10, 20000));
      std::printf("3. large 1 MiB,%s,%.2f\n", allocator_name, large(1 << 20, 5000));
    }
    if (run("4.")) std::printf("4. two threads mixed,%s,%.2f\n", allocator_name, mixed_two_threads(200));
    if (run("5.")) std::printf("5. two processes mixed,%s,%.2f\n", allocator_name, mixed_two_processes(200));
    if (run("6.")) std::printf("6. cross-process free,%s,%.2f\n", allocator_name, cross_free(200000));
    if (run("10.")) std::printf("10. floor,%s,%.2f\n", allocator_name, floor_case(20'000'000));
    if (run("9.") && r == 0) {
      // Case 9 at case 2's steady state: case 2 runs for two seconds (so
      // that what earlier cases left behind has settled: the daemon sweeps
      // remote frees within 100 ms, and what the process cached for them
      // has sat unused past the 500 ms cache decay), then its 1,000 objects
      // are live at once.
      const mixed_plan steady(42);
      for (const auto t0 = clock_type::now(); clock_type::now() - t0 < std::chrono::seconds(2);) mixed(steady, 10);
      std::vector<void*> objs;
      std::size_t live = 0;
      for (std::size_t n : steady.sizes) objs.push_back(BENCH_ALLOC(n)), live += n;
#ifdef BENCH_SHMALLOC
      const auto st = daemon_stats();
      std::printf("9. committed / live at case 2 steady state,%s,%.3f\n", allocator_name,
                  double(st.heap_inuse_bytes) / double(live));
      // The floor of any design with one size class per span (Go's spans):
      // each class's objects in as few whole spans as hold them.
      std::size_t per_class[shmalloc::num_size_classes] = {};
      for (std::size_t n : steady.sizes) ++per_class[shmalloc::size_to_class(n)];
      std::size_t floor_bytes = 0;
      for (std::uint8_t c = 1; c < shmalloc::num_size_classes; ++c) {
        const std::size_t per_span = shmalloc::class_to_objects(c);
        floor_bytes += (per_class[c] + per_span - 1) / per_span * shmalloc::class_span_bytes(c);
      }
      std::printf("9. span floor at case 2 steady state,%s,%.3f\n", allocator_name, double(floor_bytes) / double(live));
#elif defined(BENCH_BOOST_IPC)
      std::printf("9. committed / live at case 2 steady state,%s,%.3f\n", allocator_name,
                  double(segment->get_size() - segment->get_free_memory()) / double(live));
#endif
      for (void* p : objs) BENCH_FREE(p);
    }
    if (run("7.") && r == 0) {  // a gigabyte at a time: once per process
#ifdef BENCH_SHMALLOC
      const auto before = daemon_stats();
#endif
      const double grow = heap_growth(1ULL << 30);
#ifdef BENCH_SHMALLOC
      const auto during = daemon_stats();
      std::printf("9. committed / live after case 7,%s,%.3f\n", allocator_name,
                  double(during.heap_sys_bytes + during.metadata_sys_bytes) / double(1ULL << 30));
      std::printf("7. control round trips (count),%s,%.0f\n", allocator_name,
                  double(during.control_requests_total - before.control_requests_total));
#elif defined(BENCH_BOOST_IPC)
      std::printf("9. committed / live after case 7,%s,%.3f\n", allocator_name,
                  double(segment->get_size() - segment->get_free_memory()) / double(1ULL << 30));
#endif
      std::printf("7. heap growth 1 GiB in 64 B,%s,%.2f\n", allocator_name, grow + free_growth());
    }
#ifdef BENCH_SHMALLOC
    if (run("8.")) {
      const auto [refill, raw] = round_trips(2000);
      const char* placement = std::getenv("SHMALLOC_BENCH_PLACEMENT");
      const std::string where = placement != nullptr ? std::string(" ") + placement : "";
      std::printf("8. refill round trip%s (us),%s,%.2f\n", where.c_str(), allocator_name, refill);
      std::printf("8. raw socket round trip%s (us),%s,%.2f\n", where.c_str(), allocator_name, raw);
    }
#endif
    std::fflush(stdout);
  }
#ifdef BENCH_SHMALLOC
  shmalloc_detach();
#endif
  return 0;
}
