// mcache.hpp: libshmalloc's per-thread cache and the allocation fast path.
//
// Each thread holds one span per span class (Go's mcache.alloc), and for each
// a copy of one 64-bit word of the span's alloc bitmap, complemented, so that
// a set bit is a free slot (Go's allocCache). Allocating is a count of
// trailing zeros, a bit clear in the copy, and a bit set in the span's
// bitmap in shared memory. The bit in shared memory is set before the
// object is returned: if the process dies at any instruction, the daemon
// sees every object that might be in use and never hands one out twice.
//
// A thread starts on a static empty cache whose words are all zero, so the
// fast path has no "attached yet?" branch: the first allocation misses and
// the slow path (slow_path.cpp) attaches, opens a cache, and refills.
//
// Freeing: the thread that holds the span (mspan::owner_cache == its token)
// clears the bit itself; anyone else sets its bit in the span's
// remote-free bitmap. Neither needs a lock; the local free needs no atomic
// read-modify-write either.
//
// Process memory only: nothing here lives in the segment except what the
// pointers point at.
#pragma once

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>

#include "shm/check.hpp"
#include "shm/layout.hpp"
#include "shm/mspan.hpp"

namespace shmalloc::client {

// One span class's current span, as the allocation fast path wants it: the
// free bits of one bitmap word, where that word lives in shared memory, and
// the address of the word's first object. 32 bytes: the entry of a span
// class is found with a shift.
struct mcache_entry {
  std::uint64_t free_bits = 0;    // complemented *bits: 1 = free
  shared_atomic<std::uint64_t>* bits = nullptr;  // &span->alloc_bits[word]; nullptr: no span held
  std::byte* word_base = nullptr; // slot word * 64's address in this process
  std::uint32_t elem_size = 0;
  std::uint32_t word = 0;         // which word of the span's bitmap bits points at

  mspan* span() const noexcept {  // the span whose bitmap bits points into
    return bits == nullptr ? nullptr
                           : reinterpret_cast<mspan*>(reinterpret_cast<std::byte*>(bits - word) -
                                                      offsetof(mspan, alloc_bits));
  }
};
static_assert(sizeof(mcache_entry) == 32);

// A span class's spares, oldest first (see mcache::spares): a ring of span
// ids, each with a bit saying whether it was current since the last trim.
// Four cache lines: a thread keeps a class's working set of up to 64 spans
// its own, so that its frees into them stay local (a span beyond its spares
// is parked, and every free into it is remote).
struct alignas(64) spare_queue {
  static constexpr std::uint8_t capacity = 63;  // ring of 64, one left free
  static constexpr std::uint32_t used_bit = 0x8000'0000u;  // span ids are below it
  std::uint32_t ring[capacity + 1] = {};
  std::uint8_t head = 0;
  std::uint8_t n = 0;

