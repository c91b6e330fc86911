// free.cpp: the free slow paths, where free_object (free.hpp) jumps for
// anything but a local free of a small object: remote frees (a span another
// thread or process holds), tiny objects (counted per 16-byte block), large
// objects (on to large.cpp), and bad pointers and double frees, each
// checked in full and reported by name (bad_free: fail-stop).
#include <atomic>
#include <cstdio>
#include <cstdlib>

#include "client/free.hpp"
#include "shm/crash_point.hpp"

namespace shmalloc::client {

namespace detail {

[[noreturn]] SHMALLOC_SLOW_PATH void bad_free(const void* p, const char* why) {
  std::fprintf(stderr, "shmalloc: free(%p): %s\n", p, why);
  std::abort();
}

namespace {

SHMALLOC_SLOW_PATH void free_remote(mspan& s, std::uint32_t index, std::uint8_t size_class, const void* p) noexcept {
  SHMALLOC_CRASH_POINT("free.remote_push");
  if (span_push_remote(g_view, s, index) == errc::double_free)
    bad_free(p, "double free (freed before by another thread or process, and not yet reclaimed)");
  mcache* mc = ensure_cache();
  SHMALLOC_CRASH_POINT("free.remote_pushed");
  if (mc == nullptr) return;  // counted nowhere: the daemon is gone
  bump(mc->stats->small_frees[size_class], std::uint64_t{1});
  bump(mc->stats->remote_frees, std::uint64_t{1});
  // A thread that only frees (into parked spans, most often) trims too.
  if (SHMALLOC_UNLIKELY(++mc->slow_calls % trim_check_every == 0)) maybe_trim(rt(), mc);
}

// The span holding p, or a bad_free report; *offset is p's offset in it.
SHMALLOC_FAST_PATH mspan& locate(const void* p, std::uint64_t* offset) noexcept {
  const heap_view& v = g_view;
  const span_id id = v.span_of(p);
  if (SHMALLOC_UNLIKELY(!id)) {
    const auto* b = static_cast<const std::byte*>(p);
    bad_free(p, v.base == nullptr || b < v.arenas || b >= v.base + g_size ? "not a pointer into the shared heap"
                                                                          : "not inside an allocated span (already freed?)");
  }
  mspan& s = v.span(id);
  *offset = static_cast<std::uint64_t>(static_cast<const std::byte*>(p) - v.span_base(s));
  return s;
}

// A tiny object: one less in its block; the last one out frees the block.
SHMALLOC_SLOW_PATH void free_tiny(mspan& s, std::uint64_t offset, const void* p) noexcept {
  const auto block = static_cast<std::uint32_t>(offset / tiny_size);
  if (block < tiny_metadata_blocks || !is_allocated(s, block)) bad_free(p, "not a live tiny object (double free?)");
  // Each offset is freed once per use of the block (the taker cleared it).
  const auto bit = static_cast<std::uint16_t>(1u << (offset % tiny_size));
  if ((tiny_freed_mask(g_view, s, block).fetch_or(bit, std::memory_order_acq_rel) & bit) != 0)
    bad_free(p, "double free (of a tiny object)");
  SHMALLOC_CRASH_POINT("free.tiny_masked");
  const std::int8_t before = tiny_count(g_view, s, block).fetch_sub(1, std::memory_order_acq_rel);
  if (before <= 0) bad_free(p, "double free (of a tiny object)");
  SHMALLOC_CRASH_POINT("free.tiny_last");
  if (before == 1) free_slot(s, block, tiny_size_class, p);
}

}  // namespace

}  // namespace detail

using namespace detail;

SHMALLOC_FAST_PATH void free_slot_inline(mspan& s, std::uint32_t i, std::uint8_t size_class, const void* p) noexcept {
  mcache* mc = t_cache;
  if (SHMALLOC_UNLIKELY(s.owner_cache.load(std::memory_order_relaxed) != mc->token))
    return free_remote(s, i, size_class, p);
  const std::uint64_t bit = std::uint64_t{1} << (i % 64);
  if (SHMALLOC_UNLIKELY((s.alloc_bits[i / 64].load(std::memory_order_relaxed) & bit) == 0)) bad_free(p, "double free");
  clear_alloc_bits(s.alloc_bits[i / 64], bit);
  bump(mc->stats->small_frees[size_class]);
}

namespace detail {

// Every free the fast path does not finish: large and tiny objects, remote
// frees, and bad pointers, each checked in full and reported by name.
SHMALLOC_SLOW_PATH void free_slow(void* p) noexcept {
  if (p == nullptr) return;
  if (g_view.committed_pages != nullptr)
    g_committed.store(g_view.committed_pages->load(std::memory_order_relaxed), std::memory_order_relaxed);
  std::uint64_t offset = 0;
  mspan& s = locate(p, &offset);
  if (SHMALLOC_UNLIKELY(s.elem_size == 0)) {
    if (offset != 0) bad_free(p, "not the start of an object");
    return free_large(p, s);
  }
  if (s.span_class == tiny_span_class) return free_tiny(s, offset, p);
  // Go's division-free object index: a multiply by the class's magic.
  const std::uint8_t size_class = span_class{s.span_class}.size_class();
  const object_position at = object_position_of(static_cast<std::uint32_t>(offset), class_div_magic(size_class));
  if (!at.start || at.index >= s.nelems) bad_free(p, "not the start of an object");
  free_slot_inline(s, at.index, size_class, p);
}

// An object of a span this thread does not hold, whose index the fast path
// found: a remote free, without finding the span again. Steps into a span's
// tail, and any span without a size class (large spans never get here: their
// magic is 0), go to free_slow.
SHMALLOC_SLOW_PATH void free_other(void* p, mspan& s, std::uint32_t i) noexcept {
  if (s.elem_size == 0 || i >= s.nelems) return free_slow(p);
  free_remote(s, i, span_class{s.span_class}.size_class(), p);
}

void free_slot(mspan& s, std::uint32_t i, std::uint8_t size_class, const void* p) noexcept {
  free_slot_inline(s, i, size_class, p);
}

}  // namespace detail

}  // namespace shmalloc::client
