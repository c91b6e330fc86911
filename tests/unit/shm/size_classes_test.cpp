// Unit tests for shm/size_classes.hpp: the table against Go's data, and every
// lookup against a brute-force oracle over its whole domain.
#include "shm/size_classes.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#ifndef SHMALLOC_TEST_DATA_DIR
#error "SHMALLOC_TEST_DATA_DIR must be defined (absolute path of tests/data, as a string)"
#endif

namespace {

using namespace shmalloc;

constexpr std::size_t num_small_classes = num_size_classes - 1;

std::vector<std::string> split_csv_line(std::string line) {
  if (!line.empty() && line.back() == '\r') line.pop_back();
  std::vector<std::string> fields;
  std::stringstream ss(line);
  std::string field;
  while (std::getline(ss, field, ',')) fields.push_back(field);
  return fields;
}

// Go's mksizeclasses.go: worst case is every slot holding an object one byte
// larger than the previous class, plus the tail; printed with %.2f.
std::string go_max_waste_pct(std::uint32_t size, std::uint32_t prev_size, std::size_t span_bytes) {
  const std::size_t objects = span_bytes / size;
  const double waste = static_cast<double>(span_bytes - objects * (prev_size + 1));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", 100.0 * waste / static_cast<double>(span_bytes));
  return buf;
}

// The oracle for size_to_class_aligned: scan every class.
std::uint8_t brute_force_aligned_class(std::size_t size, std::size_t alignment) {
  for (std::size_t c = 1; c < num_size_classes; ++c) {
    const std::size_t s = size_class_table[c].size;
    if (s >= size && s % alignment == 0) return static_cast<std::uint8_t>(c);
  }
  return 0;
}

// Textbook FNV-1a 64 over a byte string, independent of the header's code.
std::uint64_t fnv1a64(const std::vector<std::uint8_t>& bytes) {
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::uint8_t b : bytes) {
    h ^= b;
    h *= 0x100000001b3ULL;
  }
  return h;
}

void append_le(std::vector<std::uint8_t>& out, std::uint64_t v, std::size_t nbytes) {
  for (std::size_t i = 0; i < nbytes; ++i) out.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

using table_type = std::array<size_class_info, num_size_classes>;

// Flips one bit in byte `byte` of field `field` (0 size, 1 npages, 2 objects,
// 3 tail_waste) of class c. Returns false if the field has no such byte.
bool flip_field_byte(table_type& t, std::size_t c, int field, std::size_t byte) {
  auto flip = [byte](auto& f) {
    if (byte >= sizeof f) return false;
    f = static_cast<std::remove_reference_t<decltype(f)>>(f ^ (std::uint64_t{1} << (8 * byte)));
    return true;
  };
  switch (field) {
    case 0: return flip(t[c].size);
    case 1: return flip(t[c].npages);
    case 2: return flip(t[c].objects);
    default: return flip(t[c].tail_waste);
  }
}

}  // namespace

// Compile-time use is part of the contract (the heap header stores the checksum).
static_assert(size_to_class(0) == 1);
static_assert(size_to_class(32768) == 67);
static_assert(size_to_class_aligned(1, 4096) == 44);
static_assert(object_index(8191, 1) == 1023);
static_assert(span_class::make(67, true).value == 135);
static_assert(size_class_table_checksum() != 0);

TEST_SUITE("size_classes") {

TEST_CASE("The table matches Go 1.23.5's size classes in the CSV row by row") {
  const std::string path = std::string(SHMALLOC_TEST_DATA_DIR) + "/go-sizeclasses.csv";
  std::ifstream in(path);
  REQUIRE_MESSAGE(in.is_open(), "cannot open " << path);

  std::string line;
  REQUIRE(std::getline(in, line));
  CHECK(split_csv_line(line) ==
        std::vector<std::string>{"class", "bytes_obj", "bytes_span", "objects", "tail_waste", "max_waste_pct"});

  std::size_t rows = 0;
  std::uint32_t prev_size = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line == "\r") continue;
    ++rows;
    const auto f = split_csv_line(line);
    INFO("CSV row ", rows, ": ", line);
    REQUIRE(f.size() == 6);
    const auto c = static_cast<std::uint8_t>(std::stoul(f[0]));
    REQUIRE(c == rows);
    REQUIRE(c < num_size_classes);
    const auto& e = size_class_table[c];
    CHECK(e.size == std::stoul(f[1]));
    CHECK(class_to_size(c) == std::stoul(f[1]));
    CHECK(class_span_bytes(c) == std::stoul(f[2]));
    CHECK(std::size_t{e.npages} * page_size == std::stoul(f[2]));
    CHECK(e.objects == std::stoul(f[3]));
    CHECK(class_to_objects(c) == std::stoul(f[3]));
    CHECK(e.tail_waste == std::stoul(f[4]));
    CHECK(go_max_waste_pct(e.size, prev_size, class_span_bytes(c)) == f[5]);
    prev_size = e.size;
  }
  CHECK(rows == num_small_classes);
}

