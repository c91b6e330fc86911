// ids.hpp: strong types for the numbers that address shared memory.
//
// Nothing in the segment holds a pointer: each process maps the heap at its
// own address, so shared structures name each other by index or by offset
// from the segment base. Giving each kind of index its own type (tcmalloc's
// PageId/Length) makes "a page number passed where a span index was meant" a
// compile error instead of heap corruption.
#pragma once

#include <compare>
#include <cstdint>
#include <limits>

namespace shmalloc {

template <class Tag, class Rep>
struct strong_id {
  using rep = Rep;
  static constexpr Rep nil_value = std::numeric_limits<Rep>::max();

  Rep value = nil_value;

  constexpr strong_id() = default;
  constexpr explicit strong_id(Rep v) : value(v) {}
  static constexpr strong_id nil() { return strong_id{}; }
  constexpr bool is_nil() const { return value == nil_value; }
  constexpr explicit operator bool() const { return !is_nil(); }
  constexpr auto operator<=>(const strong_id&) const = default;
};

struct page_tag;
struct span_tag;
struct arena_tag;

// Index of an 8 KiB page in the arena region (page 0 is the first heap page).
using page_id = strong_id<page_tag, std::uint32_t>;
// Index of an mspan descriptor in the span table.
using span_id = strong_id<span_tag, std::uint32_t>;
// Index of a 64 MiB arena in the arena region.
using arena_id = strong_id<arena_tag, std::uint32_t>;

// A position-independent reference to an object: its byte offset from the
// segment base. 0 is never an object (offset 0 is the segment header), so it
// serves as the null handle, as the C API promises.
using handle_t = std::uint64_t;
inline constexpr handle_t null_handle = 0;

}  // namespace shmalloc
