// forge.hpp: an address in this process's mapping of the heap for any
// handle, unchecked, for tests that hand the library bad pointers on
// purpose (shmalloc_pointer gives NULL for a handle that is not an
// allocated object's start).
#pragma once

#include <cstdint>

#include "shmalloc/shmalloc.h"

namespace shmalloc::test {

// The heap's base, from a live object's address and handle (attaches).
inline char* heap_base() {
  void* probe = shmalloc_alloc(8);
  if (probe == nullptr) return nullptr;
  char* base = static_cast<char*>(probe) - shmalloc_handle(probe);
  shmalloc_free(probe);
  return base;
}

inline void* forged_pointer(std::uint64_t handle) {
  char* base = heap_base();
  return base == nullptr ? nullptr : base + handle;
}

}  // namespace shmalloc::test
