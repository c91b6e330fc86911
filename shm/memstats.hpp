// memstats.hpp: the heap's accounts in Go's MemStats terms, derived in one
// place from mheap_state (daemon-written) for every reader: the daemon's
// stats reply, the demo, and the metrics collector.
//
//   heap_sys  = heap_inuse + heap_idle        (committed heap pages)
//   heap_idle = free pages, released ones included
#pragma once

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
};

// Reads span-pool fields only the daemon writes: call it on the daemon's
// thread, or on a heap no daemon is changing.
inline heap_memstats read_memstats(const mheap& h) noexcept {
  const heap_accounts& a = h.accounts();
  const span_pool_state& pool = h.state().span_pool;
  auto get = [](const shared_atomic<std::uint64_t>& v) { return v.load(std::memory_order_relaxed); };
  heap_memstats m;
  m.heap_sys_bytes = get(a.pages_committed) * page_size;
  m.heap_inuse_bytes = get(a.pages_in_use) * page_size;
  m.heap_idle_bytes = m.heap_sys_bytes - m.heap_inuse_bytes;
  m.heap_released_bytes = get(a.pages_released) * page_size;
  m.large_objects = get(a.large_spans);
  m.large_bytes = get(a.large_pages) * page_size;
  m.mspan_inuse_bytes = std::uint64_t{pool.in_use} * sizeof(mspan);
  m.mspan_sys_bytes = std::uint64_t{pool.committed} * sizeof(mspan);
  m.mcache_inuse_bytes = get(a.caches_in_use) * sizeof(mcache_slot);
  m.mcache_sys_bytes = get(a.caches_committed) * sizeof(mcache_slot);
  m.metadata_sys_bytes = get(a.metadata_committed_bytes);
  m.capacity_bytes = h.seg().header().capacity;
  return m;
}

}  // namespace shmalloc
