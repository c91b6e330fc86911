// A heap whose capacity is larger than its tmpfs fails cleanly, with no
// SIGBUS: Docker's small /dev/shm, reproduced by mounting an 8 MiB tmpfs over
// /dev/shm in a private mount namespace (needs root, as in CI).
#include <doctest/doctest.h>
#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include <csignal>
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
}  // namespace

TEST_SUITE("tmpfs full") {
  TEST_CASE("a heap larger than its tmpfs fails cleanly at growth, never with SIGBUS") {
    const std::string name = test::unique_heap_name("tmpfs");
    const int rc = test::run_in_child([&]() -> int {
      if (!private_small_dev_shm("size=8m")) return skipped;
      heap_options o;
      o.name = name;
      o.capacity = 256ULL << 20;  // far more than the 8 MiB behind it
      auto made = segment::create(o);
      if (!made) return 20;
      mheap h(*made.value());
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
      made.value().reset();
      segment::remove(name);
      return 0;
    });
    if (rc == skipped) {
      MESSAGE("skipped: cannot mount a private tmpfs here (needs root)");
      return;
    }
    CHECK_MESSAGE(rc != 128 + SIGBUS, "SIGBUS: memory was not committed before use");
    CHECK(rc == 0);
    CHECK_FALSE(segment::exists(name));  // the private mount is gone, and nothing leaked to the real one
  }
}
