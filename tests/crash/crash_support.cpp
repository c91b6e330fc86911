#include "crash/crash_support.hpp"

#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include "shm/layout.hpp"
#include "shm/mspan.hpp"

extern char** environ;

namespace shmalloc::crash_test {

std::vector<std::uint64_t> spread(std::uint64_t total, std::uint64_t n) {
  std::vector<std::uint64_t> at;
  const std::uint64_t span = total + total / 50 + 1;  // 2% past the end
  for (std::uint64_t i = 0; i < n; ++i) at.push_back(1 + i * span / n);
  return at;
}

child_env::child_env(std::uint64_t at, bool armed, const std::string& log) {
  for (char** e = environ; *e != nullptr; ++e)
    if (std::strncmp(*e, "SHMALLOC_CRASH_", 15) != 0) strings.emplace_back(*e);
  if (armed) strings.push_back("SHMALLOC_CRASH_AT=" + std::to_string(at));
  strings.push_back("SHMALLOC_CRASH_LOG=" + log);
  for (auto& s : strings) pointers.push_back(s.data());
  pointers.push_back(nullptr);
}

pid_t spawn(const std::vector<std::string>& argv, child_env& env) {
  std::vector<std::string> args = argv;
  std::vector<char*> a;
  for (auto& s : args) a.push_back(s.data());
  a.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    execve(a[0], a.data(), env.pointers.data());
    _exit(127);
  }
  return pid;
}

int wait_status(pid_t pid) {
  int status = 0;
  if (waitpid(pid, &status, 0) != pid) return -1;
  return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

std::string last_point(const std::string& log, std::uint64_t* hit) {
  std::ifstream in(log);
  std::string name, last;
  std::uint64_t n = 0;
  while (in >> name >> n) {
    if (name == "total") continue;
    last = name;
    if (hit != nullptr) *hit = n;
  }
  return last;
}

std::uint64_t total_hits(const std::string& log) {
  std::ifstream in(log);
  std::string name;
  std::uint64_t n = 0, total = 0;
  while (in >> name >> n)
    if (name == "total") total = n;
  return total;
}

std::uint64_t live_objects(const mheap& h) {
  const heap_view& v = h.view();
  const std::uint32_t high = h.state().span_pool.high_water;
  std::uint64_t n = 0;
  for (std::uint32_t i = 0; i < high; ++i) {
    const mspan& s = v.span(span_id{i});
    const mspan_state st = s.state.load(std::memory_order_relaxed);
    if (st == mspan_state::large) n += count_allocated(s);
    else if (st == mspan_state::central || st == mspan_state::cached)
      n += count_allocated(s) - count_remote_pending(v, s) - reserved_slots(s.span_class);
  }
  return n;
}

std::uint64_t count_from_env(const char* name, std::uint64_t fallback) {
  const char* v = std::getenv(name);
  const std::uint64_t n = v != nullptr ? std::strtoull(v, nullptr, 10) : 0;
  return n > 0 ? n : fallback;
}

}  // namespace shmalloc::crash_test
