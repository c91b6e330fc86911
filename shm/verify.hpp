// verify.hpp: the heap checker. Walks every span, page run, list and
// account of a heap and checks each invariant layout.hpp states, the
// MemStats identities included. Tests run it after every scenario; the
// daemon runs it after reclaiming a dead client's spans in debug builds.
//
// It reads only committed memory, and it must run under the daemon's heap
// lock (or with the heap quiescent): it reads daemon-only state.
#pragma once

#include <string>
#include <vector>

namespace shmalloc {

class mheap;

struct verify_options {
  // Also check, per size class, that the objects counted allocated minus
  // freed in every stats block (mcache slots and retired) equal the objects
  // live in spans. Holds for a quiescent heap whose users counted every
  // object; a client killed between setting an alloc bit and counting it
  // breaks it by that one object, so the daemon's after-reclaim check leaves
  // it off.
  bool object_counts = false;
  std::size_t max_problems = 20;
};

struct verify_report {
  std::vector<std::string> problems;
  bool ok() const noexcept { return problems.empty(); }
  std::string summary() const;
};

verify_report verify_heap(mheap& heap, const verify_options& options = {});

}  // namespace shmalloc
