#include "shm/page_alloc.hpp"

#include <algorithm>
#include <bit>

namespace shmalloc {

void page_alloc::init() noexcept {
  std::fill(bits_, bits_ + leaves_, ~std::uint64_t{0});
  for (std::uint32_t i = 1; i < 2 * leaves_; ++i) tree_[i] = page_summary{0, 0, 0};
}

page_summary page_alloc::leaf_summary(std::uint64_t word) noexcept {
  if (word == 0) return {64, 64, 64};
  const auto start = static_cast<std::uint32_t>(std::countr_zero(word));
  const auto end = static_cast<std::uint32_t>(std::countl_zero(word));
  // Longest run of free (zero) bits: each step shortens every run by one.
  std::uint64_t free = ~word;
  std::uint32_t max = 0;
  while (free != 0) {
    free &= free >> 1;
    ++max;
  }
  return {start, end, max};
}

page_summary page_alloc::combine(const page_summary& l, const page_summary& r, std::uint32_t half) noexcept {
  return {
      l.start == half ? half + r.start : l.start,
      r.end == half ? half + l.end : r.end,
      std::max({l.max, r.max, l.end + r.start}),
  };
}

page_id page_alloc::find(std::uint32_t n) const noexcept {
  if (n == 0 || tree_[1].max < n) return page_id::nil();
  std::uint32_t node = 1;
  std::uint32_t base = 0;
  std::uint32_t size = leaves_ * 64;
  while (node < leaves_) {
    const std::uint32_t half = size / 2;
    const page_summary& l = tree_[2 * node];
    const page_summary& r = tree_[2 * node + 1];
    if (l.max >= n) {
      node = 2 * node;
    } else if (l.end + r.start >= n) {
      return page_id{base + half - l.end};  // the run straddles the middle
    } else {
      node = 2 * node + 1;
      base += half;
    }
    size = half;
  }
  return page_id{base + find_in_leaf(node - leaves_, n)};
}

std::uint32_t page_alloc::find_in_leaf(std::uint32_t leaf, std::uint32_t n) const noexcept {
  // Bit j of runs is set iff pages j .. j+n-1 of the word are all free.
  const std::uint64_t free = ~bits_[leaf];
  std::uint64_t runs = free;
  for (std::uint32_t i = 1; i < n && runs != 0; ++i) runs &= free >> i;
  return static_cast<std::uint32_t>(std::countr_zero(runs));
}

void page_alloc::set_range(std::uint32_t first, std::uint32_t n, bool in_use) noexcept {
  if (n == 0) return;
  const std::uint32_t last = first + n - 1;
  for (std::uint32_t w = first / 64; w <= last / 64; ++w) {
    const std::uint32_t lo = w == first / 64 ? first % 64 : 0;
    const std::uint32_t hi = w == last / 64 ? last % 64 : 63;
    const std::uint64_t mask = (hi - lo == 63) ? ~std::uint64_t{0} : (((std::uint64_t{1} << (hi - lo + 1)) - 1) << lo);
    bits_[w] = in_use ? (bits_[w] | mask) : (bits_[w] & ~mask);
  }
  update_leaves(first / 64, last / 64);
}

void page_alloc::update_leaves(std::uint32_t first_leaf, std::uint32_t last_leaf) noexcept {
  for (std::uint32_t k = first_leaf; k <= last_leaf; ++k) tree_[leaves_ + k] = leaf_summary(bits_[k]);
  std::uint32_t lo = (leaves_ + first_leaf) / 2;
  std::uint32_t hi = (leaves_ + last_leaf) / 2;
  std::uint32_t half = 64;  // pages covered by each child at this level
  while (lo >= 1) {
    for (std::uint32_t node = lo; node <= hi; ++node) tree_[node] = combine(tree_[2 * node], tree_[2 * node + 1], half);
    if (lo == 1) break;
    lo /= 2;
    hi /= 2;
    half *= 2;
  }
}

bool page_alloc::all_free(page_id first, std::uint32_t n) const noexcept {
  for (std::uint32_t p = first.value; p < first.value + n; ++p)
    if (!is_free(page_id{p})) return false;
  return true;
}

bool page_alloc::all_in_use(page_id first, std::uint32_t n) const noexcept {
  for (std::uint32_t p = first.value; p < first.value + n; ++p)
    if (is_free(page_id{p})) return false;
  return true;
}

std::uint32_t page_alloc::count_free() const noexcept {
  std::uint32_t n = 0;
  for (std::uint32_t w = 0; w < leaves_; ++w) n += static_cast<std::uint32_t>(std::popcount(~bits_[w]));
  return n;
}

bool page_alloc::verify(std::string* why) const {
  for (std::uint32_t k = 0; k < leaves_; ++k) {
    const page_summary want = leaf_summary(bits_[k]);
    const page_summary& got = tree_[leaves_ + k];
    if (want.start != got.start || want.end != got.end || want.max != got.max) {
      if (why) *why = "page summary of leaf " + std::to_string(k) + " disagrees with its bitmap word";
      return false;
    }
  }
  std::uint32_t half = 64;
  for (std::uint32_t level_first = leaves_ / 2; level_first >= 1; level_first /= 2, half *= 2) {
    for (std::uint32_t node = level_first; node < 2 * level_first; ++node) {
      const page_summary want = combine(tree_[2 * node], tree_[2 * node + 1], half);
      const page_summary& got = tree_[node];
      if (want.start != got.start || want.end != got.end || want.max != got.max) {
        if (why) *why = "page summary of node " + std::to_string(node) + " disagrees with its children";
        return false;
      }
    }
  }
  return true;
}

}  // namespace shmalloc
