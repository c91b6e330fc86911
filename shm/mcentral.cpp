#include "shm/crash_point.hpp"
#include "shm/mcentral.hpp"

#include "shm/mheap.hpp"
#include "shm/segment.hpp"

namespace shmalloc {

mcentral::mcentral(mheap& heap, span_class spc) noexcept
    : heap_(&heap), spc_(spc), state_(&heap.state().central[spc.value]) {}

span_id& mcentral::head(list l) noexcept { return l == list::partial ? state_->partial : state_->full; }
std::uint32_t& mcentral::count(list l) noexcept {
  return l == list::partial ? state_->partial_count : state_->full_count;
}

void mcentral::push(list l, span_id id) noexcept {
  mspan& s = heap_->span(id);
  s.prev = span_id::nil();
  s.next = head(l);
  if (s.next) heap_->span(s.next).prev = id;
  head(l) = id;
  ++count(l);
}

void mcentral::unlink(list l, span_id id) noexcept {
  mspan& s = heap_->span(id);
  if (s.prev) heap_->span(s.prev).next = s.next;
  else head(l) = s.next;
  if (s.next) heap_->span(s.next).prev = s.prev;
  s.next = s.prev = span_id::nil();
  --count(l);
}

error mcentral::fold(span_id id) {
  errc status = errc::ok;
  std::string why;
  span_fold_remote(heap_->view(), heap_->span(id), &status, &why);
  if (status == errc::ok) return {};
  bump(heap_->accounts().remote_free_errors);
  return {status, why};
}

bool mcentral::settle(span_id id, error* problem) {
  mspan& s = heap_->span(id);
  error e = fold(id);
  if (e.code != errc::ok && problem != nullptr) *problem = std::move(e);
  if (s.alloc_count == reserved_slots(s.span_class)) {
    SHMALLOC_CRASH_POINT("mcentral.settle_free");
    heap_->free_span(id);
    return true;
  }
  s.state.store(mspan_state::central, std::memory_order_relaxed);
  push(s.alloc_count < s.nelems ? list::partial : list::full, id);
  return false;
}

span_id mcentral::hand_out(span_id id, std::uint32_t owner) noexcept {
  mspan& s = heap_->span(id);
  s.owner_client = owner;
  s.owner_cache.store(0, std::memory_order_relaxed);
  s.state.store(mspan_state::cached, std::memory_order_relaxed);
  ++state_->cached_count;
  return id;
}

span_id mcentral::take_swept_full() {
  // Full spans whose objects other processes freed since we last looked:
  // fold those frees in and take the first span that gained a free slot.
  std::uint32_t budget = sweep_budget;
  for (span_id id = state_->full; id && budget > 0; --budget) {
    mspan& s = heap_->span(id);
    const span_id next = s.next;
    if (remote_pending(s)) {
      unlink(list::full, id);
      fold(id);
      if (s.alloc_count < s.nelems) return id;
      push(list::full, id);
    }
    id = next;
  }
  return span_id::nil();
}

result<span_id> mcentral::cache_span(std::uint32_t owner) {
  if (span_id id = state_->partial) {
    unlink(list::partial, id);
    fold(id);  // fresher bits for the client
    SHMALLOC_CRASH_POINT("mcentral.take_partial");
    return hand_out(id, owner);
  }
  if (span_id id = take_swept_full()) return hand_out(id, owner);
  const std::uint8_t c = spc_.size_class();
  auto fresh = heap_->alloc_span(class_to_npages(c), spc_, mspan_state::cached, owner);
  if (!fresh) return fresh;
  SHMALLOC_CRASH_POINT("mcentral.fresh_span");
  ++state_->cached_count;
  return fresh;
}

error mcentral::uncache_span(span_id id) {
  mspan& s = heap_->span(id);
  if (s.state.load(std::memory_order_relaxed) != mspan_state::cached || s.span_class != spc_.value)
    return {errc::bad_handle, "span is not held by a client in this span class"};
  // The client kept no count of its own on the fast path: the bitmap is the
  // truth (it was written before any object was handed out).
  s.alloc_count = static_cast<std::uint16_t>(count_allocated(s));
  s.owner_client = 0;
  s.owner_cache.store(0, std::memory_order_relaxed);
  --state_->cached_count;
  error problem;
  SHMALLOC_CRASH_POINT("mcentral.uncache");
  settle(id, &problem);
  return problem;
}

bool mcentral::sweep_span(span_id id) {
  mspan& s = heap_->span(id);
  if (s.state.load(std::memory_order_relaxed) != mspan_state::central || s.span_class != spc_.value ||
      !remote_pending(s))
    return false;
  // settle pushed it on the list its count chose; nothing has folded since.
  unlink(s.alloc_count < s.nelems ? list::partial : list::full, id);
  SHMALLOC_CRASH_POINT("mcentral.sweep_span");
  return settle(id, nullptr);
}

std::uint32_t mcentral::sweep(std::uint32_t budget) {
  std::uint32_t freed = 0;
  for (list l : {list::full, list::partial}) {
    for (span_id id = head(l); id && budget > 0; --budget) {
      const span_id next = heap_->span(id).next;
      if (remote_pending(heap_->span(id))) {
        unlink(l, id);
        freed += settle(id, nullptr) ? 1 : 0;
      }
      id = next;
    }
  }
  return freed;
}

}  // namespace shmalloc
