#include "shm/crash_point.hpp"
#include "shm/mheap.hpp"

#include <algorithm>
#include <cstring>
#include <ctime>

#include "shm/profile.hpp"
#include "shm/segment.hpp"

namespace shmalloc {

namespace {
constexpr std::uint32_t descriptors_per_commit = 1024;  // 192 KiB: a whole number of OS pages
static_assert(descriptors_per_commit * sizeof(mspan) % os_page == 0);

std::uint64_t round_up(std::uint64_t v, std::uint64_t to) { return (v + to - 1) / to * to; }
}  // namespace

std::uint64_t mheap::monotonic_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1'000'000'000ULL + static_cast<std::uint64_t>(ts.tv_nsec);
}

mheap::mheap(segment& seg, clock_fn clock) noexcept
    : seg_(&seg),
      clock_(clock),
      view_(heap_view::of(seg)),
      pages_(seg.at<std::uint64_t>(seg.regions().page_bits.offset),
             seg.at<page_summary>(seg.regions().page_summary.offset), seg.header().summary_leaves),
      released_(seg.at<std::uint64_t>(seg.regions().released.offset)),
      chunks_(seg.at<chunk_info>(seg.regions().chunks.offset)) {}

mheap_state& mheap::state() const noexcept { return seg_->heap(); }
heap_accounts& mheap::accounts() const noexcept { return seg_->heap().accounts; }

std::uint64_t mheap::arena_offset(page_id p) const noexcept {
  return seg_->regions().arenas.offset + std::uint64_t{p.value} * page_size;
}

// ---------------------------------------------------------------------------
// Growth
// ---------------------------------------------------------------------------

error mheap::grow(std::uint32_t npages) noexcept {
  heap_accounts& a = accounts();
  const std::uint64_t committed = a.pages_committed.load(std::memory_order_relaxed);
  const std::uint64_t max_pages = seg_->header().max_pages;
  std::uint64_t n = round_up(std::max<std::uint64_t>(npages, chunk_pages), chunk_pages);
  n = std::min(n, max_pages - committed);
  if (n < npages || n == 0) {
    bump(a.grow_failures);
    return {errc::no_memory, "heap '" + seg_->name() + "' is at its capacity of " +
                                 std::to_string(max_pages * page_size) + " bytes"};
  }
  // The page map first (small), then the pages: a failure leaves the heap's
  // marks where they were.
  const region& pm = seg_->regions().page_map;
  const std::uint64_t map_from = round_up(committed * 4, os_page);
  const std::uint64_t map_to = round_up((committed + n) * 4, os_page);
  error e = commit_counted(pm.offset + map_from, map_to - map_from);
  if (e.code == errc::ok) e = commit_counted(arena_offset(page_id{static_cast<std::uint32_t>(committed)}), n * page_size);
  if (e.code != errc::ok) return e;
  bump(a.metadata_committed_bytes, map_to - map_from);
  const page_id first{static_cast<std::uint32_t>(committed)};
  SHMALLOC_CRASH_POINT("mheap.grow");
  pages_.mark_free(first, static_cast<std::uint32_t>(n));
  note_freed(first, static_cast<std::uint32_t>(n));
  a.pages_committed.store(committed + n, std::memory_order_relaxed);
  bump(a.grow_count);
  return {};
}

error mheap::commit_counted(std::uint64_t offset, std::uint64_t bytes) noexcept {
  error e = seg_->commit(offset, bytes);
  if (e.code != errc::ok) bump(accounts().grow_failures);
  return e;
}

// ---------------------------------------------------------------------------
// Span descriptors (fixalloc)
// ---------------------------------------------------------------------------

