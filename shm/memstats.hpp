// memstats.hpp: the heap's accounts in Go's MemStats terms, derived in one
// place for every reader: the daemon's stats, classes and spans replies,
// shmallocctl, the demo, and the Prometheus collector (metrics/).
//
// Three reads, from cheap to thorough:
//
//   read_memstats   mheap's page and metadata accounts (heap_accounts).
//   read_census     adds every statistics block (each client thread's
//                   mcache slot, and the counters of retired slots) and
//                   mcentral's span counts, per size class. It reads about
//                   1.2 KB per committed slot: 1.2 MB at the default 1,024
//                   slots, tens of microseconds.
//   read_page_census  walks the page bitmap a word (64 pages) at a time:
//                   runs free, in use, released.
//
// The identities Go documents, and which the metrics tests assert:
//
//   heap_sys     = heap_inuse + heap_idle        (committed heap pages)
//   heap_idle    = free pages, released ones included
//   heap_inuse   = heap_alloc + heap_unused      (unused: free slots in
//                                                  in-use spans, fragmentation)
//   heap_objects = mallocs - frees
//
// As Go does (runtime/mstats.go), tiny objects count in both mallocs and
// frees: each is counted when packed, and its 16-byte block counts as one
// object of size class 2 until the block's last object is freed.
//
// Who may call: the page and span-pool fields read here are written by the
// daemon without atomics, always under its heap lock (service/daemon.hpp),
// so read_memstats, read_census and read_page_census run under that lock,
// or on a heap no daemon is changing. Statistics blocks are relaxed atomics written by their
// client threads at any time: totals read while clients run are a moment's
// view, not a consistent cut, so live counts are clamped at zero.
#pragma once

#include <array>
#include <cstdint>

#include "shm/mheap.hpp"
#include "shm/segment.hpp"

namespace shmalloc {

struct heap_memstats {
  std::uint64_t heap_sys_bytes = 0;
  std::uint64_t heap_inuse_bytes = 0;
  std::uint64_t heap_idle_bytes = 0;
  std::uint64_t heap_released_bytes = 0;
  std::uint64_t large_objects = 0;
  std::uint64_t large_bytes = 0;
  std::uint64_t mspan_inuse_bytes = 0;
  std::uint64_t mspan_sys_bytes = 0;
  std::uint64_t mcache_inuse_bytes = 0;
  std::uint64_t mcache_sys_bytes = 0;
  std::uint64_t metadata_sys_bytes = 0;
  std::uint64_t capacity_bytes = 0;
  std::uint64_t reclaimed_bytes_total = 0;  // taken back from clients that went away
  std::uint64_t scavenged_bytes_total = 0;  // returned to the OS
  std::uint64_t grow_failures = 0;
};

heap_memstats read_memstats(const mheap& h) noexcept;

// The sum of statistics blocks, as plain numbers.
struct stats_totals {
  std::uint64_t small_allocs[num_size_classes] = {};
  std::uint64_t small_frees[num_size_classes] = {};
#define SHMALLOC_X(name, help) std::uint64_t name = 0;
  SHMALLOC_STAT_COUNTERS(SHMALLOC_X)
#undef SHMALLOC_X
  void add(const stats_block& b) noexcept;
};

// One size class, both its span classes (scan and noscan) together.
struct class_census {
  std::uint32_t spans_partial = 0;  // on mcentral, with free slots
  std::uint32_t spans_full = 0;     // on mcentral, without
  std::uint32_t spans_cached = 0;   // out in client caches
  std::uint64_t mallocs = 0;
  std::uint64_t frees = 0;
  std::uint64_t live_objects() const noexcept { return mallocs > frees ? mallocs - frees : 0; }
  std::uint32_t spans() const noexcept { return spans_partial + spans_full + spans_cached; }
};

struct heap_census {
  heap_memstats mem;
  stats_totals stats;  // every block, retired ones included
  std::array<class_census, num_size_classes> classes{};  // [0] unused

  // Go's MemStats, derived.
  std::uint64_t mallocs_total() const noexcept;
  std::uint64_t frees_total() const noexcept;
  std::uint64_t alloc_bytes_total() const noexcept;
  std::uint64_t heap_objects() const noexcept;
  std::uint64_t heap_alloc_bytes() const noexcept;   // live objects' bytes (by size class)
  std::uint64_t heap_unused_bytes() const noexcept;  // heap_inuse - heap_alloc, at least 0
  // Bytes of class c's in-use spans, and those of them holding no live object.
  std::uint64_t class_inuse_bytes(std::size_t c) const noexcept;
  std::uint64_t class_unused_bytes(std::size_t c) const noexcept;
};

heap_census read_census(const mheap& h) noexcept;

// The page map, summarised (a page is free, in use, or free and released).
struct page_census {
  std::uint64_t page_size = shmalloc::page_size;
  std::uint64_t pages_capacity = 0;   // pages the heap may grow to
  std::uint64_t pages_committed = 0;  // pages backed by memory (or released)
  std::uint64_t pages_in_use = 0;
  std::uint64_t pages_free = 0;       // committed and free, not released
  std::uint64_t pages_released = 0;
  std::uint64_t runs_in_use = 0;      // maximal runs of each kind
  std::uint64_t runs_free = 0;
  std::uint64_t runs_released = 0;
  std::uint64_t largest_free_run_pages = 0;  // free or released, contiguous
  std::uint64_t spans_in_use = 0;     // descriptors in use (small and large)
  std::uint64_t large_spans = 0;
};

page_census read_page_census(const mheap& h) noexcept;

}  // namespace shmalloc
