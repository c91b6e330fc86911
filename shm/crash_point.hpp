// crash_point.hpp: named points where a test build can kill its own process
// (issue 14, crash points; tests/crash/).
//
// SHMALLOC_CRASH_POINT("name") expands to nothing unless SHMALLOC_CRASH_POINTS
// is defined, which only the test variants of the client library and the
// daemon are (tests/crash/crash.cmake): production code never counts a hit.
//
// In a test build every point counts its hits in one process-wide counter.
// The environment says what to do, read once, at the first hit:
//   SHMALLOC_CRASH_AT=N   (N > 0) at the Nth hit, write "<name> <N>\n" to the
//                         file SHMALLOC_CRASH_LOG names, then raise(SIGKILL).
//   SHMALLOC_CRASH_AT=0   never kill; at exit write "total <hits>\n" to the
//                         log, so a test can spread its kill points over a
//                         whole run.
//   unset                 count only.
// Writes use open(2) and write(2) only, so a point may sit anywhere a slow
// path runs (locks held, half-written shared memory). A forked child starts
// over from the parent's count: the workloads that use points do not fork.
#pragma once

#ifdef SHMALLOC_CRASH_POINTS

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace shmalloc::crash {

inline std::atomic<std::uint64_t> g_hits{0};

// The log's path and the hit to die at, read once.
struct crash_plan {
  const char* log = nullptr;
  std::uint64_t at = ~std::uint64_t{0};  // unset: never
  bool total_at_exit = false;
};

inline void write_line(const char* log, const char* what, std::uint64_t n) noexcept {
  if (log == nullptr) return;
  char line[160];
  std::size_t len = 0;
  for (const char* p = what; *p != '\0' && len < 120; ++p) line[len++] = *p;
  line[len++] = ' ';
  char digits[24];
  int d = 0;
  do digits[d++] = static_cast<char>('0' + n % 10); while ((n /= 10) != 0);
  while (d > 0) line[len++] = digits[--d];
  line[len++] = '\n';
  const int fd = ::open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd < 0) return;
  [[maybe_unused]] const ssize_t w = ::write(fd, line, len);
  ::close(fd);
}

inline const crash_plan& plan() noexcept {
  static const crash_plan p = [] {
    crash_plan r;
    r.log = std::getenv("SHMALLOC_CRASH_LOG");
    if (const char* at = std::getenv("SHMALLOC_CRASH_AT"); at != nullptr) {
      r.at = std::strtoull(at, nullptr, 10);
      r.total_at_exit = r.at == 0;
      if (r.total_at_exit) std::atexit([] { write_line(plan().log, "total", g_hits.load()); });
    }
    return r;
  }();
  return p;
}

inline void hit(const char* name) noexcept {
  const crash_plan& p = plan();
  const std::uint64_t n = g_hits.fetch_add(1, std::memory_order_relaxed) + 1;
  if (n == p.at) {
    write_line(p.log, name, n);
    std::raise(SIGKILL);
  }
}

}  // namespace shmalloc::crash

#define SHMALLOC_CRASH_POINT(name) ::shmalloc::crash::hit(name)

#else

#define SHMALLOC_CRASH_POINT(name) ((void)0)

#endif
