// The C++ API: containers built by one process, read and extended by another.
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <boost/container/map.hpp>
#include <functional>
#include <boost/container/string.hpp>
#include <boost/container/vector.hpp>

#include "shmalloc/shmalloc.hpp"
#include "support/daemon_process.hpp"

namespace bc = boost::container;
template <class T>
using shm_vector = bc::vector<T, shmalloc::allocator<T>>;
using shm_string = bc::basic_string<char, std::char_traits<char>, shmalloc::allocator<char>>;
using shm_map = bc::map<int, shm_string, std::less<int>, shmalloc::allocator<std::pair<const int, shm_string>>>;

namespace {
int in_child(const std::function<int()>& fn) {
  const pid_t pid = fork();
  if (pid == 0) _exit(fn());
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
}  // namespace

TEST_SUITE("C++ API") {
  TEST_CASE("a Boost vector, string and map built in one process are read and extended in another") {
    shmalloc::test::daemon_process d;
    REQUIRE(d.started());
    shmalloc::heap h(d.socket.c_str());
    auto* v = h.construct<shm_vector<int>>("numbers");
    for (int i = 0; i < 1000; ++i) v->push_back(i);
    auto* m = h.construct<shm_map>("names");
    (*m)[1] = shm_string("one, long enough to leave the small-string buffer");
    (*m)[2] = shm_string("two");

    const int rc = in_child([] {
      auto* cv = shmalloc::heap::find<shm_vector<int>>("numbers");  // attaches on first use
      auto* cm = shmalloc::heap::find<shm_map>("names");
      if (cv == nullptr || cm == nullptr) return 1;
      for (int i = 0; i < 1000; ++i)
        if ((*cv)[static_cast<std::size_t>(i)] != i) return 2;
      if (cm->at(1) != "one, long enough to leave the small-string buffer" || cm->at(2) != "two") return 3;
      for (int i = 1000; i < 5000; ++i) cv->push_back(i);  // reallocates in the shared heap
      (*cm)[3] = shm_string("three, added by the child process");
      shmalloc_detach();
      return 0;
    });
    REQUIRE(rc == 0);
    REQUIRE(v->size() == 5000);
    for (int i = 0; i < 5000; ++i) CHECK((*v)[static_cast<std::size_t>(i)] == i);
    CHECK(m->at(3) == "three, added by the child process");
    CHECK(h.destroy<shm_vector<int>>("numbers"));
    CHECK(h.destroy<shm_map>("names"));
    CHECK(h.find<shm_map>("names") == nullptr);
    CHECK_THROWS_AS(h.construct<int>("bad name"), std::system_error);
  }

  TEST_CASE("every type of the alignment table is aligned for its type through allocator<T>") {
    shmalloc::test::daemon_process d;
    REQUIRE(d.started());
    shmalloc::heap h(d.socket.c_str());
    struct alignas(1) a1 { char c[3]; };
    struct alignas(2) a2 { char c[6]; };
    struct alignas(4) a4 { char c[12]; };
    struct alignas(8) a8 { char c[24]; };
    struct alignas(16) a16 { char c[48]; };
    auto check = [](auto tag) {
      using T = decltype(tag);
      shmalloc::allocator<T> a;
      for (std::size_t n : {1u, 2u, 3u, 7u, 100u, 1000u}) {
        auto p = a.allocate(n);
        CHECK(reinterpret_cast<std::uintptr_t>(p.get()) % alignof(T) == 0);
        a.deallocate(p, n);
      }
    };
    check(a1{});
    check(a2{});
    check(a4{});
    check(a8{});
    check(a16{});
    shm_vector<a16> v;
    for (int i = 0; i < 100; ++i) v.emplace_back();
    CHECK(reinterpret_cast<std::uintptr_t>(v.data()) % 16 == 0);
  }
}
