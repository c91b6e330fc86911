#include <doctest/doctest.h>
#include <sys/stat.h>

#include <cstring>

#include "support/test_heap.hpp"

using namespace shmalloc;
using shmalloc::test::test_heap;
using shmalloc::test::unique_heap_name;

namespace {
bool in_dev_shm(const std::string& name) {
  struct stat st {};
  return stat(("/dev/shm/" + name).c_str(), &st) == 0;
}
mode_t file_mode(const std::string& name) {
  struct stat st {};
  stat(("/dev/shm/" + name).c_str(), &st);
  return st.st_mode & 0777;
}
}  // namespace

TEST_SUITE("segment") {
  TEST_CASE("a created heap has a complete header and an explicit mode") {
    const mode_t old = umask(0);  // the mode must not come from the umask
    test_heap t(128ULL << 20);
    umask(old);
    const segment_header& h = t.seg->header();
    CHECK(h.magic == heap_magic);
    CHECK(h.layout_version == layout_version);
    CHECK(h.page_size == 8192);
    CHECK(h.arena_bytes == 64ULL << 20);
    CHECK(h.capacity == 128ULL << 20);
    CHECK(h.max_pages == (128ULL << 20) / 8192);
    CHECK(h.size_class_checksum == size_class_table_checksum());
    CHECK(h.instance_id != 0);
    CHECK(h.state.load() == segment_state::ready);
    CHECK(file_mode(t.name) == 0600);
    CHECK(reinterpret_cast<std::uintptr_t>(t.seg->base()) % arena_bytes == 0);
    CHECK(h.regions.arenas.offset % arena_bytes == 0);
  }

  TEST_CASE("the mode is the one asked for") {
    test_heap t(64ULL << 20, "mode", 0640);
    CHECK(file_mode(t.name) == 0640);
  }

  TEST_CASE("capacity is rounded up to whole arenas and only metadata is committed at first") {
    test_heap t(100ULL << 20);
    CHECK(t.seg->header().capacity == 128ULL << 20);
    CHECK(t.seg->backed_bytes() < (1ULL << 20));
    CHECK(t.seg->backed_bytes() >= t.seg->heap().accounts.metadata_committed_bytes.load());
  }

  TEST_CASE("creating an existing heap, or one with a bad name or size, is refused") {
    test_heap t(64ULL << 20);
    heap_options o;
    o.name = t.name;
    auto again = segment::create(o);
    CHECK(again.code() == errc::exists);
    CHECK(again.err().message.find(t.name) != std::string::npos);
    o.name = "a/b";
    CHECK(segment::create(o).code() == errc::invalid_argument);
    o.name = unique_heap_name("size");
    o.capacity = 1024;
    CHECK(segment::create(o).code() == errc::invalid_argument);
    CHECK_FALSE(in_dev_shm(o.name));
  }

  TEST_CASE("attach maps the same heap at another address") {
    test_heap t(64ULL << 20);
    auto other = segment::attach(t.name);
    REQUIRE(other);
    CHECK(other.value()->base() != t.seg->base());
    CHECK(other.value()->header().instance_id == t.seg->header().instance_id);
    t.seg->heap().accounts.grow_count.store(7);
    CHECK(other.value()->heap().accounts.grow_count.load() == 7);
  }

  TEST_CASE("attaching a heap that does not exist says so") {
    auto r = segment::attach(unique_heap_name("missing"));
    CHECK(r.code() == errc::not_found);
  }

  TEST_CASE("a header from another layout version is refused, naming both values") {
    test_heap t(64ULL << 20);
    t.seg->header().layout_version = layout_version + 1;
    auto r = segment::attach(t.name);
    CHECK(r.code() == errc::layout_mismatch);
    const std::string& m = r.err().message;
    CHECK(m.find("layout version") != std::string::npos);
    CHECK(m.find(std::to_string(layout_version + 1) + " in the segment") != std::string::npos);
    CHECK(m.find(std::to_string(layout_version) + " in this process") != std::string::npos);
  }

  TEST_CASE("a header from another size-class table is refused") {
    test_heap t(64ULL << 20);
    t.seg->header().size_class_checksum ^= 1;
    auto r = segment::attach(t.name);
    CHECK(r.code() == errc::layout_mismatch);
    CHECK(r.err().message.find("size-class table checksum") != std::string::npos);
  }

  TEST_CASE("a shared-memory object that is not a heap is refused") {
    test_heap t(64ULL << 20);
    t.seg->header().magic = 0;
    auto r = segment::attach(t.name);
    CHECK(r.code() == errc::layout_mismatch);
    CHECK(r.err().message.find("not a shmalloc heap") != std::string::npos);
  }

  TEST_CASE("remove deletes the object and nothing is left in /dev/shm") {
    std::string name;
    {
      test_heap t(64ULL << 20);
      name = t.name;
      CHECK(in_dev_shm(name));
    }
    CHECK_FALSE(in_dev_shm(name));
    CHECK_FALSE(segment::exists(name));
  }
}