TEST_CASE("Class 0 is the all-zero large-object marker and the constants agree with the table") {
  CHECK(class_to_size(0) == 0);
  CHECK(class_to_npages(0) == 0);
  CHECK(class_to_objects(0) == 0);
  CHECK(size_class_table[0].tail_waste == 0);
  CHECK(class_div_magic(0) == 0);
  CHECK(num_size_classes == 68);
  CHECK(page_size == (std::size_t{1} << page_shift));
  CHECK(class_to_size(tiny_size_class) == tiny_size);
  CHECK(class_to_size(num_size_classes - 1) == max_small_size);
  for (std::uint8_t c = 1; c < num_size_classes; ++c) {
    CHECK(class_to_npages(c) == size_class_table[c].npages);
    CHECK(class_span_bytes(c) == class_to_npages(c) * page_size);
    CHECK(class_to_objects(c) <= max_objects_per_span);
  }
}

TEST_CASE("Every size from 1 to 32768 maps to the smallest class that holds it") {
  std::size_t failures = 0;
  for (std::size_t size = 1; size <= max_small_size && failures < 10; ++size) {
    const std::uint8_t c = size_to_class(size);
    const bool ok = c >= 1 && c < num_size_classes && class_to_size(c) >= size && class_to_size(c - 1) < size &&
                    size_to_class_fast(size) == c;  // the client's one-table lookup agrees
    if (!ok) {
      ++failures;
      FAIL_CHECK("size " << size << " -> class " << int{c});
    }
  }
  CHECK(failures == 0);
  CHECK(size_to_class(0) == 1);  // documented: size 0 is served by class 1
  CHECK(size_to_class_fast(0) == 1);
  // A few boundaries straight from Go's tables.
  CHECK(size_to_class(8) == 1);
  CHECK(size_to_class(9) == 2);
  CHECK(size_to_class(1016) == 32);
  CHECK(size_to_class(1017) == 32);
  CHECK(size_to_class(1024) == 32);
  CHECK(size_to_class(1025) == 33);
  CHECK(size_to_class(32760) == 67);
}

TEST_CASE("Aligned lookup gives the smallest class that fits and is a multiple of the alignment") {
  std::size_t failures = 0;
  for (std::size_t shift = 0; shift <= page_shift; ++shift) {
    const std::size_t alignment = std::size_t{1} << shift;
    for (std::size_t size = 1; size <= max_small_size && failures < 10; ++size) {
      const std::uint8_t got = size_to_class_aligned(size, alignment);
      const std::uint8_t want = brute_force_aligned_class(size, alignment);
      const bool ok = got == want && (alignment > 8 || got == size_to_class(size));
      if (!ok) {
        ++failures;
        FAIL_CHECK("size " << size << " alignment " << alignment << " -> " << int{got} << ", want " << int{want});
      }
    }
  }
  CHECK(failures == 0);
  // Every alignment up to a page is servable for a size up to the alignment.
  for (std::size_t alignment = 1; alignment <= page_size; alignment *= 2)
    CHECK(class_to_size(size_to_class_aligned(alignment, alignment)) == std::max<std::size_t>(alignment, 8));
  CHECK(size_to_class_aligned(16385, 8192) == 64);  // 24576 = 3 * 8192
  CHECK(size_to_class_aligned(24577, 8192) == 67);  // 32768
  CHECK(size_to_class_aligned(17, 4096) == 44);     // 4096, skipping 24..3456
  // 32768 is a multiple of every alignment up to a page, so 0 ("no small
  // class, use a large span") only happens outside that domain.
  CHECK(size_to_class_aligned(1, 2 * page_size) == 0);
  CHECK(size_to_class_aligned(max_small_size + 1, 8) == 0);
  CHECK(size_to_class_aligned(0, 16) == 2);  // size 0 is treated like size 1
}

