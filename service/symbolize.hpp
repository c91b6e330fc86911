// symbolize.hpp: names for return addresses taken in another process, for
// shmallocctl leaks --sites. A sampled allocation's stack (shm/profile.hpp)
// holds each return address twice: as it was in the process (pc), which
// finds the module in /proc/PID/maps, and less the module's load bias
// (vma), which is what addr2line reads the module's symbols and line
// tables with. Binutils' addr2line (Debian's binutils) does the reading: one
// run per module for every address of that module.
//
// What it cannot name comes back as the address: a process that ended or
// whose maps this user may not read, a module deleted since, a binary
// without symbols.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

namespace shmalloc::service {

struct frame_name {
  std::string function;  // demangled; "0x..." (the vma) when unknown
  std::string location;  // file:line, or "" when unknown
  std::string module;    // its path in the process's maps, or "" when unknown
};

class symbolizer {
 public:
  // Asks for the name of one return address of process pid (0: unknown).
  void want(std::uint32_t pid, std::uint64_t pc, std::uint64_t vma);
  // Resolves everything asked for so far.
  void resolve();
  frame_name name(std::uint32_t pid, std::uint64_t pc, std::uint64_t vma) const;

 private:
  struct mapping {
    std::uint64_t start, end;
    std::string path;
  };
  const std::vector<mapping>& maps_of(std::uint32_t pid);
  std::string module_of(std::uint32_t pid, std::uint64_t pc);

  std::map<std::uint32_t, std::vector<mapping>> maps_;
  std::map<std::pair<std::uint32_t, std::uint64_t>, std::string> module_;   // (pid, pc) -> path
  std::map<std::pair<std::uint32_t, std::string>, std::vector<std::uint64_t>> wanted_;  // (pid, path) -> vmas
  std::map<std::pair<std::string, std::uint64_t>, frame_name> names_;       // (path, vma) -> name
};

// Whether a frame is libshmalloc's own (its allocation paths), by name: the
// site of an allocation is its first frame that is not.
bool is_allocator_frame(const frame_name& f);

}  // namespace shmalloc::service
