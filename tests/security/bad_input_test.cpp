// Bad input on the C API: pointers the heap never gave out, double frees
// (local, from another process, of large objects), a free after
// shmalloc_detach, forged handles and pointers. Each gets what shmalloc.h
// says (an abort with a message, in a forked child that must die by SIGABRT
// with the message on its stderr; or NULL or 0), and the heap checks out
// afterwards. tests/integration/client_test.cpp covers a thread's double
// free, a static's address and interior pointers; these are the rest.
#include <doctest/doctest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "security/security_support.hpp"
#include "shm/segment.hpp"
#include "shmalloc/shmalloc.h"
#include "support/daemon_process.hpp"
#include "support/forge.hpp"

using namespace shmalloc;
using namespace shmalloc::test;

namespace {

constexpr const char* not_in_heap = "not a pointer into the shared heap";
constexpr const char* no_span = "not inside an allocated span (already freed?)";
constexpr const char* pending_twice = "double free (freed before by another thread or process, and not yet reclaimed)";

// A daemon, and where its heap's arenas start and end (handles).
struct bad_input_daemon {
  daemon_process d{{"--keep-heap"}};
  std::uint64_t arenas = 0;
  std::uint64_t size = 0;
  bad_input_daemon() {
    REQUIRE(d.started());
    auto seg = segment::attach(d.heap);
    REQUIRE(seg);
    arenas = seg.value()->regions().arenas.offset;
    size = seg.value()->size();
  }
  // A handle in the last page of the arenas, which no span has reached.
  std::uint64_t unused_page_handle() const { return size - 64; }
};

// fn, in a child that attaches first, must abort with message on stderr.
void dies_saying(const std::string& socket, const std::string& message, const std::function<void()>& fn) {
  CAPTURE(message);
  const child_end end = run_child([&] {
    if (shmalloc_attach(socket.c_str()) != 0) return 120;
    fn();
    return 0;
  });
  CHECK_MESSAGE(end.aborted(), "exit " << end.exit_code << ", signal " << end.signal << ", stderr: " << end.err);
  CHECK_MESSAGE(end.err.find(std::string("shmalloc: free(")) != std::string::npos, end.err);
  CHECK_MESSAGE(end.err.find(message) != std::string::npos, end.err);
}

// fn, in a child of its own (attached on first use), must exit 0.
void lives(const std::function<void()>& fn) {
  const child_end end = run_child([&] {
    fn();
    return 0;
  });
  CHECK_MESSAGE(end.exit_code == 0, "signal " << end.signal << ", stderr: " << end.err);
}

}  // namespace

