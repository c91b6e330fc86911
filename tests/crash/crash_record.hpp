// crash_record.hpp: what a crash workload holds, written as it goes so that
// whoever outlives it knows (tests/crash/).
//
// A record is a text file of lines appended with write(2), each whole:
//   "+ <kind> <handle>"  after an allocation returned (kind: s small,
//                        t tiny, l large)
//   "- <handle>"         before the object is freed
// so a process killed at any point leaves every object it held listed,
// except the one in flight (allocated and not yet recorded, or recorded
// freed and not yet freed). The foreign objects a workload frees (another
// process allocated them) are listed in the same format in a file of their
// own, read first.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <map>
#include <set>
#include <string>

#include "shm/size_classes.hpp"

namespace shmalloc::crash_test {

class record_writer {
 public:
  explicit record_writer(const std::string& path)
      : fd_(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600)) {}
  ~record_writer() {
    if (fd_ >= 0) ::close(fd_);
  }
  record_writer(const record_writer&) = delete;
  record_writer& operator=(const record_writer&) = delete;
  bool ok() const noexcept { return fd_ >= 0; }
  void held(char kind, std::uint64_t h) const noexcept { line("+ %c %llu\n", kind, h); }
  void freeing(std::uint64_t h) const noexcept { line("- %c %llu\n", '-', h); }

 private:
  void line(const char* fmt, char kind, std::uint64_t h) const noexcept {
    char buf[48];
    const int n = std::snprintf(buf, sizeof buf, fmt, kind, static_cast<unsigned long long>(h));
    if (n > 0 && ::write(fd_, buf, static_cast<std::size_t>(n)) != n) std::abort();
  }
  int fd_;
};

// Handle -> kind of every object the files say is held (applied in order).
using holdings = std::map<std::uint64_t, char>;

inline void apply_record(const std::string& path, holdings& held) {
  std::ifstream in(path);
  std::string op;
  char kind = 0;
  std::uint64_t h = 0;
  while (in >> op >> kind >> h) {
    if (op == "+") held[h] = kind;
    else held.erase(h);
  }
}

// What the heap walk (count_allocated) counts for these objects: one per
// small or large object, one per 16-byte block for tiny ones.
inline std::uint64_t heap_count_of(const holdings& held) {
  std::uint64_t n = 0;
  std::set<std::uint64_t> blocks;
  for (const auto& [h, kind] : held) {
    if (kind == 't') blocks.insert(h / tiny_size);
    else ++n;
  }
  return n + blocks.size();
}

}  // namespace shmalloc::crash_test
