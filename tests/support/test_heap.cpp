#include "support/test_heap.hpp"

#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <random>
#include <stdexcept>

namespace shmalloc::test {

namespace {
std::atomic<std::uint64_t> fake_now{1'000'000'000};
std::atomic<unsigned> counter{0};
}  // namespace

std::string unique_heap_name(const std::string& what) {
  static const unsigned salt = std::random_device{}();
  return "shmalloc-test-" + what + "-" + std::to_string(getpid()) + "-" + std::to_string(counter++) + "-" +
         std::to_string(salt % 100000);
}

std::uint64_t fake_clock() noexcept { return fake_now.load(); }
void advance_fake_clock(std::uint64_t ns) noexcept { fake_now.fetch_add(ns); }

test_heap::test_heap(std::uint64_t capacity, const std::string& what, mode_t mode) : name(unique_heap_name(what)) {
  heap_options o;
  o.name = name;
  o.capacity = capacity;
  o.mode = mode;
  auto made = segment::create(o);
  if (!made) throw std::runtime_error("test heap: " + made.err().message);
  seg = std::move(made.value());
  heap = std::make_unique<mheap>(*seg, &fake_clock);
}

test_heap::~test_heap() {
  heap.reset();
  seg.reset();
  segment::remove(name);
}

int run_in_child(const std::function<int()>& fn) {
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid < 0) return -1;
  if (pid == 0) {
    int code = 99;
    try {
      code = fn();
    } catch (...) {
      code = 98;
    }
    std::fflush(nullptr);
    _exit(code);
  }
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
  }
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return WEXITSTATUS(status);
}

}  // namespace shmalloc::test
