#include "shm/memstats.hpp"

#include <algorithm>
#include <bit>

namespace shmalloc {

namespace {
std::uint64_t get(const shared_atomic<std::uint64_t>& v) noexcept { return v.load(std::memory_order_relaxed); }
}  // namespace

heap_memstats read_memstats(const mheap& h) noexcept {
  const heap_accounts& a = h.accounts();
  const span_pool_state& pool = h.state().span_pool;
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
  m.reclaimed_bytes_total = get(a.reclaimed_bytes_total);
  m.scavenged_bytes_total = get(a.scavenged_bytes_total);
  m.grow_failures = get(a.grow_failures);
  return m;
}

void stats_totals::add(const stats_block& b) noexcept {
  for (std::size_t c = 0; c < num_size_classes; ++c) {
    small_allocs[c] += get(b.small_allocs[c]);
    small_frees[c] += get(b.small_frees[c]);
  }
#define SHMALLOC_X(name, help) name += get(b.name);
  SHMALLOC_STAT_COUNTERS(SHMALLOC_X)
#undef SHMALLOC_X
}

heap_census read_census(const mheap& h) noexcept {
  heap_census c;
  c.mem = read_memstats(h);
  c.stats.add(h.state().retired);
  const auto slots = get(h.accounts().caches_committed);
  for (std::uint64_t i = 0; i < slots; ++i) c.stats.add(h.cache_slot(static_cast<std::uint32_t>(i)).stats);
  for (std::size_t spc = 2; spc < num_span_classes; ++spc) {
    const mcentral_state& m = h.state().central[spc];
    class_census& k = c.classes[span_class{static_cast<std::uint8_t>(spc)}.size_class()];
    k.spans_partial += m.partial_count;
    k.spans_full += m.full_count;
    k.spans_cached += m.cached_count;
  }
  for (std::size_t s = 1; s < num_size_classes; ++s) {
    c.classes[s].mallocs = c.stats.small_allocs[s];
    c.classes[s].frees = c.stats.small_frees[s];
  }
  return c;
}

std::uint64_t heap_census::mallocs_total() const noexcept {
  std::uint64_t n = stats.large_allocs + stats.tiny_allocs;
  for (std::size_t s = 1; s < num_size_classes; ++s) n += classes[s].mallocs;
  return n;
}

std::uint64_t heap_census::frees_total() const noexcept {
  std::uint64_t n = stats.large_frees + stats.tiny_allocs;
  for (std::size_t s = 1; s < num_size_classes; ++s) n += classes[s].frees;
  return n;
}

std::uint64_t heap_census::alloc_bytes_total() const noexcept {
  std::uint64_t n = stats.large_alloc_bytes;
  for (std::size_t s = 1; s < num_size_classes; ++s)
    n += classes[s].mallocs * class_to_size(static_cast<std::uint8_t>(s));
  return n;
}

std::uint64_t heap_census::heap_objects() const noexcept {
  const std::uint64_t m = mallocs_total(), f = frees_total();
  return m > f ? m - f : 0;
}

std::uint64_t heap_census::heap_alloc_bytes() const noexcept {
  std::uint64_t n = stats.large_alloc_bytes > stats.large_free_bytes ? stats.large_alloc_bytes - stats.large_free_bytes : 0;
  for (std::size_t s = 1; s < num_size_classes; ++s)
    n += classes[s].live_objects() * class_to_size(static_cast<std::uint8_t>(s));
  return n;
}

std::uint64_t heap_census::heap_unused_bytes() const noexcept {
  const std::uint64_t alloc = heap_alloc_bytes();
  return mem.heap_inuse_bytes > alloc ? mem.heap_inuse_bytes - alloc : 0;
}

std::uint64_t heap_census::class_inuse_bytes(std::size_t s) const noexcept {
  return std::uint64_t{classes[s].spans()} * class_span_bytes(static_cast<std::uint8_t>(s));
}

std::uint64_t heap_census::class_unused_bytes(std::size_t s) const noexcept {
  const std::uint64_t spans_bytes = class_inuse_bytes(s);
  const std::uint64_t live = classes[s].live_objects() * class_to_size(static_cast<std::uint8_t>(s));
  return spans_bytes > live ? spans_bytes - live : 0;
}

namespace {
// Pages of m that start a run: set, with the page below not set (carry is
// the top page of the word below).
std::uint64_t run_starts(std::uint64_t m, std::uint64_t carry) noexcept { return m & ~((m << 1) | carry); }
}  // namespace

// A word (64 pages) at a time: a 1 TiB heap is 2 million words, not 134
// million pages.
page_census read_page_census(const mheap& h) noexcept {
  page_census p;
  p.pages_capacity = h.seg().header().max_pages;
  p.pages_committed = get(h.accounts().pages_committed);
  p.spans_in_use = h.state().span_pool.in_use;
  p.large_spans = get(h.accounts().large_spans);
  p.largest_free_run_pages = h.pages().longest_free_run();  // uncommitted pages count as not free
  std::uint64_t top_used = 0, top_free = 0, top_released = 0;
  for (std::uint64_t first = 0; first < p.pages_committed; first += 64) {
    const auto w = static_cast<std::uint32_t>(first / 64);
    const std::uint64_t left = p.pages_committed - first;
    const std::uint64_t valid = left >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << left) - 1;
    const std::uint64_t used = h.pages().word(w) & valid;
    const std::uint64_t released = h.released_word(w) & ~used & valid;
    const std::uint64_t free = ~used & ~released & valid;
    p.pages_in_use += static_cast<std::uint64_t>(std::popcount(used));
    p.pages_released += static_cast<std::uint64_t>(std::popcount(released));
    p.pages_free += static_cast<std::uint64_t>(std::popcount(free));
    p.runs_in_use += static_cast<std::uint64_t>(std::popcount(run_starts(used, top_used)));
    p.runs_released += static_cast<std::uint64_t>(std::popcount(run_starts(released, top_released)));
    p.runs_free += static_cast<std::uint64_t>(std::popcount(run_starts(free, top_free)));
    top_used = used >> 63;
    top_released = released >> 63;
    top_free = free >> 63;
  }
  return p;
}

}  // namespace shmalloc
