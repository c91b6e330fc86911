// profile.hpp: sampled allocations (SHMALLOC_PROFILE_RATE), the part both
// sides share: the table in the segment, its entries' life, and the check
// of an entry against the heap.
//
// Design
// ======
// Go samples one allocation per MemProfileRate bytes on average and records
// its call stack; TCMalloc does the same and gives each sampled object a
// span of its own, so that the span says "sampled" and the free of the
// object finds its record without a lookup. We do what TCMalloc does: a
// client whose SHMALLOC_PROFILE_RATE is set draws the bytes to its next
// sample from an exponential distribution (a Poisson process over the bytes
// it allocates), and the allocation that crosses it, whatever its size, is
// made as a large object (its own span, whole pages) and recorded in the
// profile table with its call stack. Its free is a large object's free,
// which every process does through free_large, and the daemon's free of a
// span (a dead client's, or one freed by request) releases the entry too.
// So a live entry is a live object: the table never has to guess whether
// an object was freed and its slot reused, which a sample inside a shared
// span could not tell without a check on the free fast path.
//
// The fast paths are untouched: the countdown is kept on the allocation
// slow path (client/profile.cpp), which credits the bytes of each bitmap
// word it loads. The cost when profiling is on: a sampled object takes a
// page or more, and its allocation and free are a large object's.
//
// Who writes what
// ---------------
//   profile_sample   see layout.hpp: the sampling client claims and fills
//                    an entry; whoever frees the object releases it.
//   mspan::profile_sample  the sampling client stores entry + 1 after it
//                    publishes the entry; the freer exchanges it for 0.
//   The daemon reads the table for `shmallocctl leaks --sites`, and
//   releases entries no live sampled span points at (profile_sweep): those
//   of a client killed between its claim and its store to the span.
#pragma once

#include <cstdint>

#include "shm/layout.hpp"
#include "shm/mspan.hpp"

namespace shmalloc {

// Claims a free entry of the table for the object at handle h (a large
// span's start); nullptr if every entry is taken. The caller fills it and
// publishes it with profile_publish.
profile_sample* profile_claim(const heap_view& v, handle_t h) noexcept;

// Publishes a claimed entry and marks the span, whose object is now a
// sample: its free releases the entry.
void profile_publish(const heap_view& v, profile_sample& e, mspan& s, handle_t h) noexcept;

// The object of large span s is being freed (or the span taken back):
// releases its entry, if it has one.
void profile_release(const heap_view& v, mspan& s) noexcept;

// A consistent copy of entry i, if it holds a live sample: its span is a
// large span starting at the handle and marked with this entry.
struct profile_record {
  handle_t handle = 0;
  span_id span;
  std::uint64_t size = 0;
  std::uint64_t alloc_ns = 0;
  std::uint32_t rate = 0;
  std::uint32_t frames = 0;
  std::uint64_t pc[profile_frames] = {};
  std::uint64_t vma[profile_frames] = {};
};
bool profile_read(const heap_view& v, std::uint32_t i, profile_record* out) noexcept;

// Releases every entry whose span is not a live large span starting at its
// handle (a client killed while it filled one, a span a rebuild made dead).
// Returns how many. The daemon only, under its heap lock.
std::uint32_t profile_sweep(const heap_view& v) noexcept;

}  // namespace shmalloc