TEST_CASE("object_index is exact for every byte of every span of every class") {
  std::size_t failures = 0;
  for (std::uint8_t c = 1; c < num_size_classes && failures < 10; ++c) {
    const std::uint32_t size = class_to_size(c);
    CHECK(class_div_magic(c) == UINT32_MAX / size + 1);
    const auto span = static_cast<std::uint32_t>(class_span_bytes(c));
    // Every byte of every object, and the tail (offsets up to span, as Go checks).
    for (std::uint32_t offset = 0; offset <= span; ++offset) {
      if (object_index(offset, c) != offset / size) {
        ++failures;
        FAIL_CHECK("class " << int{c} << " offset " << offset << " -> " << object_index(offset, c));
        break;
      }
    }
    CHECK(object_index(span - 1, c) == (span - 1) / size);
  }
  CHECK(failures == 0);
}

TEST_CASE("is_object_start agrees with offset % size == 0 for every byte of every span of every class") {
  std::size_t failures = 0;
  for (std::uint8_t c = 1; c < num_size_classes && failures < 10; ++c) {
    const std::uint32_t size = class_to_size(c);
    const auto span = static_cast<std::uint32_t>(class_span_bytes(c));
    for (std::uint32_t offset = 0; offset <= span; ++offset) {
      if (is_object_start(offset, c) != (offset % size == 0)) {
        ++failures;
        FAIL_CHECK("class " << int{c} << " offset " << offset << " -> " << is_object_start(offset, c));
        break;
      }
    }
  }
  CHECK(failures == 0);
  // Class 0 (large spans) has magic 0: nothing passes, not even offset 0.
  CHECK_FALSE(is_object_start(0, 0));
  CHECK_FALSE(is_object_start(8192, 0));
}

TEST_CASE("Span classes round-trip for all 136 values") {
  CHECK(num_span_classes == 136);
  std::set<std::uint8_t> seen;
  for (std::uint8_t c = 0; c < num_size_classes; ++c) {
    for (bool noscan : {false, true}) {
      const span_class sc = span_class::make(c, noscan);
      CHECK(sc.size_class() == c);
      CHECK(sc.noscan() == noscan);
      CHECK(sc.value == c * 2 + (noscan ? 1 : 0));
      CHECK(sc == span_class{sc.value});
      seen.insert(sc.value);
    }
  }
  CHECK(seen.size() == num_span_classes);
  CHECK(*seen.rbegin() == num_span_classes - 1);
  CHECK(span_class::make(0, false).size_class() == 0);  // large-object spans
  CHECK(span_class::make(0, true).size_class() == 0);
  CHECK(std::is_trivially_copyable_v<span_class>);
  CHECK(std::is_standard_layout_v<span_class>);
}

TEST_CASE("The checksum is FNV-1a 64 over every field in little-endian order") {
  CHECK(fnv1a64({}) == 0xcbf29ce484222325ULL);  // published FNV-1a 64 test vectors
  CHECK(fnv1a64({'a'}) == 0xaf63dc4c8601ec8cULL);
  std::vector<std::uint8_t> bytes;
  for (const auto& e : size_class_table) {
    append_le(bytes, e.size, 4);
    append_le(bytes, e.npages, 1);
    append_le(bytes, e.objects, 2);
    append_le(bytes, e.tail_waste, 2);
  }
  CHECK(bytes.size() == num_size_classes * 9);
  CHECK(size_class_table_checksum() == fnv1a64(bytes));
  CHECK(size_class_table_checksum(size_class_table) == size_class_table_checksum());
}

TEST_CASE("The checksum changes when any byte of any field of any class changes") {
  const std::uint64_t original = size_class_table_checksum();
  std::size_t mutations = 0;
  for (std::size_t c = 0; c < num_size_classes; ++c) {
    for (int field = 0; field < 4; ++field) {
      for (std::size_t byte = 0; byte < 4; ++byte) {
        table_type copy = size_class_table;
        if (!flip_field_byte(copy, c, field, byte)) continue;
        ++mutations;
        if (size_class_table_checksum(copy) == original)
          FAIL_CHECK("class " << c << " field " << field << " byte " << byte << " is not covered");
      }
    }
  }
  CHECK(mutations == num_size_classes * (4 + 1 + 2 + 2));
}

}  // TEST_SUITE
