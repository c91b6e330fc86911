// crash_support.hpp: what both crash campaigns need: running a program with
// a crash point armed, reading what it logged, and the heap's live objects.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "shm/mheap.hpp"

namespace shmalloc::crash_test {

// Hit numbers to kill at: n of them spread evenly over 1 .. total plus a
// little past it (a run that ends first counts as a completed run).
std::vector<std::uint64_t> spread(std::uint64_t total, std::uint64_t n);

// The environment with SHMALLOC_CRASH_AT=at (none if at is 0 and !armed)
// and SHMALLOC_CRASH_LOG=log, for execve; built before any fork.
struct child_env {
  child_env(std::uint64_t at, bool armed, const std::string& log);
  std::vector<std::string> strings;
  std::vector<char*> pointers;  // null-terminated
};

// Forks and execs argv with env; returns the pid (-1 on failure). The child
// dies with the test.
pid_t spawn(const std::vector<std::string>& argv, child_env& env);
// Waits for pid: its exit code, or 128 + the signal that killed it.
int wait_status(pid_t pid);

// The last "<name> <hit>" line of a crash log ("" if none), and "total"'s hit.
std::string last_point(const std::string& log, std::uint64_t* hit = nullptr);
std::uint64_t total_hits(const std::string& log);

// Objects live in the heap, as the heap says: one per allocated slot of a
// small span (less its remote frees pending and a tiny span's metadata
// blocks; a tiny block counts once), one per allocated large object.
std::uint64_t live_objects(const mheap& h);

// From the environment variable (a positive count), else fallback.
std::uint64_t count_from_env(const char* name, std::uint64_t fallback);

}  // namespace shmalloc::crash_test
