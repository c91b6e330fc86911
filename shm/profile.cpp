// profile.cpp: the profile table's entries (profile.hpp).
#include "shm/profile.hpp"

#include <algorithm>
#include <atomic>

namespace shmalloc {

namespace {

// A live large span whose object starts at handle h.
bool large_span_at(const heap_view& v, handle_t h, span_id* out) noexcept {
  const span_id id = v.span_at(h);
  if (!id) return false;
  const mspan& s = v.span(id);
  if (s.state.load(std::memory_order_relaxed) != mspan_state::large || v.handle_of(v.span_base(s)) != h) return false;
  *out = id;
  return true;
}

}  // namespace

profile_sample* profile_claim(const heap_view& v, handle_t h) noexcept {
  if (v.profile == nullptr) return nullptr;
  // Start where the handle points, so that concurrent claimers spread out.
  const auto start = static_cast<std::uint32_t>((h / page_size) % max_profile_samples);
  for (std::uint32_t n = 0; n < max_profile_samples; ++n) {
    profile_sample& e = v.profile[(start + n) % max_profile_samples];
    std::uint64_t expected = 0;
    if (e.handle.load(std::memory_order_relaxed) == 0 &&
        e.handle.compare_exchange_weak(expected, h | profile_claiming, std::memory_order_acquire, std::memory_order_relaxed))
      return &e;
  }
  return nullptr;
}

void profile_publish(const heap_view& v, profile_sample& e, mspan& s, handle_t h) noexcept {
  // The span first: the daemon's sweep keeps a claimed entry whose span is
  // live, and would release a published one its span does not point at.
  s.profile_sample.store(static_cast<std::uint16_t>(&e - v.profile + 1), std::memory_order_release);
  e.handle.store(h, std::memory_order_release);
}

void profile_release(const heap_view& v, mspan& s) noexcept {
  // A load first: most spans are not sampled, and every large free comes
  // here; an exchange would cost each of them a locked instruction.
  if (s.profile_sample.load(std::memory_order_relaxed) == 0) return;
  const std::uint16_t k = s.profile_sample.exchange(0, std::memory_order_acq_rel);
  if (k == 0 || k > max_profile_samples || v.profile == nullptr) return;
  std::uint64_t expected = v.handle_of(v.span_base(s));
  // Released only if it is still this object's: a scribbled mark frees nothing else.
  while (!v.profile[k - 1].handle.compare_exchange_weak(expected, 0, std::memory_order_release, std::memory_order_relaxed))
    if (expected != v.handle_of(v.span_base(s))) return;
}

bool profile_read(const heap_view& v, std::uint32_t i, profile_record* out) noexcept {
  if (v.profile == nullptr || i >= max_profile_samples) return false;
  const profile_sample& e = v.profile[i];
  const std::uint64_t h = e.handle.load(std::memory_order_acquire);
  if (h == 0 || (h & profile_claiming) != 0 || !large_span_at(v, h, &out->span)) return false;
  if (v.span(out->span).profile_sample.load(std::memory_order_acquire) != i + 1) return false;
  out->handle = h;
  out->size = e.size.load(std::memory_order_relaxed);
  out->alloc_ns = e.alloc_ns.load(std::memory_order_relaxed);
  out->rate = e.rate.load(std::memory_order_relaxed);
  out->frames = std::min(e.frames.load(std::memory_order_relaxed), profile_frames);
  for (std::uint32_t f = 0; f < profile_frames; ++f) {
    out->pc[f] = e.pc[f].load(std::memory_order_relaxed);
    out->vma[f] = e.vma[f].load(std::memory_order_relaxed);
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  return e.handle.load(std::memory_order_relaxed) == h;  // not released and claimed again meanwhile
}

std::uint32_t profile_sweep(const heap_view& v) noexcept {
  if (v.profile == nullptr) return 0;
  std::uint32_t released = 0;
  for (std::uint32_t i = 0; i < max_profile_samples; ++i) {
    profile_sample& e = v.profile[i];
    std::uint64_t h = e.handle.load(std::memory_order_acquire);
    if (h == 0) continue;
    span_id id;
    const handle_t object = h & ~profile_claiming;
    // Being filled: fine while its span is a live large object (the claimer
    // allocated it first). Published: the span must point back at it.
    if (large_span_at(v, object, &id) &&
        ((h & profile_claiming) != 0 || v.span(id).profile_sample.load(std::memory_order_acquire) == i + 1))
      continue;
    if (e.handle.compare_exchange_weak(h, 0, std::memory_order_release, std::memory_order_relaxed)) ++released;
  }
  return released;
}

}  // namespace shmalloc