TEST_SUITE("security: bad input on the C API") {
  TEST_CASE("a pointer the heap never gave out aborts, naming what is wrong") {
    bad_input_daemon b;
    const std::string sock = b.d.socket;
    dies_saying(sock, not_in_heap, [] { shmalloc_free(std::malloc(64)); });
    dies_saying(sock, not_in_heap, [] {
      int on_stack = 0;
      shmalloc_free(&on_stack);
    });
    dies_saying(sock, not_in_heap, [] { shmalloc_free(test::forged_pointer(64)); });  // the heap's own header
    const std::uint64_t unused = b.unused_page_handle();
    dies_saying(sock, no_span, [unused] { shmalloc_free(test::forged_pointer(unused)); });
    // A process that never attached has no heap for any pointer to be in.
    const child_end never = run_child([] {
      shmalloc_free(std::malloc(64));
      return 0;
    });
    CHECK(never.aborted());
    CHECK(never.err.find(not_in_heap) != std::string::npos);
    check_heap_after(b.d);
  }

  // A tiny object is counted per 16-byte block: a second free used to
  // bring the count to zero under the block's other objects, which the
  // next allocations then overwrote.
  TEST_CASE("a tiny object freed twice, by its process or another, aborts instead of freeing its block") {
    bad_input_daemon b;
    const std::string sock = b.d.socket;
    dies_saying(sock, "double free (of a tiny object)", [] {
      void* a = shmalloc_alloc_noscan(8);
      void* other = shmalloc_alloc_noscan(8);  // the same block
      std::memset(other, 0x77, 8);
      shmalloc_free(a);
      shmalloc_free(a);
    });
    REQUIRE(shmalloc_attach(sock.c_str()) == 0);
    void* a = shmalloc_alloc_noscan(4);
    void* kept = shmalloc_alloc_noscan(4);
    REQUIRE(a != nullptr);
    std::memset(kept, 0x5a, 4);
    dies_saying(sock, "double free (of a tiny object)", [a] {
      shmalloc_free(a);
      shmalloc_free(a);
    });
    // The holder's other object in that block is still its own.
    for (int i = 0; i < 1000; ++i) std::memset(shmalloc_alloc_noscan(4), 0x11, 4);
    const auto* k = static_cast<const unsigned char*>(kept);
    CHECK((k[0] == 0x5a && k[1] == 0x5a && k[2] == 0x5a && k[3] == 0x5a));
    shmalloc_detach();
    check_heap_after(b.d);
  }

  TEST_CASE("a second free from another process, before the holder takes the first in, aborts that process") {
    bad_input_daemon b;
    REQUIRE(shmalloc_attach(b.d.socket.c_str()) == 0);
    void* p = shmalloc_alloc(48);  // this thread holds its span: other processes' frees are remote
    void* q = shmalloc_alloc(48);
    REQUIRE(p != nullptr);
    dies_saying(b.d.socket, pending_twice, [p] {
      shmalloc_free(p);
      shmalloc_free(p);
    });
    // The holder is unharmed: the first free counts once, q is still its own.
    for (int i = 0; i < 1000; ++i) {
      void* r = shmalloc_alloc(48);
      CHECK(r != q);
      shmalloc_free(r);
    }
    shmalloc_free(q);
    shmalloc_detach();
    check_heap_after(b.d);
  }

  // Documented as not fatal: the freer cannot see that the holder took the
  // first free in; the holder finds the second when it folds, says so and
  // drops it (the object is not freed twice).
  TEST_CASE("a second free from another process after the holder took the first in is reported by the holder, not folded") {
    bad_input_daemon b;
    const std::string sock = b.d.socket;
    const child_end holder = run_child([&] {
      if (shmalloc_attach(sock.c_str()) != 0) return 120;
      void* p = shmalloc_alloc(48);
      void* keep = shmalloc_alloc(48);
      shmalloc_free(p);  // local: its bit is clear at once
      const pid_t freer = fork();
      if (freer == 0) {
        shmalloc_free(p);  // remote: a bit in the span's remote-free bitmap
        _exit(0);
      }
      int status = 0;
      waitpid(freer, &status, 0);
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return 121;
      shmalloc_trim();  // folds the span's remote frees
      void* next = shmalloc_alloc(48);
      if (next == keep) return 122;  // keep stayed allocated
      shmalloc_free(next);
      shmalloc_free(keep);
      shmalloc_detach();
      return 0;
    });
    CHECK_MESSAGE(holder.exit_code == 0, holder.err);
    CHECK_MESSAGE(holder.err.find("freed twice (remote free of a free object)") != std::string::npos, holder.err);
    check_heap_after(b.d);
  }

  TEST_CASE("a large object freed twice, by two processes or past the process's cache, aborts the second free") {
    bad_input_daemon b;
    REQUIRE(shmalloc_attach(b.d.socket.c_str()) == 0);
    void* large = shmalloc_alloc(100000);
    REQUIRE(large != nullptr);
    lives([large] { shmalloc_free(large); });  // another process: the daemon frees it
    dies_saying(b.d.socket, no_span, [large] { shmalloc_free(large); });
    // One process: the last of 257 goes past its cache of 256 (client/large.cpp),
    // to the daemon.
    dies_saying(b.d.socket, no_span, [] {
      std::vector<void*> objects;
      for (int i = 0; i < 257; ++i) objects.push_back(shmalloc_alloc(100000));
      for (void* p : objects) shmalloc_free(p);
      shmalloc_free(objects.back());
    });
    shmalloc_detach();
    check_heap_after(b.d);
  }

  TEST_CASE("a free after shmalloc_detach aborts: the heap is no longer mapped") {
    bad_input_daemon b;
    for (std::size_t n : {48u, 100000u}) {
      CAPTURE(n);
      dies_saying(b.d.socket, not_in_heap, [n] {
        void* p = shmalloc_alloc(n);
        shmalloc_detach();
        shmalloc_free(p);
      });
    }
    check_heap_after(b.d);
  }

  TEST_CASE("forged handles and pointers give NULL or 0") {
    bad_input_daemon b;
    REQUIRE(shmalloc_attach(b.d.socket.c_str()) == 0);
    CHECK(shmalloc_pointer(0) == nullptr);
    CHECK(shmalloc_pointer(b.size) == nullptr);
    CHECK(shmalloc_pointer(UINT64_MAX) == nullptr);
    int on_stack = 0;
    void* outside = std::malloc(64);
    CHECK(shmalloc_handle(nullptr) == 0);
    CHECK(shmalloc_handle(outside) == 0);
    CHECK(shmalloc_handle(&on_stack) == 0);
    CHECK(shmalloc_usable_size(nullptr) == 0);
    CHECK(shmalloc_usable_size(outside) == 0);
    CHECK(shmalloc_usable_size(&on_stack) == 0);
    CHECK(shmalloc_usable_size(test::forged_pointer(64)) == 0);  // the heap's header: no object there
    CHECK(shmalloc_usable_size(test::forged_pointer(b.unused_page_handle())) == 0);
    void* large = shmalloc_alloc(100000);
    REQUIRE(large != nullptr);
    void* small = shmalloc_alloc(48);
    REQUIRE(small != nullptr);
    CHECK(shmalloc_usable_size(small) == 48);
    CHECK(shmalloc_pointer(shmalloc_handle(small)) == small);
    CHECK(shmalloc_usable_size(large) == 106496);  // 13 pages
    // Inside an object: no size (a caller would overrun into the next
    // object), and no address for such a handle.
    CHECK(shmalloc_usable_size(static_cast<char*>(small) + 8) == 0);
    CHECK(shmalloc_usable_size(static_cast<char*>(large) + 50000) == 0);
    CHECK(shmalloc_pointer(shmalloc_handle(small) + 8) == nullptr);
    CHECK(shmalloc_pointer(shmalloc_handle(large) + 4096) == nullptr);
    CHECK(shmalloc_pointer(64) == nullptr);  // the heap's header
    CHECK(shmalloc_pointer(b.unused_page_handle()) == nullptr);
    void* gone = shmalloc_alloc(48);
    const std::uint64_t gone_handle = shmalloc_handle(gone);
    shmalloc_free(gone);
    CHECK(shmalloc_pointer(gone_handle) == nullptr);  // freed
    shmalloc_free(large);
    shmalloc_trim();  // the cached large object goes back to the daemon
    CHECK(shmalloc_usable_size(large) == 0);
    shmalloc_detach();
    CHECK(shmalloc_usable_size(small) == 0);  // detached: nothing is in the heap
    CHECK(shmalloc_handle(small) == 0);
    std::free(outside);
    check_heap_after(b.d);
  }
}
