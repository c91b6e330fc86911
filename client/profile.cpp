// profile.cpp: sampled allocations, the client's half (shm/profile.hpp has
// the design). Owns SHMALLOC_PROFILE_RATE (read at attach), each thread's
// countdown to its next sample, and the sampled allocation itself: a large
// object whose entry in the heap's profile table holds its size, the time
// and the call stack. The fast paths know nothing of it: alloc_slow credits
// the bytes of each bitmap word it loads and asks here whether the
// allocation it is making is due.
#include <dlfcn.h>
#include <execinfo.h>
#include <link.h>
#include <sys/auxv.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "client/runtime.hpp"
#include "shm/profile.hpp"

namespace shmalloc::client::detail {

std::atomic<std::uint32_t> g_profile_rate{0};

namespace {

constexpr std::uint64_t max_profile_rate = std::uint64_t{1} << 31;  // bytes: a sample's rate fits its entry

// The module of address p (glibc's _dl_find_object: a lock-free lookup of
// a few nanoseconds, where dladdr searches symbol tables for microseconds),
// or nullptr.
link_map* module_of(const void* p) noexcept {
  dl_find_object found{};
  return _dl_find_object(const_cast<void*>(p), &found) == 0 ? found.dlfo_link_map : nullptr;
}

// This library's module when it is a shared object apart from the program
// (its frames are skipped at capture); nullptr when it is linked into the
// program, whose frames are then told apart by name when the stack is
// resolved (shmallocctl leaks --sites).
const link_map* own_module() noexcept {
  static const link_map* const module = [] {
    const link_map* self = module_of(reinterpret_cast<const void*>(&own_module));
    const auto phdr = getauxval(AT_PHDR);
    return phdr != 0 && module_of(reinterpret_cast<const void*>(phdr)) == self ? nullptr : self;
  }();
  return module;
}

// xorshift64*: the thread's own stream, for its exponential draws.
double uniform(mcache* mc) noexcept {
  std::uint64_t x = mc->profile_rng;
  x ^= x >> 12;
  x ^= x << 25;
  x ^= x >> 27;
  mc->profile_rng = x;
  return (static_cast<double>((x * 0x2545F4914F6CDD1DULL) >> 11) + 1.0) / 9007199254740993.0;  // (0, 1]
}

// Bytes to the next sample: exponential with mean `rate`, as Go's
// fastexprand, so that samples are a Poisson process over allocated bytes.
std::int64_t next_sample(mcache* mc, std::uint32_t rate) noexcept {
  if (mc->profile_rng == 0) mc->profile_rng = (reinterpret_cast<std::uintptr_t>(mc) ^ now_ns()) | 1;
  return static_cast<std::int64_t>(std::max(1.0, -std::log(uniform(mc)) * rate));
}

// The calling stack, innermost first, without this function and (when it
// is a shared object) the library's own frames.
std::uint32_t capture(std::uint64_t* pc, std::uint64_t* vma) noexcept {
  void* raw[profile_frames + 8];
  const int n = backtrace(raw, static_cast<int>(std::size(raw)));
  const link_map* own = own_module();
  std::uint32_t kept = 0;
  for (int i = 1; i < n && kept < profile_frames; ++i) {
    const link_map* module = module_of(raw[i]);
    if (module == nullptr || (own != nullptr && module == own)) continue;
    pc[kept] = reinterpret_cast<std::uintptr_t>(raw[i]);
    vma[kept] = pc[kept] - module->l_addr;
    ++kept;
  }
  return kept;
}

}  // namespace

// SHMALLOC_PROFILE_RATE: bytes between samples on average; unset or 0 is
// off. Anything else is reported once and taken as off.
void read_profile_rate() noexcept {
  std::uint32_t rate = 0;
  if (const char* v = std::getenv("SHMALLOC_PROFILE_RATE"); v != nullptr && *v != '\0') {
    char* end = nullptr;
    errno = 0;
    const unsigned long long n = std::strtoull(v, &end, 10);
    if (errno != 0 || *end != '\0' || *v == '-' || n > max_profile_rate)
      std::fprintf(stderr, "shmalloc: SHMALLOC_PROFILE_RATE=%s is not a number of bytes up to 2 GiB; profiling is off\n", v);
    else
      rate = static_cast<std::uint32_t>(n);
  }
  g_profile_rate.store(rate, std::memory_order_relaxed);
}

bool profile_due(mcache* mc, std::uint64_t credit) noexcept {
  const std::uint32_t rate = g_profile_rate.load(std::memory_order_relaxed);
  if (rate == 0) return false;
  if (mc->profile_rng == 0) mc->profile_countdown = next_sample(mc, rate);  // the thread's first draw
  mc->profile_countdown -= static_cast<std::int64_t>(std::min<std::uint64_t>(credit, INT64_MAX / 2));
  if (mc->profile_countdown > 0) return false;
  // What was credited past the point is carried, not dropped: the slow path
  // credits a word's bytes at once, and dropping the overshoot would sample
  // less than one per `rate` bytes. At most one draw's worth, so that one
  // huge object does not make a run of samples.
  mc->profile_countdown = std::max<std::int64_t>(mc->profile_countdown, -std::int64_t{rate}) + next_sample(mc, rate);
  return true;
}

void profile_credit(mcache* mc, std::uint64_t bytes) noexcept {
  mc->profile_countdown -= static_cast<std::int64_t>(bytes);
}

SHMALLOC_SLOW_PATH __attribute__((noinline)) void profile_record(void* p, std::size_t size) noexcept {
  const handle_t h = g_view.handle_of(p);
  const span_id id = g_view.span_at(h);
  if (!id) return;
  profile_sample* e = profile_claim(g_view, h);
  if (e == nullptr) return;  // the table is full: shmallocctl leaks --sites says so
  std::uint64_t pc[profile_frames] = {}, vma[profile_frames] = {};
  const std::uint32_t frames = capture(pc, vma);
  e->size.store(size, std::memory_order_relaxed);
  e->alloc_ns.store(now_ns(), std::memory_order_relaxed);
  e->rate.store(g_profile_rate.load(std::memory_order_relaxed), std::memory_order_relaxed);
  e->frames.store(frames, std::memory_order_relaxed);
  for (std::uint32_t f = 0; f < profile_frames; ++f) {
    e->pc[f].store(pc[f], std::memory_order_relaxed);
    e->vma[f].store(vma[f], std::memory_order_relaxed);
  }
  profile_publish(g_view, *e, g_view.span(id), h);
}

SHMALLOC_SLOW_PATH void* alloc_sampled(std::size_t size, bool noscan) noexcept {
  void* p = alloc_large_unsampled(size, noscan);
  if (p != nullptr) profile_record(p, size);
  return p;
}

}  // namespace shmalloc::client::detail