result<span_id> mheap::new_descriptor() {
  span_pool_state& pool = state().span_pool;
  if (pool.free_head) {
    const span_id id = pool.free_head;
    pool.free_head = span(id).next;
    ++pool.in_use;
    return id;
  }
  if (pool.high_water == pool.committed) {
    const std::uint32_t max = seg_->header().max_spans;
    if (pool.committed >= max) {
      bump(accounts().grow_failures);
      return error{errc::no_memory, "span table is full"};
    }
    const std::uint32_t add = std::min(descriptors_per_commit, max - pool.committed);
    const region& r = seg_->regions().spans;
    const std::uint64_t from = std::uint64_t{pool.committed} * sizeof(mspan);
    const std::uint64_t to = round_up(std::uint64_t{pool.committed + add} * sizeof(mspan), os_page);
    if (error e = commit_counted(r.offset + from, to - from); e.code != errc::ok) return e;
    pool.committed += add;
    bump(accounts().metadata_committed_bytes, to - from);
  }
  ++pool.in_use;
  return span_id{pool.high_water++};
}

void mheap::free_descriptor(span_id id) noexcept {
  span_pool_state& pool = state().span_pool;
  mspan& s = span(id);
  s.state.store(mspan_state::dead, std::memory_order_relaxed);
  s.next = pool.free_head;
  pool.free_head = id;
  --pool.in_use;
}

// ---------------------------------------------------------------------------
// mcache slots
// ---------------------------------------------------------------------------

mcache_slot& mheap::cache_slot(std::uint32_t slot) const noexcept {
  return seg_->at<mcache_slot>(seg_->regions().caches.offset)[slot];
}

result<std::uint32_t> mheap::assign_cache(std::uint32_t client) {
  if (client == 0) return error{errc::invalid_argument, "client id 0 marks a free cache slot"};
  heap_accounts& a = accounts();
  const auto committed = static_cast<std::uint32_t>(a.caches_committed.load(std::memory_order_relaxed));
  for (std::uint32_t i = 0; i < committed; ++i) {
    if (cache_slot(i).client.load(std::memory_order_relaxed) != 0) continue;
    // retire_cache zeroed it; zero again in case a late bump of the slot's
    // previous thread landed after that (it was already retired).
    std::memset(static_cast<void*>(&cache_slot(i).stats), 0, sizeof(stats_block));
    std::memset(static_cast<void*>(&cache_slot(i).requests), 0, sizeof(request_stats));
    SHMALLOC_CRASH_POINT("mheap.assign_cache");
    cache_slot(i).client.store(client, std::memory_order_relaxed);
    bump(a.caches_in_use);
    return i;
  }
  const std::uint32_t max = seg_->header().max_caches;
  if (committed >= max) return error{errc::no_memory, "all " + std::to_string(max) + " cache slots are in use"};
  // Commit whole OS pages of slots at a time.
  const region& r = seg_->regions().caches;
  const std::uint64_t from = round_up(std::uint64_t{committed} * sizeof(mcache_slot), os_page);
  const std::uint64_t to = std::min(r.bytes, round_up((committed + 1ULL) * sizeof(mcache_slot), os_page) + 15 * os_page);
  if (error e = commit_counted(r.offset + from, to - from); e.code != errc::ok) return e;
  bump(a.metadata_committed_bytes, to - from);
  const auto now_committed = static_cast<std::uint32_t>(std::min<std::uint64_t>(to / sizeof(mcache_slot), max));
  a.caches_committed.store(now_committed, std::memory_order_relaxed);
  cache_slot(committed).client.store(client, std::memory_order_relaxed);
  bump(a.caches_in_use);
  return committed;
}

