// span_workers: a workload of several client processes against a running
// shmallocd, speaking the control protocol directly. (libshmalloc, issue 4,
// will hide all of this behind shmalloc_alloc/shmalloc_free; until then this
// is what a client does underneath.)
//
// Each worker says hello, maps the heap the daemon names, refills spans of a
// few size classes, allocates objects by setting their alloc bits, writes and
// checks a pattern in each, frees half of them, allocates and frees a large
// object, gives its spans back and says bye. One extra worker is killed with
// SIGKILL while it holds spans, to show the daemon taking them back.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "proto/control_client.hpp"
#include "shm/mspan.hpp"
#include "shm/segment.hpp"

using namespace shmalloc;

namespace {

std::uint64_t pattern(handle_t h) { return h * 0x9e3779b97f4a7c15ULL; }

struct worker {
  control_client c;
  std::unique_ptr<segment> seg;
  heap_view view;
  std::vector<std::uint32_t> spans;

  explicit worker(const std::string& socket) : c(socket) {}

  bool start(const std::string& name) {
    auto w = c.hello(name);
    if (!w) return false;
    auto att = segment::attach(w->heap_name);
    if (!att) {
      std::fprintf(stderr, "%s: %s\n", name.c_str(), att.err().message.c_str());
      return false;
    }
    seg = std::move(att.value());
    view = heap_view::of(*seg);
    return true;
  }

  bool refill(std::uint8_t size_class, std::uint16_t n) {
    auto body = c.request(proto::msg::refill, proto::encode(proto::refill_msg{span_class::make(size_class, false).value, n}));
    if (!body) return false;
    auto list = proto::decode_span_list(body.value(), proto::max_refill);
    if (!list) return false;
    spans.insert(spans.end(), list->span_ids.begin(), list->span_ids.end());
    return true;
  }

  // Fills every held span, checks every object, frees every other one.
  std::uint64_t churn() {
    std::uint64_t objects = 0;
    for (std::uint32_t id : spans) {
      mspan& s = view.span(span_id{id});
      std::vector<std::uint32_t> mine;
      for (int i; (i = span_alloc_object(s)) >= 0;) {
        std::byte* p = view.span_base(s) + static_cast<std::size_t>(i) * s.elem_size;
        const std::uint64_t pat = pattern(view.handle_of(p));
        std::memcpy(p, &pat, sizeof pat);
        mine.push_back(static_cast<std::uint32_t>(i));
      }
      for (std::uint32_t i : mine) {
        std::uint64_t pat = 0;
        std::memcpy(&pat, view.span_base(s) + std::size_t{i} * s.elem_size, sizeof pat);
        if (pat != pattern(view.handle_of(view.span_base(s) + std::size_t{i} * s.elem_size))) return 0;
        if (i % 2 == 0) span_free_local(s, i);
      }
      objects += mine.size();
    }
    return objects;
  }

  bool large_round_trip() {
    auto body = c.request(proto::msg::alloc_large, proto::encode(proto::alloc_large_msg{1 << 20, true}));
    if (!body) return false;
    auto large = proto::decode_large(body.value());
    if (!large) return false;
    std::memset(seg->pointer(large->handle), 0x7e, 1 << 20);
    return bool(c.request(proto::msg::free_large, proto::encode(proto::free_large_msg{large->handle})));
  }

  bool finish() {
    if (!spans.empty() && !c.request(proto::msg::release, proto::encode(proto::span_list_msg{spans}))) return false;
    return bool(c.request(proto::msg::bye));
  }
};

int run_worker(const std::string& socket, int n) {
  worker w(socket);
  const std::string name = "worker-" + std::to_string(n);
  if (!w.start(name)) return 1;
  for (std::uint8_t size_class : {std::uint8_t{2}, std::uint8_t{8}, std::uint8_t{20}, std::uint8_t{40}})
    if (!w.refill(size_class, 4)) return 2;
  const std::uint64_t objects = w.churn();
  if (objects == 0) return 3;
  if (!w.large_round_trip()) return 4;
  std::printf("%s (pid %d): %zu spans, %llu objects allocated and checked, half freed\n", name.c_str(), getpid(),
              w.spans.size(), static_cast<unsigned long long>(objects));
  std::fflush(stdout);
  return w.finish() ? 0 : 5;
}

// Holds spans and waits to be killed.
[[noreturn]] void run_victim(const std::string& socket, int ready_fd) {
  worker w(socket);
  const bool ok = w.start("victim") && w.refill(10, 8) && w.churn() > 0;
  const char c = ok ? 'y' : 'n';
  if (write(ready_fd, &c, 1) != 1) _exit(1);
  for (;;) pause();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string socket = argc > 1 ? argv[1] : default_socket_path();
  const int workers = argc > 2 ? std::atoi(argv[2]) : 4;
  std::fflush(stdout);
  std::vector<pid_t> pids;
  for (int n = 0; n < workers; ++n) {
    const pid_t pid = fork();
    if (pid == 0) _exit(run_worker(socket, n));
    pids.push_back(pid);
  }
  int ready[2];
  if (pipe(ready) != 0) return 1;
  const pid_t victim = fork();
  if (victim == 0) run_victim(socket, ready[1]);
  int failures = 0;
  for (pid_t pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    failures += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  }
  char c = 0;
  const bool victim_ready = read(ready[0], &c, 1) == 1 && c == 'y';
  kill(victim, SIGKILL);
  waitpid(victim, nullptr, 0);
  std::printf("victim (pid %d) killed with SIGKILL while holding spans%s\n", victim,
              victim_ready ? "" : " (it had failed to start)");
  if (failures != 0) std::fprintf(stderr, "span_workers: %d worker(s) failed\n", failures);
  return failures == 0 && victim_ready ? 0 : 1;
}
