// page_alloc.hpp: mheap's free-page index (a simpler cousin of Go's
// mpagealloc.go).
//
// One bit per page (1 = not free: in use, or not yet committed) and, over
// those bits, a complete binary tree of summaries. Leaf k summarises the
// 64 pages of bitmap word k; an inner node summarises its two children:
//
//   start  free pages at the low end of the node's range
//   end    free pages at the high end
//   max    the longest free run anywhere in the range
//
// combined as Go combines its radix summaries:
//   start = l.start == half ? half + r.start : l.start      (and end likewise)
//   max   = max(l.max, r.max, l.end + r.start)
//
// find(n) walks down from the root towards the lowest-addressed run of n
// free pages (first fit, as Go allocates lowest address first): O(log n).
// Marking a run touches its words and their ancestors. Coalescing is free:
// a freed run simply merges with its free neighbours in the bitmap.
//
// Both arrays live in the segment (regions page_bits and page_summary) and
// only the daemon writes them.
#pragma once

#include <cstdint>
#include <string>

#include "shm/ids.hpp"

namespace shmalloc {

struct page_summary {
  std::uint32_t start;
  std::uint32_t end;
  std::uint32_t max;
};
static_assert(sizeof(page_summary) == 12);

class page_alloc {
 public:
  // bits: leaves words; tree: 2 * leaves summaries (index 0 unused, root 1).
  page_alloc(std::uint64_t* bits, page_summary* tree, std::uint32_t leaves) noexcept
      : bits_(bits), tree_(tree), leaves_(leaves) {}

  // Marks every page not free (a new heap has committed nothing).
  void init() noexcept;

  // The first page of the lowest-addressed run of n free pages, or nil.
  page_id find(std::uint32_t n) const noexcept;

  void mark_in_use(page_id first, std::uint32_t n) noexcept { set_range(first.value, n, true); }
  void mark_free(page_id first, std::uint32_t n) noexcept { set_range(first.value, n, false); }

  bool is_free(page_id p) const noexcept { return ((bits_[p.value / 64] >> (p.value % 64)) & 1) == 0; }
  // Bitmap word w: bit i is page w * 64 + i, 1 = not free.
  std::uint64_t word(std::uint32_t w) const noexcept { return bits_[w]; }
  // True if every page of [first, first + n) is free.
  bool all_free(page_id first, std::uint32_t n) const noexcept;
  // True if no page of [first, first + n) is free.
  bool all_in_use(page_id first, std::uint32_t n) const noexcept;
  std::uint32_t longest_free_run() const noexcept { return tree_[1].max; }
  std::uint32_t count_free() const noexcept;

  // Recomputes every summary from the bitmap and compares (the checker).
  bool verify(std::string* why) const;

 private:
  static page_summary leaf_summary(std::uint64_t word) noexcept;
  static page_summary combine(const page_summary& l, const page_summary& r, std::uint32_t half) noexcept;
  void set_range(std::uint32_t first, std::uint32_t n, bool in_use) noexcept;
  void update_leaves(std::uint32_t first_leaf, std::uint32_t last_leaf) noexcept;
  std::uint32_t find_in_leaf(std::uint32_t leaf, std::uint32_t n) const noexcept;

  std::uint64_t* bits_;
  page_summary* tree_;
  std::uint32_t leaves_;
};

}  // namespace shmalloc