void mheap::retire_cache(std::uint32_t slot) noexcept {
  mcache_slot& s = cache_slot(slot);
  stats_block& r = state().retired;
  for (std::size_t c = 0; c < num_size_classes; ++c) {
    bump(r.small_allocs[c], s.stats.small_allocs[c].load(std::memory_order_relaxed));
    bump(r.small_frees[c], s.stats.small_frees[c].load(std::memory_order_relaxed));
  }
#define SHMALLOC_X(name, help) bump(r.name, s.stats.name.load(std::memory_order_relaxed));
  SHMALLOC_STAT_COUNTERS(SHMALLOC_X)
#undef SHMALLOC_X
  request_stats& rr = state().retired_requests;
  for (std::size_t c = 0; c < num_size_classes; ++c) {
    for (std::uint32_t k = 0; k < request_buckets; ++k)
      bump(rr.hist[c][k], s.requests.hist[c][k].load(std::memory_order_relaxed));
    bump(rr.bytes[c], s.requests.bytes[c].load(std::memory_order_relaxed));
  }
  SHMALLOC_CRASH_POINT("mheap.retire_cache");
  std::memset(static_cast<void*>(&s.stats), 0, sizeof s.stats);
  std::memset(static_cast<void*>(&s.requests), 0, sizeof s.requests);
  s.client.store(0, std::memory_order_relaxed);
  heap_accounts& a = accounts();
  a.caches_in_use.store(a.caches_in_use.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
}

// ---------------------------------------------------------------------------
// Spans
// ---------------------------------------------------------------------------

error mheap::recommit(page_id first, std::uint32_t npages) noexcept {
  // Commit the released pages of the run again before anyone touches them:
  // a punched hole would otherwise be backed on first touch, and a full
  // /dev/shm would then be a SIGBUS in some client.
  std::uint32_t released = 0;
  for (std::uint32_t p = first.value; p < first.value + npages; ++p) released += is_released(page_id{p});
  if (released == 0) return {};
  if (error e = commit_counted(arena_offset(first), std::uint64_t{npages} * page_size); e.code != errc::ok) return e;
  for (std::uint32_t p = first.value; p < first.value + npages; ++p) {
    if (!is_released(page_id{p})) continue;
    released_[p / 64] &= ~(std::uint64_t{1} << (p % 64));
    --chunks_[p / chunk_pages].released_pages;
  }
  heap_accounts& a = accounts();
  a.pages_released.store(a.pages_released.load(std::memory_order_relaxed) - released, std::memory_order_relaxed);
  bump(a.recommitted_bytes_total, std::uint64_t{released} * page_size);
  return {};
}

void mheap::set_page_map(page_id first, std::uint32_t npages, std::uint32_t entry) noexcept {
  std::fill(view_.page_map + first.value, view_.page_map + first.value + npages, entry);
}

void mheap::note_freed(page_id first, std::uint32_t npages) noexcept {
  const std::uint64_t t = now();
  for (std::uint32_t c = first.value / chunk_pages; c <= (first.value + npages - 1) / chunk_pages; ++c)
    chunks_[c].last_free_ns = t;
}

result<span_id> mheap::alloc_span(std::uint32_t npages, span_class spc, mspan_state st, std::uint32_t owner) {
  if (npages == 0 || npages > seg_->header().max_pages)
    return error{errc::invalid_argument, "a span has 1 to max_pages pages"};
  page_id first = pages_.find(npages);
  if (!first) {
    if (error e = grow(npages); e.code != errc::ok) return e;
    first = pages_.find(npages);
    SHMALLOC_CHECK(first, "a run must fit after growth");
  }
  if (error e = recommit(first, npages); e.code != errc::ok) return e;
  auto id = new_descriptor();
  if (!id) return id.err();
  pages_.mark_in_use(first, npages);
  SHMALLOC_CRASH_POINT("mheap.alloc_marked");
  set_page_map(first, npages, id->value + 1);

  mspan& s = span(*id);
  const std::uint8_t c = spc.size_class();
  s.start = first;
  s.npages = npages;
  s.span_class = spc.value;
  s.elem_size = c == 0 ? 0 : class_to_size(c);
  s.div_magic = class_div_magic(c);
  s.nelems = static_cast<std::uint16_t>(c == 0 ? 1 : class_to_objects(c));
  s.next = s.prev = span_id::nil();
  s.owner_client = owner;
  s.owner_cache.store(0, std::memory_order_relaxed);
  for (auto& w : s.remote_bits) w.store(0, std::memory_order_relaxed);
  s.alloc_count = 0;
  s.profile_sample.store(0, std::memory_order_relaxed);
  for (auto& w : s.alloc_bits) w.store(0, std::memory_order_relaxed);
  if (const std::uint32_t reserved = reserved_slots(spc.value); reserved != 0) {
    // Tiny span: its first blocks hold the per-block object counts.
    std::memset(view_.span_base(s), 0, std::size_t{reserved} * class_to_size(c));
    for (std::uint32_t i = 0; i < reserved; ++i) set_alloc_bits(s.alloc_bits[i / 64], std::uint64_t{1} << (i % 64));
    s.alloc_count = static_cast<std::uint16_t>(reserved);
  }
  SHMALLOC_CRASH_POINT("mheap.alloc_init");
  s.state.store(st, std::memory_order_relaxed);
  bump(accounts().pages_in_use, std::uint64_t{npages});
  return id;
}

result<span_id> mheap::alloc_large(std::uint64_t bytes, bool noscan, std::uint32_t owner) {
  const std::uint64_t npages = (bytes + page_size - 1) / page_size;
  if (bytes == 0 || npages > seg_->header().max_pages)
    return error{errc::no_memory, "a large object of " + std::to_string(bytes) + " bytes exceeds the heap's capacity"};
  auto id = alloc_span(static_cast<std::uint32_t>(npages), span_class::make(0, noscan), mspan_state::large, owner);
  if (!id) return id;
  mspan& s = span(*id);
  SHMALLOC_CRASH_POINT("mheap.large_span");
  s.alloc_bits[0].store(1, std::memory_order_relaxed);
  s.alloc_count = 1;
  heap_accounts& a = accounts();
  bump(a.large_spans);
  bump(a.large_pages, npages);
  return id;
}

void mheap::free_span(span_id id) noexcept {
  mspan& s = span(id);
  SHMALLOC_CHECK(s.state.load(std::memory_order_relaxed) != mspan_state::dead, "free of a dead span");
  heap_accounts& a = accounts();
  if (s.state.load(std::memory_order_relaxed) == mspan_state::large) {
    profile_release(view_, s);  // a sampled object's entry goes with it (a dead client's, or freed by request)
    a.large_spans.store(a.large_spans.load(std::memory_order_relaxed) - 1, std::memory_order_relaxed);
    a.large_pages.store(a.large_pages.load(std::memory_order_relaxed) - s.npages, std::memory_order_relaxed);
  }
  set_page_map(s.start, s.npages, 0);
  SHMALLOC_CRASH_POINT("mheap.free_unmapped");
  pages_.mark_free(s.start, s.npages);
  note_freed(s.start, s.npages);
  a.pages_in_use.store(a.pages_in_use.load(std::memory_order_relaxed) - s.npages, std::memory_order_relaxed);
  SHMALLOC_CRASH_POINT("mheap.free_pages");
  free_descriptor(id);
}

// ---------------------------------------------------------------------------
// Scavenger
// ---------------------------------------------------------------------------

std::uint64_t mheap::release_run(page_id first, std::uint32_t npages) noexcept {
  if (seg_->release(arena_offset(first), std::uint64_t{npages} * page_size).code != errc::ok) return 0;
  for (std::uint32_t p = first.value; p < first.value + npages; ++p) {
    released_[p / 64] |= std::uint64_t{1} << (p % 64);
    ++chunks_[p / chunk_pages].released_pages;
  }
  bump(accounts().pages_released, std::uint64_t{npages});
  return std::uint64_t{npages} * page_size;
}

std::uint64_t mheap::scavenge(std::uint64_t min_idle_ns, std::uint64_t max_bytes) noexcept {
  const auto committed = static_cast<std::uint32_t>(accounts().pages_committed.load(std::memory_order_relaxed));
  const std::uint64_t t = now();
  std::uint64_t done = 0;
  // Highest address first, as Go does: allocation prefers low addresses, so
  // the top of the heap is the likeliest to stay idle.
  for (std::uint32_t c = committed / chunk_pages; c-- > 0 && done < max_bytes;) {
    if (t - chunks_[c].last_free_ns < min_idle_ns) continue;
    const std::uint32_t lo = c * chunk_pages;
    auto idle = [&](std::uint32_t p) { return pages_.is_free(page_id{p}) && !is_released(page_id{p}); };
    for (std::uint32_t p = lo + chunk_pages; p > lo;) {
      while (p > lo && !idle(p - 1)) --p;
      const std::uint32_t end = p;
      while (p > lo && idle(p - 1)) --p;
      if (end > p) done += release_run(page_id{p}, end - p);
    }
  }
  bump(accounts().scavenged_bytes_total, done);
  return done;
}

}  // namespace shmalloc
