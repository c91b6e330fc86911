#pragma once
// Size classes: the single source of truth for how shmalloc rounds a request
// up to an object size and how many pages a span of that size has.
//
// Where the table comes from: tests/data/go-sizeclasses.csv is a copy of the
// table in Go 1.23.5 runtime/sizeclasses.go (67 small classes, 8 B .. 32 KiB,
// 8 KiB pages). tools/gen_size_classes.py validates it and writes
// shm/size_classes.inc, which is committed and included below; the build never
// runs Python. Class 0 is the large-object marker (all zeros).
//
// Lookup scheme (Go's): two byte tables computed at compile time from the
// table. size_to_class8[ceil(size/8)] serves sizes <= 1016 and
// size_to_class128[ceil((size-1024)/128)] serves 1017..32768; every class
// boundary above 1024 is a multiple of 128, so both tables are exact. A lookup
// is one compare and one load: no search at run time. Object index within a
// span uses Go's 32-bit multiply-shift instead of a division.
//
// How we differ from Go:
//  * No malloc headers: every size up to max_small_size (32768) is small.
//    Go 1.22+ adds an 8-byte header to scan objects > 512 B, so it sends
//    32761..32768 to the large path; we never do.
//  * A span's slot count is the table's `objects` for scan and noscan spans
//    alike. Go reserves a pointer bitmap at the end of small scan spans
//    (shrinking their object count); we keep no heap bitmap there.
//  * size_to_class(0) is class 1 (Go's table maps 0 to class 0 because
//    mallocgc handles size 0 before looking up a class).
// size_class_table_checksum() goes into the heap header, so a process built
// with another table is refused.

