// rebuild.cpp: mheap::rebuild, the daemon's repair of a heap whose previous
// daemon died in the middle of changing it.
//
// The daemon changes its own structures (free page runs, the span table's
// free list, the mcentral lists, the accounts) in several stores, and a
// SIGKILL can land between any two. What clients rely on is written so that
// it is whole at every instruction: a span's state is stored last when it
// is carved, and its page_map entries are cleared first when it is freed;
// alloc bits are set before an object is handed out. So the span table and
// the page map, read under those two rules, say which spans exist, and
// everything else is derived from them again here. Run on adoption, before
// the checker; O(spans + committed pages).
#include <vector>

#include "shm/mheap.hpp"
#include "shm/profile.hpp"
#include "shm/segment.hpp"

namespace shmalloc {

namespace {

// A span whose state says in use, whose geometry is whole and whose pages
// all name it. Anything else was being carved (its state not stored yet) or
// freed (its pages already unnamed) when the daemon died: dead.
bool is_whole(const heap_view& v, std::uint32_t i, std::uint64_t committed) {
  const mspan& s = v.span(span_id{i});
  const mspan_state st = s.state.load(std::memory_order_relaxed);
  if (st == mspan_state::dead) return false;
  if (s.npages == 0 || s.start.value + std::uint64_t{s.npages} > committed) return false;
  for (std::uint32_t p = s.start.value; p < s.start.value + s.npages; ++p)
    if (v.page_map[p] != i + 1) return false;
  const std::uint8_t c = span_class{s.span_class}.size_class();
  if (st == mspan_state::large) return c == 0;
  return (st == mspan_state::cached || st == mspan_state::central) && c != 0 && s.npages == class_to_npages(c) &&
         s.nelems == class_to_objects(c);
}

}  // namespace

std::uint32_t mheap::rebuild() noexcept {
  const heap_view& v = view_;
  heap_accounts& a = accounts();
  mheap_state& st = state();
  const std::uint64_t committed = a.pages_committed.load(std::memory_order_relaxed);
  const std::uint32_t high_water = st.span_pool.high_water;

  std::vector<bool> whole(high_water);
  std::uint32_t dropped = 0;
  for (std::uint32_t i = 0; i < high_water; ++i) {
    whole[i] = is_whole(v, i, committed);
    if (!whole[i] && span(span_id{i}).state.load(std::memory_order_relaxed) != mspan_state::dead) {
      span(span_id{i}).state.store(mspan_state::dead, std::memory_order_relaxed);
      ++dropped;
    }
  }
  // The page map names whole spans only; every other committed page is free.
  for (std::uint64_t p = 0; p < committed; ++p) {
    const std::uint32_t e = v.page_map[p];
    if (e != 0 && (e > high_water || !whole[e - 1])) v.page_map[p] = 0;
  }
  pages_.mark_free(page_id{0}, static_cast<std::uint32_t>(committed));
  // The span table's free list, the mcentral lists and the accounts, anew.
  st.span_pool.free_head = span_id::nil();
  st.span_pool.in_use = 0;
  for (auto& m : st.central) m = mcentral_state{};
  std::uint64_t pages = 0, large = 0, large_pages = 0;
  for (std::uint32_t i = high_water; i-- > 0;) {
    mspan& s = span(span_id{i});
    if (!whole[i]) {
      s.next = st.span_pool.free_head;
      st.span_pool.free_head = span_id{i};
      continue;
    }
    ++st.span_pool.in_use;
    pages_.mark_in_use(s.start, s.npages);
    pages += s.npages;
    const mspan_state state = s.state.load(std::memory_order_relaxed);
    if (state == mspan_state::large) ++large, large_pages += s.npages;
  }
  a.pages_in_use.store(pages, std::memory_order_relaxed);
  a.large_spans.store(large, std::memory_order_relaxed);
  a.large_pages.store(large_pages, std::memory_order_relaxed);
  recount_released(committed);
  for (std::uint32_t i = 0; i < high_water; ++i) {
    if (!whole[i]) continue;
    mspan& s = span(span_id{i});
    mspan_state state = s.state.load(std::memory_order_relaxed);
    if (state == mspan_state::cached && s.owner_client == 0) {  // taken back, not filed yet
      s.state.store(mspan_state::central, std::memory_order_relaxed);
      state = mspan_state::central;
    }
    if (state == mspan_state::cached) ++st.central[s.span_class].cached_count;
    if (state != mspan_state::central) continue;
    s.alloc_count = static_cast<std::uint16_t>(count_allocated(s));
    central(span_class{s.span_class}).relink(span_id{i});
  }
  profile_sweep(v);  // samples of spans that did not survive
  return dropped;
}

// The released pages the bitmap records, counted again per chunk (the
// scavenger bumps its counts after each bit).
void mheap::recount_released(std::uint64_t committed) noexcept {
  std::uint64_t total = 0;
  for (std::uint64_t c = 0; c < committed / chunk_pages; ++c) {
    std::uint32_t n = 0;
    for (std::uint64_t p = c * chunk_pages; p < (c + 1) * chunk_pages; ++p) {
      if (!is_released(page_id{static_cast<std::uint32_t>(p)})) continue;
      if (pages_.is_free(page_id{static_cast<std::uint32_t>(p)})) ++n;
      else released_[p / 64] &= ~(std::uint64_t{1} << (p % 64));  // in use: committed again
    }
    chunks_[c].released_pages = n;
    total += n;
  }
  accounts().pages_released.store(total, std::memory_order_relaxed);
}

}  // namespace shmalloc
