// A heap whose capacity is larger than its tmpfs fails cleanly, with no
// SIGBUS: Docker's small /dev/shm, reproduced by mounting an 8 MiB tmpfs over
// /dev/shm in a private mount namespace (needs root, as in CI).
#include <doctest/doctest.h>
#include <sched.h>
#include <sys/mount.h>
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <functional>
#include <cstring>
#include <vector>

#include "shm/verify.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;

namespace {
constexpr int skipped = 77;

// In the child: a private /dev/shm of the given size. Returns false if this
// machine does not let us (not root, no user namespaces).
bool private_small_dev_shm(const char* size) {
  if (unshare(CLONE_NEWNS) != 0) return false;
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0) return false;
  return mount("tmpfs", "/dev/shm", "tmpfs", 0, size) == 0;
}

// Takes what is left of the private /dev/shm, to the last page; false if
// the filesystem never said it was full.
bool fill_dev_shm(int fd) {
  static const std::vector<char> block(64 << 10, 'f');
  for (std::size_t want = block.size(); want > 0;) {
    const ssize_t n = write(fd, block.data(), want);
    if (n < 0 && errno == ENOSPC) want /= 2;  // a smaller write may still fit
    else if (n <= 0) return false;
  }
  return true;
}
// Runs check in a child, over a 256 MiB heap on a private /dev/shm of
// `size` (a tmpfs mount option); checks from the parent that it returned 0,
// with no SIGBUS, and that nothing was left in the real /dev/shm.
void on_small_dev_shm(const char* size, const std::function<int(mheap&)>& check) {
  const std::string name = test::unique_heap_name("tmpfs");
  const int rc = test::run_in_child([&]() -> int {
    if (!private_small_dev_shm(size)) return skipped;
    heap_options o;
    o.name = name;
    o.capacity = 256ULL << 20;  // far more than the tmpfs behind it
    auto made = segment::create(o);
    if (!made) return 20;
    mheap h(*made.value());
    const int got = check(h);
    made.value().reset();
    segment::remove(name);
    return got;
  });
  if (rc == skipped) {
    MESSAGE("skipped: cannot mount a private tmpfs here (needs root)");
    return;
  }
  CHECK_MESSAGE(rc != 128 + SIGBUS, "SIGBUS: memory was not committed before use");
  CHECK(rc == 0);
  CHECK_FALSE(segment::exists(name));  // the private mount is gone, and nothing leaked to the real one
}
}  // namespace

TEST_SUITE("tmpfs full") {
  TEST_CASE("a heap larger than its tmpfs fails cleanly at growth, never with SIGBUS") {
    on_small_dev_shm("size=8m", [](mheap& h) -> int {
      std::vector<span_id> got;
      result<span_id> r{errc::ok, ""};
      for (;;) {
        r = h.alloc_large(512 << 10, true, 1);
        if (!r) break;
        got.push_back(*r);
        // Touch every byte we were given: committed memory never faults.
        std::memset(h.view().span_base(h.span(*r)), 0x5a, 512 << 10);
        if (got.size() > 64) return 21;
      }
      if (r.code() != errc::no_space) return 22;
      if (r.err().message.find("posix_fallocate") == std::string::npos) return 23;
      if (got.size() < 4) return 24;  // the first 4 MiB chunk fit
      if (h.accounts().grow_failures.load() == 0) return 25;
      if (!verify_heap(h).ok()) return 26;
      // The heap keeps serving from what it has.
      h.free_span(got.back());
      if (!h.alloc_large(512 << 10, true, 1)) return 27;
      return 0;
    });
  }

  // grow_failures counted only the arena's growth: a span table or
  // released pages that could not be committed failed allocations while
  // the counter (and an alert on it) stayed at 0.
  TEST_CASE("when /dev/shm is full, a span table or released pages that cannot be committed count as grow failures") {
    on_small_dev_shm("size=32m", [](mheap& h) -> int {
      // Three chunks of pages, given back at once: one descriptor used,
      // room for a table's worth of one-page spans without growing.
      auto big = h.alloc_large((2 * chunk_pages + 1) * page_size, true, 1);
      if (!big) return 21;
      h.free_span(*big);
      std::vector<span_id> spans;
      const span_pool_state& pool = h.state().span_pool;
      while (pool.free_head || pool.high_water < pool.committed) {
        auto r = h.alloc_large(page_size, true, 1);
        if (!r) return 22;
        spans.push_back(*r);
      }
      const int filler = open("/dev/shm/filler", O_CREAT | O_RDWR | O_CLOEXEC, 0600);
      if (filler < 0 || !fill_dev_shm(filler)) return 23;
      // A free page is there; the span table's next descriptors are not.
      const std::uint64_t before = h.accounts().grow_failures.load();
      auto r = h.alloc_large(page_size, true, 1);
      if (r || r.code() != errc::no_space) return 24;
      if (h.accounts().grow_failures.load() != before + 1) return 25;
      // Released pages that cannot be taken back.
      h.free_span(spans.back());
      if (h.scavenge(0) == 0) return 26;     // gives /dev/shm pages back...
      if (!fill_dev_shm(filler)) return 27;  // ...which the filler takes
      r = h.alloc_large(page_size, true, 1);
      if (r || r.code() != errc::no_space) return 28;
      if (h.accounts().grow_failures.load() != before + 2) return 29;
      if (!verify_heap(h).ok()) return 30;
      close(filler);
      return 0;
    });
  }
}
