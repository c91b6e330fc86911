// mheap.hpp: the page heap (Go's mheap), operated by the daemon alone.
//
// mheap carves spans out of free page runs (page_alloc.hpp), grows the
// committed heap in whole 4 MiB chunks when no run fits, keeps the span
// table (a free list of mspan descriptors, committed on demand like Go's
// fixalloc) and the page -> span map, and runs the scavenger that returns
// idle pages to the OS.
//
// All of its state lives in the segment (mheap_state and the regions named in
// layout.hpp), so a daemon that restarts on an existing heap finds it intact.
// This object only holds process-local pointers to it. It is not thread-safe:
// the daemon calls it only under its heap lock (service/daemon.hpp), from
// whichever of its threads (sessions, housekeeping) holds that lock.
#pragma once

#include <cstdint>

#include "shm/errc.hpp"
#include "shm/mcentral.hpp"
#include "shm/mspan.hpp"
#include "shm/page_alloc.hpp"

namespace shmalloc {

class segment;

class mheap {
 public:
  // A clock in nanoseconds; tests pass a fake one to drive the scavenger.
  using clock_fn = std::uint64_t (*)() noexcept;
  static std::uint64_t monotonic_ns() noexcept;

  explicit mheap(segment& seg, clock_fn clock = &monotonic_ns) noexcept;

  // A span of npages pages for span class spc, in the given state, held by
  // owner (0 = the daemon). Grows the heap if no free run fits; recommits
  // released pages it reuses. errc::no_memory at capacity, errc::no_space
  // when /dev/shm is full; the heap is unchanged on failure.
  result<span_id> alloc_span(std::uint32_t npages, span_class spc, mspan_state state, std::uint32_t owner);
  // A large object (> max_small_size bytes) on a span of its own.
  result<span_id> alloc_large(std::uint64_t bytes, bool noscan, std::uint32_t owner);
  // Returns a span's pages to the free runs (coalescing with neighbours) and
  // its descriptor to the span table.
  void free_span(span_id id) noexcept;

  // After a daemon died in the middle of a change (shm/rebuild.cpp): spans
  // half carved or half freed become dead, and the free page runs, the
  // page map's stray entries, the span table's free list, the mcentral
  // lists and the accounts are derived from the span table again. Returns
  // the spans dropped. The daemon runs it on every heap it adopts.
  std::uint32_t rebuild() noexcept;

  // Commits at least npages more pages (rounded up to whole chunks).
  error grow(std::uint32_t npages) noexcept;

  // Returns free, committed pages to the OS, highest address first, from
  // chunks in which no page was freed for min_idle_ns. Stops after about
  // max_bytes. Returns the bytes released.
  std::uint64_t scavenge(std::uint64_t min_idle_ns, std::uint64_t max_bytes = ~std::uint64_t{0}) noexcept;

  // mcache slots: per-thread statistics blocks in the segment. assign_cache
  // finds a free slot (committing more slots as needed) and marks it used by
  // client; retire_cache folds its counters into mheap_state::retired, so the
  // totals stay monotonic, and frees it. daemon_client marks the daemon's own.
  static constexpr std::uint32_t daemon_client = 0xffffffffu;
  result<std::uint32_t> assign_cache(std::uint32_t client);
  void retire_cache(std::uint32_t slot) noexcept;
  mcache_slot& cache_slot(std::uint32_t slot) const noexcept;

  mcentral central(span_class spc) noexcept { return mcentral(*this, spc); }

  segment& seg() const noexcept { return *seg_; }
  const heap_view& view() const noexcept { return view_; }
  mspan& span(span_id id) const noexcept { return view_.span(id); }
  page_alloc& pages() noexcept { return pages_; }
  const page_alloc& pages() const noexcept { return pages_; }
  mheap_state& state() const noexcept;
  heap_accounts& accounts() const noexcept;
  bool is_released(page_id p) const noexcept { return (released_[p.value / 64] >> (p.value % 64)) & 1; }
  std::uint64_t released_word(std::uint32_t w) const noexcept { return released_[w]; }
  const chunk_info& chunk(std::uint32_t c) const noexcept { return chunks_[c]; }
  std::uint64_t now() const noexcept { return clock_(); }

 private:
  result<span_id> new_descriptor();
  void free_descriptor(span_id id) noexcept;
  error recommit(page_id first, std::uint32_t npages) noexcept;
  // The segment's commit, each failure counted in grow_failures: whatever
  // part of the heap could not grow (pages, page map, span table, cache
  // slots, released pages taken back), /dev/shm full is one alert.
  error commit_counted(std::uint64_t offset, std::uint64_t bytes) noexcept;
  void set_page_map(page_id first, std::uint32_t npages, std::uint32_t entry) noexcept;
  void note_freed(page_id first, std::uint32_t npages) noexcept;
  std::uint64_t release_run(page_id first, std::uint32_t npages) noexcept;
  std::uint64_t arena_offset(page_id p) const noexcept;
  void recount_released(std::uint64_t committed) noexcept;

  segment* seg_;
  clock_fn clock_;
  heap_view view_;
  page_alloc pages_;
  std::uint64_t* released_;
  chunk_info* chunks_;
};

}  // namespace shmalloc
