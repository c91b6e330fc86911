// segment.hpp: one named POSIX shared-memory object holding a whole heap,
// created and mapped with Boost.Interprocess.
//
// A segment is process-local: each process that creates or attaches one maps
// the object at an address of its own choosing (64 MiB aligned, so that the
// arena region starts on an arena boundary in every process) and converts
// handles (offsets) to pointers with its own base. Destroying a segment
// unmaps it; only remove() deletes the shared-memory object.
//
// Memory is committed explicitly with posix_fallocate, so running out of
// /dev/shm is an error returned by commit() and never a SIGBUS on first
// touch; release() punches a hole, giving the pages back to the OS.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "shm/errc.hpp"
#include "shm/ids.hpp"
#include "shm/layout.hpp"

namespace shmalloc {

struct heap_options {
  std::string name = "shmalloc";          // [A-Za-z0-9._-], 1..200 characters
  std::uint64_t capacity = default_capacity;  // bytes of heap; rounded up to whole arenas
  mode_t mode = 0600;                     // applied with fchmod, never from the umask
  std::uint32_t max_caches = default_max_caches;
};

// An empty string if name can name a heap, else why not.
std::string validate_heap_name(const std::string& name);

class segment {
 public:
  // Creates the shared-memory object (it must not exist), sizes and maps it,
  // commits the fixed metadata and publishes the header. On any failure the
  // object is removed again and nothing is left in /dev/shm.
  static result<std::unique_ptr<segment>> create(const heap_options& options);
  // Maps an existing heap after checking that its header matches this build;
  // a mismatch is refused with a message naming both sides' values.
  static result<std::unique_ptr<segment>> attach(const std::string& name);
  // Deletes the shared-memory object; existing mappings stay valid.
  static bool remove(const std::string& name) noexcept;
  static bool exists(const std::string& name) noexcept;

  ~segment();
  segment(const segment&) = delete;
  segment& operator=(const segment&) = delete;

  const std::string& name() const noexcept { return name_; }
  std::byte* base() const noexcept { return base_; }
  std::uint64_t size() const noexcept { return size_; }
  segment_header& header() const noexcept { return fixed().header; }
  mheap_state& heap() const noexcept { return fixed().heap; }
  segment_fixed& fixed() const noexcept { return *reinterpret_cast<segment_fixed*>(base_); }
  const region_map& regions() const noexcept { return header().regions; }

  template <class T>
  T* at(std::uint64_t offset) const noexcept {
    return reinterpret_cast<T*>(base_ + offset);
  }
  void* pointer(handle_t h) const noexcept { return h == null_handle ? nullptr : base_ + h; }
  handle_t handle_of(const void* p) const noexcept {
    return p == nullptr ? null_handle : static_cast<handle_t>(static_cast<const std::byte*>(p) - base_);
  }
  bool contains(const void* p) const noexcept {
    auto* b = static_cast<const std::byte*>(p);
    return b >= base_ && b < base_ + size_;
  }

  // Backs [offset, offset + bytes) with memory (posix_fallocate). Idempotent.
  // errc::no_space when the filesystem is full; nothing is half-committed
  // from the heap's point of view (the caller does not advance its marks).
  error commit(std::uint64_t offset, std::uint64_t bytes) noexcept;
  // Returns [offset, offset + bytes) to the OS (FALLOC_FL_PUNCH_HOLE); the
  // range reads as zeros afterwards and must be committed again before use.
  error release(std::uint64_t offset, std::uint64_t bytes) noexcept;
  // Bytes of memory actually backing the object (st_blocks * 512).
  std::uint64_t backed_bytes() const noexcept;
  // Takes an exclusive advisory lock (flock) on the object, held until this
  // segment is destroyed or the process dies: one daemon per heap. False if
  // another process holds it.
  bool try_lock_exclusive() noexcept;

  // Whether a client that was given cache slot `slot` still lives, across
  // PID namespaces and containers (the daemon, after a restart, before it
  // reclaims an orphan's spans). A client holds a read lock on one byte per
  // slot hello gave it, past the object's end (liveness_lock below): an
  // open-file-description lock, which the kernel drops when the process's
  // last descriptor of it closes, so at its death.
  bool liveness_held(std::uint32_t slot) const noexcept;
  // The client: opens the object anew (close-on-exec; a forked child
  // closes its copy) and locks slot's byte through it. The descriptor, or
  // -1 (errno set); close it to drop every lock taken through it.
  int open_liveness() const noexcept;
  static bool liveness_lock(int fd, std::uint32_t slot) noexcept;
  // Free bytes of the filesystem behind the object (statvfs), or 0.
  std::uint64_t filesystem_avail_bytes() const noexcept;

 private:
  struct impl;
  explicit segment(std::unique_ptr<impl> p);
  static result<std::unique_ptr<segment>> map(std::unique_ptr<impl> p, std::uint64_t bytes);

  std::unique_ptr<impl> impl_;
  std::string name_;
  std::byte* base_ = nullptr;
  std::uint64_t size_ = 0;
};

}  // namespace shmalloc
