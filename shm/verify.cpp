#include "shm/verify.hpp"

#include <cstdint>
#include <vector>

#include "shm/mheap.hpp"
#include "shm/segment.hpp"

namespace shmalloc {

std::string verify_report::summary() const {
  if (problems.empty()) return "heap ok";
  std::string s = std::to_string(problems.size()) + " problem(s):";
  for (const auto& p : problems) s += "\n  " + p;
  return s;
}

namespace {

class checker {
 public:
  checker(mheap& h, const verify_options& o) : h_(h), o_(o), v_(h.view()) {}

  verify_report run() {
    committed_ = static_cast<std::uint32_t>(h_.accounts().pages_committed.load(std::memory_order_relaxed));
    high_water_ = h_.state().span_pool.high_water;
    check_page_summaries();
    check_spans();
    check_pages();
    check_released();
    check_central_lists();
    check_span_pool();
    if (o_.object_counts) check_object_counts();
    return std::move(report_);
  }

 private:
  template <class... Parts>
  void fail(Parts&&... parts) {
    if (report_.problems.size() >= o_.max_problems) return;
    std::string s;
    ((s += to_text(parts)), ...);
    report_.problems.push_back(std::move(s));
  }
  static std::string to_text(const std::string& s) { return s; }
  static std::string to_text(const char* s) { return s; }
  template <class T>
  static std::string to_text(T v) { return std::to_string(v); }

  void check_page_summaries() {
    std::string why;
    if (!h_.pages().verify(&why)) fail(why);
    for (std::uint32_t p = committed_; p < h_.seg().header().max_pages; ++p)
      if (h_.pages().is_free(page_id{p})) return fail("page ", p, " is free but not committed");
  }

  void check_spans() {
    std::uint64_t pages = 0, large = 0, large_pages = 0;
    cached_.assign(num_span_classes, 0);
    for (std::uint32_t i = 0; i < high_water_; ++i) {
      const mspan& s = v_.span(span_id{i});
      const mspan_state st = s.state.load(std::memory_order_relaxed);
      if (st == mspan_state::dead) continue;
      ++live_spans_;
      pages += s.npages;
      if (st == mspan_state::large) ++large, large_pages += s.npages;
      if (st == mspan_state::cached) ++cached_[s.span_class];
      check_span(span_id{i}, s, st);
    }
    const heap_accounts& a = h_.accounts();
    if (pages != a.pages_in_use.load(std::memory_order_relaxed))
      fail("pages in spans ", pages, " != pages_in_use ", a.pages_in_use.load(std::memory_order_relaxed));
    if (large != a.large_spans.load(std::memory_order_relaxed)) fail("large spans ", large, " != account");
    if (large_pages != a.large_pages.load(std::memory_order_relaxed)) fail("large pages ", large_pages, " != account");
  }

  void check_span(span_id id, const mspan& s, mspan_state st) {
    if (s.npages == 0 || s.start.value + std::uint64_t{s.npages} > committed_)
      return fail("span ", id.value, " lies outside the committed heap");
    if (!h_.pages().all_in_use(s.start, s.npages)) fail("span ", id.value, " covers free pages");
    for (std::uint32_t p = s.start.value; p < s.start.value + s.npages; ++p)
      if (v_.page_map[p] != id.value + 1) return fail("page_map of page ", p, " does not name span ", id.value);
    const span_class spc{s.span_class};
    const std::uint8_t c = spc.size_class();
    const std::uint32_t live = count_allocated(s);
    if (st == mspan_state::large) {
      // live 0: freed and kept in its holder's cache of large objects.
      if (c != 0 || s.nelems != 1 || live > 1 || (live == 0 && s.owner_client == 0) || s.div_magic != 0)
        fail("large span ", id.value, " has bad geometry or bits");
      return;
    }
    if (c == 0 || s.elem_size != class_to_size(c) || s.nelems != class_to_objects(c) ||
        s.npages != class_to_npages(c) || s.div_magic != class_div_magic(c))
      return fail("span ", id.value, " geometry does not match size class ", int{c});
    for (std::uint32_t i = s.nelems; i < bitmap_words * 64; ++i)
      if (is_allocated(s, i)) return fail("span ", id.value, " has alloc bits beyond its slots");
    for (std::uint32_t i = 0; i < reserved_slots(s.span_class); ++i)
      if (!is_allocated(s, i)) return fail("tiny span ", id.value, " lost its counter blocks");
    if (st == mspan_state::central && live != s.alloc_count)
      fail("span ", id.value, " alloc_count ", s.alloc_count, " != bits ", live);
  }

  void check_pages() {
    for (std::uint32_t p = 0; p < committed_; ++p) {
      const bool in_use = !h_.pages().is_free(page_id{p});
      const std::uint32_t entry = v_.page_map[p];
      if (in_use && (entry == 0 || entry > high_water_))
        return fail("page ", p, " is in use but no span covers it");
      if (!in_use && entry != 0) return fail("page ", p, " is free but page_map names span ", entry - 1);
    }
  }