  struct entry {
    std::uint32_t id;
    bool used;
  };
  // REQUIRES: k < n. The k-th oldest.
  entry at(std::uint8_t k) const noexcept {
    const std::uint32_t v = ring[(head + k) % (capacity + 1)];
    return {v & ~used_bit, (v & used_bit) != 0};
  }
  // REQUIRES: n > 0.
  entry pop_front() noexcept {
    const entry front = at(0);
    head = static_cast<std::uint8_t>((head + 1) % (capacity + 1));
    --n;
    return front;
  }
  // REQUIRES: n < capacity.
  void push_back(entry e) noexcept {
    ring[(head + n) % (capacity + 1)] = e.id | (e.used ? used_bit : 0);
    ++n;
  }
  // Keeps, in order, the spares keep(entry, k) says to keep, each marked
  // unused (a trim starts a new period); calls drop(entry) for the others.
  template <class Keep, class Drop>
  void filter(Keep keep, Drop drop) {
    const std::uint8_t was = n;
    for (std::uint8_t k = 0; k < was; ++k) {
      const entry e = pop_front();
      if (keep(e, k))
        push_back({e.id, false});
      else
        drop(e);
    }
  }
};
static_assert(sizeof(spare_queue) == 320);

// 64-byte aligned: alloc is 68 whole lines, and the line after it holds
// everything else the fast paths and every slow path read.
struct alignas(64) mcache {
  mcache_entry alloc[num_span_classes];
  // slot + 1, stored in mspan::owner_cache; ~0u never matches: the static
  // empty cache's, and that of a cache a detach emptied (its thread
  // outlived the detach, forget_thread_caches_locked), which its thread's
  // next slow path replaces.
  std::uint32_t token = ~0u;
  std::uint32_t slot = 0;
  stats_block* stats = nullptr;  // this thread's slot in the segment
  // The tiny allocator (Go's tiny, tinyoffset): the current 16-byte block of
  // a tiny span, how far it is used, and how many objects it holds. The
  // block's shared count carries a bias of tiny_bias (shm/mspan.hpp) while
  // it is current, so frees from anywhere cannot bring it to zero under us.
  std::byte* tiny = nullptr;
  std::uint32_t tiny_offset = tiny_size;  // full: the empty cache never fits
  std::uint32_t tiny_count = 0;
  // Trimming (trim.cpp, trim_thread_locked): a span class whose slow path
  // ran, or whose free bits changed, since the last trim is active; the
  // others give their spans back.
  std::uint64_t active[(num_span_classes + 63) / 64] = {};
  std::uint32_t slow_calls = 0;
  // Spans this thread filled, still held (owner_cache is its token, so frees
  // into them stay local): a span class's working set can exceed one span.
  // When the current span runs dry the thread looks here before asking the
  // pool or the daemon (mimalloc's page queues, in small).
  static constexpr std::uint64_t max_spare_bytes = 512 << 10;  // per span class
  static constexpr std::uint8_t spares_kept_by_trim = 2;        // the first two stay, used or not
  spare_queue spares[num_span_classes] = {};
  std::uint64_t free_bits_at_trim[num_span_classes] = {};
  std::uint64_t last_trim_ns = 0;
  // SHMALLOC_PROFILE_RATE (profile.cpp): bytes to this thread's next sample,
  // and its random stream (0: not drawn yet).
  std::int64_t profile_countdown = 0;
  std::uint64_t profile_rng = 0;
};
static_assert(offsetof(mcache, slow_calls) / 64 == offsetof(mcache, token) / 64,
              "the fields every slow path reads share the free fast path's line");
static_assert(offsetof(mcache, spares) % 64 == 0, "each spare_queue starts a line");


// The calling thread's cache; the static empty cache until its first miss.
// initial-exec TLS: one load from the thread pointer, never a call. constinit
// here too: the fast paths are inlined into files that do not define
// t_cache (c_api.cpp), and without it they would call its TLS init function.
extern constinit thread_local mcache* t_cache __attribute__((tls_model("initial-exec")));

// Slow paths (slow_path.cpp): out of line and cold. size is the request's,
// for the sampled request histogram (mcache_slot::requests); 0: none.
SHMALLOC_SLOW_PATH void* alloc_slow(std::uint8_t size_class, bool noscan, std::size_t size) noexcept;

SHMALLOC_FAST_PATH void* alloc_small(std::uint8_t size_class, bool noscan, std::size_t request) noexcept {
  mcache* mc = t_cache;
  // span_class::make, in a register-wide index (a byte index costs GCC two
  // extra instructions here).
  mcache_entry& e = mc->alloc[(std::size_t{size_class} << 1) | std::size_t{noscan}];
  const std::uint64_t bits = e.free_bits;
  if (SHMALLOC_UNLIKELY(bits == 0)) return alloc_slow(size_class, noscan, request);
  std::byte* const base = e.word_base;
  const std::uint32_t size = e.elem_size;
  const auto i = static_cast<std::uint32_t>(std::countr_zero(bits));
  e.free_bits = bits & (bits - 1);
  set_alloc_bits(*e.bits, std::uint64_t{1} << i);  // published before the object is
  bump(mc->stats->small_allocs[size_class]);
  return base + std::size_t{i} * size;
}

SHMALLOC_SLOW_PATH void* alloc_tiny_slow(std::size_t size) noexcept;

// Pointer-free objects under 16 bytes, packed into 16-byte blocks (Go's
// tiny allocator): aligned to 8, 4 or 2 as their size allows.
SHMALLOC_FAST_PATH void* alloc_tiny(std::size_t size) noexcept {
  mcache* mc = t_cache;
  std::uint32_t off = mc->tiny_offset;
  if (size % 8 == 0) off = (off + 7) & ~7u;
  else if (size % 4 == 0) off = (off + 3) & ~3u;
  else if (size % 2 == 0) off = (off + 1) & ~1u;
  if (SHMALLOC_UNLIKELY(off + size > tiny_size)) return alloc_tiny_slow(size);
  mc->tiny_offset = off + static_cast<std::uint32_t>(size);
  ++mc->tiny_count;
  bump(mc->stats->tiny_allocs);
  return mc->tiny + off;
}

}  // namespace shmalloc::client