#include "shm/check.hpp"

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace shmalloc {

// ---- Constants (names follow Go's runtime/sizeclasses.go) -------------------

inline constexpr std::size_t page_shift = 13;
inline constexpr std::size_t page_size = std::size_t{1} << page_shift;  // 8192
inline constexpr std::size_t num_size_classes = 68;  // class 0 = large marker
inline constexpr std::size_t max_small_size = 32768;
inline constexpr std::size_t small_size_div = 8;
inline constexpr std::size_t small_size_max = 1024;
inline constexpr std::size_t large_size_div = 128;
inline constexpr std::size_t num_span_classes = num_size_classes * 2;  // 136
inline constexpr std::size_t tiny_size = 16;
inline constexpr std::uint8_t tiny_size_class = 2;
inline constexpr std::size_t max_objects_per_span = 1024;

static_assert(page_size == 8192);
static_assert(num_span_classes == 136);

// ---- The table --------------------------------------------------------------

struct size_class_info {
  std::uint32_t size;        // bytes per object
  std::uint8_t npages;       // span length in pages
  std::uint16_t objects;     // objects per span = npages*page_size / size
  std::uint16_t tail_waste;  // npages*page_size - objects*size
};

// Double braces: the outer pair is std::array, the inner its C array, so each
// generated row initialises one size_class_info.
inline constexpr std::array<size_class_info, num_size_classes> size_class_table = {{
#include "shm/size_classes.inc"
}};

// ---- Compile-time checks of the table ----------------------------------------

namespace detail {

constexpr std::size_t span_bytes_of(const size_class_info& e) { return std::size_t{e.npages} * page_size; }

constexpr bool class0_is_large_marker() {
  const auto& e = size_class_table[0];
  return e.size == 0 && e.npages == 0 && e.objects == 0 && e.tail_waste == 0;
}

constexpr bool sizes_strictly_increase() {
  for (std::size_t c = 1; c < num_size_classes; ++c)
    if (size_class_table[c].size <= size_class_table[c - 1].size) return false;
  return true;
}

constexpr bool sizes_multiple_of_8() {
  for (const auto& e : size_class_table)
    if (e.size % 8 != 0) return false;
  return true;
}

// tail_waste < size as well, so objects is exactly floor(span/size).
constexpr bool tail_waste_consistent() {
  for (std::size_t c = 1; c < num_size_classes; ++c) {
    const auto& e = size_class_table[c];
    if (e.npages == 0 || e.objects == 0) return false;
    if (e.tail_waste != span_bytes_of(e) - std::size_t{e.objects} * e.size) return false;
    if (e.tail_waste >= e.size) return false;
  }
  return true;
}

constexpr bool objects_within_limit() {
  for (const auto& e : size_class_table)
    if (e.objects > max_objects_per_span) return false;
  return true;
}

constexpr bool is_class_size(std::size_t size) {
  for (std::size_t c = 1; c < num_size_classes; ++c)
    if (size_class_table[c].size == size) return true;
  return false;
}

// size_to_class_aligned relies on it: alignment a is served by class size a.
constexpr bool powers_of_two_are_classes() {
  for (std::size_t p = 8; p <= page_size; p *= 2)
    if (!is_class_size(p)) return false;
  return true;
}

}  // namespace detail

static_assert(detail::class0_is_large_marker(), "class 0 must be all zeros");
static_assert(detail::sizes_strictly_increase(), "class sizes must strictly increase");
static_assert(size_class_table[tiny_size_class].size == tiny_size, "class 2 is the 16-byte tiny class");
static_assert(size_class_table[num_size_classes - 1].size == max_small_size, "last class is max_small_size");
static_assert(detail::tail_waste_consistent(), "tail_waste must be npages*8192 - objects*size");
static_assert(detail::objects_within_limit(), "objects must be <= max_objects_per_span");
static_assert(detail::sizes_multiple_of_8(), "class sizes must be multiples of 8");
static_assert(detail::powers_of_two_are_classes(), "every power of two 8..8192 must be a class");

// ---- Size -> class lookup (Go's size_to_class8 / size_to_class128) ----------

namespace detail {

// The smallest class whose size is >= size. Compile time only (it searches).
// Starting at class 1 makes size 0 map to class 1.
constexpr std::uint8_t smallest_class_for(std::size_t size) {
  for (std::size_t c = 1; c < num_size_classes; ++c)
    if (size_class_table[c].size >= size) return static_cast<std::uint8_t>(c);
  return 0;
}

constexpr auto make_size_to_class8() {
  std::array<std::uint8_t, small_size_max / small_size_div + 1> t{};
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = smallest_class_for(i * small_size_div);
  return t;
}

constexpr auto make_size_to_class128() {
  std::array<std::uint8_t, (max_small_size - small_size_max) / large_size_div + 1> t{};
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = smallest_class_for(small_size_max + i * large_size_div);
  return t;
}

// Each table entry stands for a whole bucket of sizes; that is exact only if
// no class boundary falls strictly inside a bucket.
constexpr bool class_boundaries_align_with_buckets() {
  for (std::size_t c = 1; c < num_size_classes; ++c) {
    const std::size_t s = size_class_table[c].size;
    const std::size_t div = s <= small_size_max ? small_size_div : large_size_div;
    if (s % div != 0) return false;
  }
  return true;
}

}  // namespace detail

static_assert(detail::class_boundaries_align_with_buckets(), "lookup tables would be inexact");

// Index ceil(size/8), sizes 0..1024 (Go uses it for sizes <= 1016).
inline constexpr auto size_to_class8 = detail::make_size_to_class8();
// Index ceil((size-1024)/128), sizes 1024..32768 (Go uses it above 1016).
inline constexpr auto size_to_class128 = detail::make_size_to_class128();

static_assert(size_to_class8.size() == 129 && size_to_class128.size() == 249);

// The smallest class that holds `size` bytes: Go's mallocgc sizeclass logic.
// Precondition: size <= max_small_size. size 0 maps to class 1 (8 bytes).
constexpr std::uint8_t size_to_class(std::size_t size) {
  SHMALLOC_ASSERT(size <= max_small_size);
  if (size <= small_size_max - small_size_div)
    return size_to_class8[(size + small_size_div - 1) / small_size_div];
  // Go writes divRoundUp(size-smallSizeMax, largeSizeDiv) and relies on
  // unsigned wrap-around for 1017..1023; adding first avoids the wrap.
  return size_to_class128[(size + large_size_div - 1 - small_size_max) / large_size_div];
}

// The same answer from one table indexed by ceil(size/8) over every small
// size (4,097 bytes): one load and no compare, for the client's allocation
// fast path. Derived from size_to_class, so Go's table stays the one source.
namespace detail {
constexpr auto make_size_to_class_flat() {
  std::array<std::uint8_t, max_small_size / small_size_div + 1> t{};
  for (std::size_t i = 0; i < t.size(); ++i) t[i] = size_to_class(i * small_size_div);
  return t;
}
}  // namespace detail

inline constexpr auto size_to_class_flat = detail::make_size_to_class_flat();

// Precondition: size <= max_small_size.
inline std::uint8_t size_to_class_fast(std::size_t size) noexcept {
  return size_to_class_flat[(size + small_size_div - 1) / small_size_div];
}

// ---- Aligned lookup ---------------------------------------------------------

namespace detail {

inline constexpr std::size_t num_alignment_shifts = page_shift + 1;  // 1 .. 8192

// aligned_class_table[shift][c]: the first class >= c whose size is a
// multiple of 1 << shift, or 0 if none. 14 x 68 bytes; makes the aligned
// lookup O(1) although it is not on the fast path.
constexpr auto make_aligned_class_table() {
  std::array<std::array<std::uint8_t, num_size_classes>, num_alignment_shifts> t{};
  for (std::size_t shift = 0; shift < num_alignment_shifts; ++shift) {
    const std::size_t alignment = std::size_t{1} << shift;
    for (std::size_t c = 0; c < num_size_classes; ++c) {
      for (std::size_t d = c == 0 ? 1 : c; d < num_size_classes; ++d) {
        if (size_class_table[d].size % alignment == 0) {
          t[shift][c] = static_cast<std::uint8_t>(d);
          break;
        }
      }
    }
  }
  return t;
}

inline constexpr auto aligned_class_table = make_aligned_class_table();

}  // namespace detail

// The smallest class whose size is >= size and a multiple of alignment.
// Objects sit at span_base + i*size with span_base page-aligned, so such a
// class returns alignment-aligned objects for any alignment <= page_size.
// For alignment <= 8 this equals size_to_class (every size is a multiple of 8).
// Returns 0 when no small class fits (size > max_small_size or
// alignment > page_size): the caller then uses a large span.
// Precondition: alignment is a power of two (SHMALLOC_ASSERT; when asserts
// are off a bad alignment returns 0 rather than indexing out of bounds).
constexpr std::uint8_t size_to_class_aligned(std::size_t size, std::size_t alignment) {
  SHMALLOC_ASSERT(std::has_single_bit(alignment));
  if (size > max_small_size || alignment > page_size || !std::has_single_bit(alignment)) return 0;
  return detail::aligned_class_table[static_cast<std::size_t>(std::countr_zero(alignment))][size_to_class(size)];
}

// ---- Per-class accessors ----------------------------------------------------
// Widened return types so callers never do arithmetic in uint8/uint16.

constexpr std::uint32_t class_to_size(std::uint8_t c) {
  SHMALLOC_ASSERT(c < num_size_classes);
  return size_class_table[c].size;
}

constexpr std::uint32_t class_to_npages(std::uint8_t c) {
  SHMALLOC_ASSERT(c < num_size_classes);
  return size_class_table[c].npages;
}

constexpr std::uint32_t class_to_objects(std::uint8_t c) {
  SHMALLOC_ASSERT(c < num_size_classes);
  return size_class_table[c].objects;
}

constexpr std::size_t class_span_bytes(std::uint8_t c) { return std::size_t{class_to_npages(c)} * page_size; }

// ---- Division-free object index (Go's span.divMul) --------------------------

namespace detail {

constexpr auto make_div_magic_table() {
  std::array<std::uint32_t, num_size_classes> t{};
  for (std::size_t c = 1; c < num_size_classes; ++c)
    t[c] = UINT32_MAX / size_class_table[c].size + 1;
  return t;
}

inline constexpr auto div_magic_table = make_div_magic_table();

}  // namespace detail

// floor((2^32-1)/size) + 1; 0 for class 0.
constexpr std::uint32_t class_div_magic(std::uint8_t c) {
  SHMALLOC_ASSERT(c < num_size_classes);
  return detail::div_magic_table[c];
}

// Where an offset falls in a span of the class whose magic is given: the
// object's index (offset / size, without a division), and whether the offset
// is that object's start. Both come from one multiply: the high half is the
// index, and the low half is below the magic exactly when the size divides
// the offset (Lemire, Kaser and Kurz, "Faster remainder by direct
// computation", 2019); index * size == offset would need a second,
// dependent multiply. Class 0's magic is 0: index 0, and no offset a start.
// Exact for every offset in [0, span bytes] of every small class (checked
// below). The free fast path calls it with the magic the span carries.
struct object_position {
  std::uint32_t index;
  bool start;
};
constexpr object_position object_position_of(std::uint32_t offset_in_span, std::uint32_t magic) {
  const std::uint64_t product = std::uint64_t{offset_in_span} * magic;
  return {static_cast<std::uint32_t>(product >> 32), static_cast<std::uint32_t>(product) < magic};
}

constexpr std::uint32_t object_index(std::uint32_t offset_in_span, std::uint8_t c) {
  return object_position_of(offset_in_span, class_div_magic(c)).index;
}

namespace detail {

// object_index is monotone in the offset, and so is offset/size; so if they
// agree at the first and last byte of every object, and at both ends of the
// tail, they agree on all of [0, span bytes] (what Go's mksizeclasses checks).
constexpr bool object_index_exact() {
  for (std::size_t c = 1; c < num_size_classes; ++c) {
    const auto cls = static_cast<std::uint8_t>(c);
    const std::uint32_t size = size_class_table[c].size;
    const std::uint32_t objects = size_class_table[c].objects;
    for (std::uint32_t i = 0; i < objects; ++i) {
      if (object_index(i * size, cls) != i || object_index(i * size + size - 1, cls) != i) return false;
    }
    const auto span = static_cast<std::uint32_t>(span_bytes_of(size_class_table[c]));
    if (object_index(objects * size, cls) != objects || object_index(span, cls) != objects) return false;
  }
  return true;
}

}  // namespace detail

static_assert(detail::object_index_exact(), "div magic must be exact for every class");

// Why the start test is exact: with magic = (2^32 + e) / size, 0 <= e <
// size, an offset q * size + r has low half q * e + r * magic, which cannot
// wrap (that is the index's exactness). For r >= 1 it is at least the magic;
// for r = 0 it is q * e, below the magic when objects * e is (checked below).
constexpr bool is_object_start(std::uint32_t offset_in_span, std::uint8_t c) {
  return object_position_of(offset_in_span, class_div_magic(c)).start;
}

namespace detail {

constexpr bool object_start_exact() {
  for (std::size_t c = 1; c < num_size_classes; ++c) {
    const std::uint64_t magic = div_magic_table[c];
    const std::uint64_t e = magic * size_class_table[c].size - (std::uint64_t{1} << 32);
    if ((size_class_table[c].objects + std::uint64_t{1}) * e >= magic) return false;  // to the span's end
  }
  return true;
}

}  // namespace detail

static_assert(detail::object_start_exact(), "the div magic's start-of-object test must be exact for every class");

// ---- Span classes -----------------------------------------------------------

// size_class << 1 | noscan, as in Go: 136 values; span classes 0 and 1 tag
// large-object spans. Stored in shared memory, so it stays a trivial byte.
struct span_class {
  std::uint8_t value;

  static constexpr span_class make(std::uint8_t size_class, bool noscan) {
    SHMALLOC_ASSERT(size_class < num_size_classes);
    return span_class{static_cast<std::uint8_t>((size_class << 1) | (noscan ? 1U : 0U))};
  }
  constexpr std::uint8_t size_class() const { return static_cast<std::uint8_t>(value >> 1); }
  constexpr bool noscan() const { return (value & 1U) != 0; }

  friend constexpr bool operator==(span_class, span_class) = default;
};

static_assert(std::is_trivially_copyable_v<span_class> && std::is_standard_layout_v<span_class>);
static_assert(sizeof(span_class) == 1);
static_assert(num_span_classes - 1 <= UINT8_MAX);

// ---- Table checksum ---------------------------------------------------------

namespace detail {

inline constexpr std::uint64_t fnv1a64_offset_basis = 0xcbf29ce484222325ULL;
inline constexpr std::uint64_t fnv1a64_prime = 0x100000001b3ULL;

// Feeds the low nbytes of v, least significant first (little-endian).
constexpr std::uint64_t fnv1a64_le(std::uint64_t h, std::uint64_t v, std::size_t nbytes) {
  for (std::size_t i = 0; i < nbytes; ++i) {
    h ^= (v >> (8 * i)) & 0xffU;
    h *= fnv1a64_prime;
  }
  return h;
}

}  // namespace detail

// FNV-1a 64 over every field of every row (class 0 included), each in its
// field's width, little-endian: size (4), npages (1), objects (2),
// tail_waste (2). tail_waste is derived from the others, but hashing it too
// means the checksum covers every field. Stored in the heap header: a process
// built with another table (or another field layout) is refused.
constexpr std::uint64_t size_class_table_checksum(const std::array<size_class_info, num_size_classes>& table) {
  std::uint64_t h = detail::fnv1a64_offset_basis;
  for (const auto& e : table) {
    h = detail::fnv1a64_le(h, e.size, sizeof e.size);
    h = detail::fnv1a64_le(h, e.npages, sizeof e.npages);
    h = detail::fnv1a64_le(h, e.objects, sizeof e.objects);
    h = detail::fnv1a64_le(h, e.tail_waste, sizeof e.tail_waste);
  }
  return h;
}

constexpr std::uint64_t size_class_table_checksum() { return size_class_table_checksum(size_class_table); }

}  // namespace shmalloc