  void check_released() {
    std::uint64_t released = 0;
    for (std::uint32_t c = 0; c < committed_ / chunk_pages; ++c) {
      std::uint32_t in_chunk = 0;
      for (std::uint32_t p = c * chunk_pages; p < (c + 1) * chunk_pages; ++p) {
        if (!h_.is_released(page_id{p})) continue;
        ++in_chunk;
        if (!h_.pages().is_free(page_id{p})) fail("page ", p, " is released but in use");
      }
      if (in_chunk != h_.chunk(c).released_pages) fail("chunk ", c, " released count is off");
      released += in_chunk;
    }
    if (released != h_.accounts().pages_released.load(std::memory_order_relaxed))
      fail("released pages ", released, " != pages_released account");
  }

  void check_list(span_class spc, span_id head, std::uint32_t want, bool partial) {
    std::uint32_t n = 0;
    span_id prev = span_id::nil();
    for (span_id id = head; id; id = v_.span(id).next) {
      if (id.value >= high_water_ || ++n > want) return fail("mcentral list of span class ", int{spc.value}, " is broken");
      const mspan& s = v_.span(id);
      if (s.state.load(std::memory_order_relaxed) != mspan_state::central || s.span_class != spc.value)
        return fail("span ", id.value, " on mcentral list ", int{spc.value}, " is not central in that class");
      if (s.prev != prev) return fail("span ", id.value, " has a bad prev link");
      if (partial != (s.alloc_count < s.nelems)) fail("span ", id.value, " is on the wrong mcentral list");
      prev = id;
    }
    if (n != want) fail("mcentral list of span class ", int{spc.value}, " has ", n, " spans, counted ", want);
    central_ += n;
  }

  void check_central_lists() {
    for (std::uint32_t c = 0; c < num_span_classes; ++c) {
      const mcentral_state& m = h_.state().central[c];
      const span_class spc{static_cast<std::uint8_t>(c)};
      check_list(spc, m.partial, m.partial_count, true);
      check_list(spc, m.full, m.full_count, false);
      if (m.cached_count != cached_[c])
        fail("span class ", c, " counts ", m.cached_count, " cached spans, found ", cached_[c]);
    }
  }

  void check_span_pool() {
    const span_pool_state& pool = h_.state().span_pool;
    if (pool.in_use != live_spans_) fail("span pool in_use ", pool.in_use, " != live spans ", live_spans_);
    std::uint32_t free = 0;
    for (span_id id = pool.free_head; id; id = v_.span(id).next) {
      if (id.value >= high_water_ || ++free > high_water_) return fail("span pool free list is broken");
      if (v_.span(id).state.load(std::memory_order_relaxed) != mspan_state::dead)
        return fail("span ", id.value, " on the free list is not dead");
    }
    if (free + pool.in_use != high_water_) fail("span pool: free ", free, " + in use != high water ", high_water_);
    std::uint64_t central = 0;
    for (std::uint32_t i = 0; i < high_water_; ++i)
      central += v_.span(span_id{i}).state.load(std::memory_order_relaxed) == mspan_state::central;
    if (central != central_) fail(central, " central spans, but ", central_, " on mcentral lists");
  }

  void check_object_counts() {
    std::vector<std::int64_t> live(num_size_classes, 0);
    for (std::uint32_t i = 0; i < high_water_; ++i) {
      const mspan& s = v_.span(span_id{i});
      const mspan_state st = s.state.load(std::memory_order_relaxed);
      if (st == mspan_state::central || st == mspan_state::cached)
        live[span_class{s.span_class}.size_class()] += std::int64_t{count_allocated(s)} -
                                                        std::int64_t{count_remote_pending(v_, s)} -
                                                        std::int64_t{reserved_slots(s.span_class)};
    }
    std::vector<std::int64_t> counted(num_size_classes, 0);
    auto add = [&counted](const stats_block& b) {
      for (std::size_t c = 0; c < num_size_classes; ++c)
        counted[c] += static_cast<std::int64_t>(b.small_allocs[c].load(std::memory_order_relaxed) -
                                                b.small_frees[c].load(std::memory_order_relaxed));
    };
    add(h_.state().retired);
    const auto caches = h_.accounts().caches_committed.load(std::memory_order_relaxed);
    const auto* slots = h_.seg().at<mcache_slot>(h_.seg().regions().caches.offset);
    for (std::uint64_t i = 0; i < caches; ++i) add(slots[i].stats);
    for (std::size_t c = 1; c < num_size_classes; ++c)
      if (live[c] != counted[c])
        fail("size class ", c, ": ", live[c], " objects live in spans, ", counted[c], " counted by stats blocks");
  }

  mheap& h_;
  const verify_options& o_;
  heap_view v_;
  verify_report report_;
  std::uint32_t committed_ = 0;
  std::uint32_t high_water_ = 0;
  std::uint32_t live_spans_ = 0;
  std::uint64_t central_ = 0;
  std::vector<std::uint32_t> cached_;
};

}  // namespace

verify_report verify_heap(mheap& heap, const verify_options& options) { return checker(heap, options).run(); }

}  // namespace shmalloc
