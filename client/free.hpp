// free.hpp: the free fast path, free_object, forced inline into
// shmalloc_free (c_api.cpp) as mcache.hpp's allocation fast path is into
// shmalloc_alloc: a small object of a span this thread holds is freed with
// no lock, call or atomic read-modify-write. Everything else tail-jumps to
// free.cpp's slow paths, free_slow and free_other.
#pragma once

#include <cstddef>
#include <cstdint>

#include "client/runtime.hpp"

namespace shmalloc::client {

namespace detail __attribute__((visibility("hidden"))) {

// Every free the fast path does not finish: large and tiny objects, remote
// frees, and bad pointers, each checked in full and reported by name.
SHMALLOC_SLOW_PATH void free_slow(void* p) noexcept;
// An object of a span this thread does not hold, whose index the fast path
// found: a remote free.
SHMALLOC_SLOW_PATH void free_other(void* p, mspan& s, std::uint32_t i) noexcept;

// Clears bit i % 64 of w; true if it was set. One `btr` on x86-64, which
// takes the bit number modulo 64 itself (GCC spells the portable form as
// five instructions).
SHMALLOC_FAST_PATH bool test_and_clear(std::uint64_t& w, std::uint32_t i) noexcept {
#if defined(__x86_64__) && defined(__GCC_ASM_FLAG_OUTPUTS__)
  bool was_set;
  asm("btrq %q2, %0" : "+r"(w), "=@ccc"(was_set) : "r"(std::uint64_t{i}));
  return was_set;
#else
  const std::uint64_t bit = std::uint64_t{1} << (i % 64);
  const bool was_set = (w & bit) != 0;
  w &= ~bit;
  return was_set;
#endif
}

}  // namespace detail

// The free fast path: a small object of a span this thread holds, allocated.
// Anything else takes free_slow, which checks again and says what is wrong.
// Three things make the checks here cheap: a page without a span maps to
// entry 0, which wraps past max_spans; a large object's span has class 0,
// whose magic 0 no offset passes; and bits at or past nelems are never set,
// so a slot in a span's tail reads as free. The index stays inside the
// bitmap: a span of c's class holds at most bitmap_words * 64 objects, and
// offset < span bytes.
SHMALLOC_FAST_PATH void free_object(void* p) noexcept {
  using namespace detail;
  const heap_view& v = g_view;
  const auto off = static_cast<std::uint64_t>(static_cast<const std::byte*>(p) - v.arenas);
  const std::uint64_t page = off / page_size;
  if (SHMALLOC_UNLIKELY(page >= g_committed.load(std::memory_order_relaxed))) return free_slow(p);
  const std::uint32_t entry = v.page_map[page] - 1;
  if (SHMALLOC_UNLIKELY(entry >= v.max_spans)) return free_slow(p);
  mspan& s = v.spans[entry];
  __builtin_prefetch(&s.alloc_bits[2], 1);
  if (SHMALLOC_UNLIKELY(s.span_class == tiny_span_class)) return free_slow(p);
  const std::uint64_t offset = off - std::uint64_t{s.start.value} * page_size;
  // With the magic the span carries: no table lookup after the span's line
  // arrives.
  const object_position at = object_position_of(static_cast<std::uint32_t>(offset), s.div_magic);
  if (SHMALLOC_UNLIKELY(!at.start)) return free_slow(p);
  const std::uint32_t i = at.index;
  const std::uint8_t size_class = span_class{s.span_class}.size_class();
  mcache* mc = t_cache;
  if (SHMALLOC_UNLIKELY(s.owner_cache.load(std::memory_order_relaxed) != mc->token)) return free_other(p, s, i);
  shared_atomic<std::uint64_t>& word = s.alloc_bits[i / 64];
  std::uint64_t bits = word.load(std::memory_order_relaxed);
  if (SHMALLOC_UNLIKELY(!test_and_clear(bits, i))) return free_slow(p);
  word.store(bits, std::memory_order_relaxed);
  bump(mc->stats->small_frees[size_class]);
}

}  // namespace shmalloc::client
