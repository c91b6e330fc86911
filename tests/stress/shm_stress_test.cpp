// Stress tests of the shared heap core: long random mixes of span and object
// traffic checked against a model after every few hundred steps, and remote
// frees pushed concurrently onto the same spans by several processes (the
// lock-free CAS push across address spaces) and by several threads (so that
// a TSan build has something to look at).
//
// Every run is deterministic: fixed seeds, no dependence on timing except for
// how the concurrent pushes interleave, which the checks do not depend on.
// SHMALLOC_STRESS_SEED=<n> replaces the seeds, to explore other sequences.
//
// Object patterns: every small object gets a 64-bit pattern, derived from its
// handle and an allocation serial number, in bytes 8..15 (and, for objects of
// 24 bytes and more, in their last 8 bytes too). Bytes 0..7 carry no
// pattern (once a remote free wrote a list link there; now no free writes
// into an object, and the patterns must survive every free). Objects of the
// 8-byte class carry no pattern. An object handed out twice, two objects that
// overlap, a page released under a live object or a handle translated wrongly
// shows up as a pattern mismatch (or as a handle the model already holds).
#include <doctest/doctest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "shm/verify.hpp"
#include "support/test_heap.hpp"

using namespace shmalloc;
using shmalloc::test::test_heap;

namespace {

std::uint32_t seed_or(std::uint32_t fixed) {
  if (const char* s = std::getenv("SHMALLOC_STRESS_SEED"); s != nullptr && *s != '\0')
    return static_cast<std::uint32_t>(std::strtoul(s, nullptr, 0)) ^ fixed;
  return fixed;
}

std::uint64_t pattern_of(handle_t h, std::uint64_t serial) {
  std::uint64_t x = h * 0x9e3779b97f4a7c15ULL ^ serial * 0xbf58476d1ce4e5b9ULL ^ 0x5555;
  x ^= x >> 31;
  return x | 1;  // never 0: a punched-out (zeroed) page never matches
}

std::uint64_t load64(const std::byte* p) {
  std::uint64_t x;
  std::memcpy(&x, p, sizeof x);
  return x;
}
void store64(std::byte* p, std::uint64_t x) { std::memcpy(p, &x, sizeof x); }

// Where a small object's patterns go: bytes 8..15, and the last 8 bytes when
// those do not overlap the first pattern. The 8-byte class has none.
void write_pattern(std::byte* p, std::uint32_t size, std::uint64_t pat) {
  if (size < 16) return;
  store64(p + 8, pat);
  if (size >= 24) store64(p + size - 8, ~pat);
}
bool pattern_ok(const std::byte* p, std::uint32_t size, std::uint64_t pat) {
  if (size < 16) return true;
  if (load64(p + 8) != pat) return false;
  return size < 24 || load64(p + size - 8) == ~pat;
}

std::byte* object_ptr(const heap_view& v, const mspan& s, std::uint32_t i) {
  return v.span_base(s) + std::uint64_t{i} * s.elem_size;
}

verify_report verify_counts(mheap& h) {
  verify_options o;
  o.object_counts = true;
  return verify_heap(h, o);
}

// ===========================================================================
// 1. Random traffic against a model.
// ===========================================================================

class traffic {
 public:
  traffic(test_heap& t, std::uint32_t seed) : t_(t), h_(*t.heap), v_(h_.view()), rng_(seed) {
    auto slot = h_.assign_cache(mheap::daemon_client);
    REQUIRE_MESSAGE(slot, slot.err().message);
    stats_ = &h_.cache_slot(*slot).stats;
    span_live_.assign(v_.max_spans, 0);
  }

  void step() {
    ++steps_;
    const std::uint64_t in_use = h_.accounts().pages_in_use.load(std::memory_order_relaxed);
    peak_pages_ = std::max(peak_pages_, in_use);
    if (in_use > max_pages_in_use || live_.size() > max_live) draining_ = true;
    if (in_use < max_pages_in_use / 2 && live_.size() < max_live / 2) draining_ = false;
    drained_steps_ += draining_ ? 1 : 0;

    const std::uint32_t r = pick(100);
    if (draining_) {
      if (r < 55) free_burst();
      else if (r < 70) empty_a_span();
      else if (r < 80) uncache_one();
      else if (r < 90) sweep_some();
      else if (r < 95) free_large();
      else scavenge_some();
      return;
    }
    if (r < 7) cache_one();
    else if (r < 40) alloc_burst();
    else if (r < 68) free_burst();
    else if (r < 70) empty_a_span();
    else if (r < 77) uncache_one();
    else if (r < 80) holder_fold();
    else if (r < 86) sweep_some();
    else if (r < 90) alloc_large();
    else if (r < 94) free_large();
    else if (r < 96) cache_one_spare_owner();
    else scavenge_some();
  }

  // The heap checker, then the model against the heap, span by span and
  // object by object.
  void check_all() {
    ++checks_;
    const verify_report r = verify_counts(h_);
    REQUIRE_MESSAGE(r.ok(), "after step ", steps_, ": ", r.summary());

    // Stats blocks against the model, per size class.
    for (std::size_t c = 1; c < num_size_classes; ++c) {
      const std::int64_t counted = static_cast<std::int64_t>(stats_->small_allocs[c].load() - stats_->small_frees[c].load());
      REQUIRE_MESSAGE(counted == class_live_[c], "size class ", c, " after step ", steps_);
    }

    // Every span descriptor against the model.
    std::uint32_t cached = 0, large = 0;
    const std::uint32_t high_water = h_.state().span_pool.high_water;
    for (std::uint32_t i = 0; i < high_water; ++i) {
      const std::string problem = span_problem(i, &cached, &large);
      REQUIRE_MESSAGE(problem.empty(), "span ", i, " after step ", steps_, ": ", problem);
    }
    REQUIRE(cached == held_owner_.size());
    REQUIRE(large == large_.size());

    // Every live object: still allocated, found where we put it, intact.
    for (const object& o : live_) {
      const std::string problem = object_problem(o);
      REQUIRE_MESSAGE(problem.empty(), "object ", o.handle, " (span ", o.span.value, " index ", o.index, " class ",
                      int{o.size_class}, ") after step ", steps_, ": ", problem);
    }
    for (const large_object& o : large_) check_large(o);
  }

  // Frees everything, gives every span back and sweeps: the heap must be
  // empty, then fully scavenged.
  void drain() {
    while (!live_.empty()) free_at(live_.size() - 1);
    while (!held_ids_.empty()) uncache_at(held_ids_.size() - 1);
    while (!large_.empty()) free_large_at(large_.size() - 1);
    for (std::uint32_t c = 2; c < num_span_classes; ++c)
      h_.central(span_class{static_cast<std::uint8_t>(c)}).sweep(~std::uint32_t{0});
    check_all();

    const heap_accounts& a = h_.accounts();
    CHECK(a.pages_in_use.load() == 0);
    CHECK(a.large_spans.load() == 0);
    CHECK(a.large_pages.load() == 0);
    CHECK(h_.state().span_pool.in_use == 0);
    for (std::uint32_t c = 0; c < num_span_classes; ++c) {
      const mcentral_state& m = h_.state().central[c];
      INFO("span class ", c);
      CHECK(m.partial_count == 0);
      CHECK(m.full_count == 0);
      CHECK(m.cached_count == 0);
      CHECK(!m.partial);
      CHECK(!m.full);
    }
    CHECK(h_.pages().count_free() == a.pages_committed.load());
    CHECK(h_.pages().longest_free_run() == a.pages_committed.load());

    test::advance_fake_clock(10'000'000'000ULL);
    h_.scavenge(0);
    CHECK(a.pages_released.load() == a.pages_committed.load());
    const verify_report r = verify_counts(h_);
    REQUIRE_MESSAGE(r.ok(), r.summary());
    // The arenas are holes now: what backs the object is its metadata
    // (exactly, on a tmpfs without huge pages; allow one huge page more).
    CHECK(t_.seg->backed_bytes() <= a.metadata_committed_bytes.load() + (2u << 20));
  }

  std::string summary() const {
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "steps %llu, checks %llu, allocs %llu, local frees %llu, remote frees %llu, "
                  "spans cached %llu, large %llu, holder folds %llu, draining steps %llu, peak pages %llu, committed %llu, "
                  "scavenged %llu MiB, recommitted %llu MiB",
                  ull(steps_), ull(checks_), ull(allocs_), ull(local_frees_), ull(remote_frees_), ull(caches_),
                  ull(larges_), ull(folds_), ull(drained_steps_), ull(peak_pages_), ull(h_.accounts().pages_committed.load()),
                  ull(h_.accounts().scavenged_bytes_total.load() >> 20),
                  ull(h_.accounts().recommitted_bytes_total.load() >> 20));
    return buf;
  }

 private:
  // Past either mark the mix turns to frees until both are down to half:
  // the heap stays around 32 MiB and spans keep emptying out.
  static constexpr std::size_t max_live = 12000;
  static constexpr std::uint64_t max_pages_in_use = 3072;
  static constexpr std::size_t max_held = 48;
  static constexpr std::size_t max_large = 12;
  static unsigned long long ull(std::uint64_t x) { return x; }

  struct object {
    handle_t handle;
    span_id span;
    std::uint32_t index;
    std::uint32_t size;
    std::uint8_t size_class;
    std::uint64_t pattern;
  };
  struct large_object {
    span_id span;
    handle_t handle;
    std::uint64_t bytes;
    std::uint64_t pattern;
  };

  std::uint32_t pick(std::uint32_t n) { return std::uniform_int_distribution<std::uint32_t>(0, n - 1)(rng_); }

  // Most traffic goes to a few hot classes, so spans are reused, go full,
  // collect remote frees and empty out; the rest to any class.
  span_class random_class() {
    static constexpr std::uint8_t hot[] = {1, 2, 3, 5, 8, 10, 18, 26, 33, 41, 52, 67};
    const std::uint8_t c = pick(10) < 7 ? hot[pick(std::size(hot))] : static_cast<std::uint8_t>(1 + pick(num_size_classes - 1));
    return span_class::make(c, pick(2) == 0);
  }

  // What is wrong with span i as the model sees it, or "" (no doctest
  // assertion per span: this runs for every span at every check).
  std::string span_problem(std::uint32_t i, std::uint32_t* cached, std::uint32_t* large) const {
    const mspan& s = v_.span(span_id{i});
    const mspan_state st = s.state.load(std::memory_order_relaxed);
    const auto held = held_owner_.find(i);
    const bool is_held = held != held_owner_.end();
    switch (st) {
      case mspan_state::dead:
        if (span_live_[i] != 0) return "dead, but the model has " + std::to_string(span_live_[i]) + " objects in it";
        if (is_held) return "dead, but the model holds it";
        return {};
      case mspan_state::cached:
        ++*cached;
        if (!is_held) return "cached, but the model does not hold it";
        if (held->second != s.owner_client)
          return "held by client " + std::to_string(s.owner_client) + ", model says " + std::to_string(held->second);
        break;
      case mspan_state::central:
        if (is_held) return "central, but the model holds it";
        if (s.owner_client != 0) return "central with owner_client " + std::to_string(s.owner_client);
        break;
      case mspan_state::large:
        ++*large;
        if (is_held) return "large, but the model holds it as a small span";
        return {};
      default:
        return "bad state " + std::to_string(int(st));
    }
    const std::uint32_t bits = count_allocated(s);
    const std::uint32_t pending = count_remote_pending(v_, s);
    if (bits != s.alloc_count)
      return "alloc_count " + std::to_string(s.alloc_count) + " != bits " + std::to_string(bits);
    if (bits - pending - reserved_slots(s.span_class) != span_live_[i])
      return std::to_string(bits) + " bits - " + std::to_string(pending) + " pending != " +
             std::to_string(span_live_[i]) + " live in the model";
    return {};
  }

  std::string object_problem(const object& o) const {
    object_ref ref;
    if (v_.object_at(o.handle, &ref) != errc::ok) return "object_at does not find it";
    if (ref.span.value != o.span.value || ref.index != o.index)
      return "object_at says span " + std::to_string(ref.span.value) + " index " + std::to_string(ref.index);
    const mspan& s = v_.span(o.span);
    const mspan_state st = s.state.load(std::memory_order_relaxed);
    if (st != mspan_state::cached && st != mspan_state::central) return "its span is in state " + std::to_string(int(st));
    if (span_class{s.span_class}.size_class() != o.size_class) return "its span has another size class";
    if (!is_allocated(s, o.index)) return "its alloc bit is clear";
    if (!pattern_ok(static_cast<const std::byte*>(v_.pointer(o.handle)), o.size, o.pattern))
      return "its pattern was overwritten";
    return {};
  }

  void check_object(const object& o) {
    const std::string problem = object_problem(o);
    REQUIRE_MESSAGE(problem.empty(), "object ", o.handle, " (span ", o.span.value, " index ", o.index, " class ",
                    int{o.size_class}, ") after step ", steps_, ": ", problem);
  }

  void check_large(const large_object& o) {
    INFO("large object handle ", o.handle, " span ", o.span.value, " after step ", steps_);
    object_ref ref;
    REQUIRE(v_.object_at(o.handle, &ref) == errc::ok);
    REQUIRE(ref.span.value == o.span.value);
    REQUIRE(ref.index == 0);
    REQUIRE(v_.span(o.span).state.load() == mspan_state::large);
    const auto* p = static_cast<const std::byte*>(v_.pointer(o.handle));
    REQUIRE_MESSAGE(load64(p) == o.pattern, "large object pattern overwritten");
    REQUIRE_MESSAGE(load64(p + o.bytes - 8) == ~o.pattern, "large object pattern overwritten");
  }

  void cache_with(std::uint32_t owner) {
    const span_class spc = random_class();
    auto id = h_.central(spc).cache_span(owner);
    REQUIRE_MESSAGE(id, id.err().message);
    ++caches_;
    const mspan& s = h_.span(*id);
    INFO("cached span ", id->value, " class ", int{spc.value}, " after step ", steps_);
    REQUIRE(held_owner_.count(id->value) == 0);
    REQUIRE(s.state.load() == mspan_state::cached);
    REQUIRE(s.owner_client == owner);
    REQUIRE(s.span_class == spc.value);
    REQUIRE(!remote_pending(s));  // cache_span folded what was pending
    REQUIRE(count_allocated(s) == span_live_[id->value] + reserved_slots(s.span_class));
    REQUIRE(s.alloc_count == span_live_[id->value] + reserved_slots(s.span_class));
    REQUIRE(s.alloc_count < s.nelems);
    held_owner_[id->value] = owner;
    held_ids_.push_back(*id);
  }

  void cache_one() {
    if (held_ids_.size() >= max_held) return uncache_one();
    cache_with(1 + pick(4));
  }
  // A span for a client id outside 1..4: only ever freed into remotely by
  // the others until it is given back.
  void cache_one_spare_owner() {
    if (held_ids_.size() >= max_held) return uncache_one();
    cache_with(5 + pick(1000));
  }

  void add_object(span_id id, mspan& s, std::uint32_t i) {
    std::byte* p = object_ptr(v_, s, i);
    const handle_t hd = v_.handle_of(p);
    object_ref ref;
    const bool found = v_.object_at(hd, &ref) == errc::ok && ref.span.value == id.value && ref.index == i;
    if (where_.count(hd) != 0 || !found) {
      FAIL("new object ", hd, " (span ", id.value, " index ", i, ") after step ", steps_, ": ",
           std::string(found ? "handed out twice" : "object_at does not find it"));
    }
    const std::uint8_t c = span_class{s.span_class}.size_class();
    const object o{hd, id, i, s.elem_size, c, pattern_of(hd, ++serial_)};
    write_pattern(p, o.size, o.pattern);
    bump(stats_->small_allocs[c], std::uint64_t{1});
    where_[hd] = live_.size();
    live_.push_back(o);
    ++span_live_[id.value];
    ++class_live_[c];
    ++allocs_;
  }

  void alloc_burst() {
    if (held_ids_.empty()) return cache_one();
    const span_id id = held_ids_[pick(static_cast<std::uint32_t>(held_ids_.size()))];
    mspan& s = h_.span(id);
    const std::uint32_t n = 1 + pick(48);
    for (std::uint32_t k = 0; k < n; ++k) {
      std::int32_t i = span_alloc_object(s);
      if (i < 0) {
        // The span ran dry: its holder folds the remote frees in, as a
        // client's refill does before asking for another span.
        fold(id, s);
        i = span_alloc_object(s);
        if (i < 0) return;
      }
      add_object(id, s, static_cast<std::uint32_t>(i));
    }
  }

  void fold(span_id id, mspan& s) {
    errc status{};
    std::string why;
    span_fold_remote(v_, s, &status, &why);
    REQUIRE_MESSAGE(status == errc::ok, why);
    REQUIRE(!remote_pending(s));
    REQUIRE(count_allocated(s) == span_live_[id.value] + reserved_slots(s.span_class));
    REQUIRE(s.alloc_count == span_live_[id.value] + reserved_slots(s.span_class));
    ++folds_;
  }

  void holder_fold() {
    if (held_ids_.empty()) return;
    const span_id id = held_ids_[pick(static_cast<std::uint32_t>(held_ids_.size()))];
    fold(id, h_.span(id));
  }

  // Frees live_[pos]: locally if the span is held and the freer is its
  // holder (a coin toss), else through the remote-free bitmap.
  void free_at(std::size_t pos) {
    const object o = live_[pos];
    check_object(o);
    mspan& s = v_.span(o.span);
    if (held_owner_.count(o.span.value) != 0 && pick(2) == 0) {
      REQUIRE(span_free_local(s, o.index) == errc::ok);
      ++local_frees_;
    } else {
      REQUIRE(span_push_remote(v_, s, o.index) == errc::ok);
      ++remote_frees_;
    }
    bump(stats_->small_frees[o.size_class], std::uint64_t{1});
    --span_live_[o.span.value];
    --class_live_[o.size_class];
    where_.erase(o.handle);
    if (pos != live_.size() - 1) {
      live_[pos] = live_.back();
      where_[live_[pos].handle] = pos;
    }
    live_.pop_back();
  }

  void free_burst() {
    const std::uint32_t n = 1 + pick(48);
    for (std::uint32_t k = 0; k < n && !live_.empty(); ++k) free_at(pick(static_cast<std::uint32_t>(live_.size())));
  }

  // Frees every object of one span, so that spans really do empty out and
  // go back to mheap.
  void empty_a_span() {
    if (live_.empty()) return;
    const span_id id = live_[pick(static_cast<std::uint32_t>(live_.size()))].span;
    for (std::size_t pos = live_.size(); pos-- > 0;) {
      if (live_[pos].span.value == id.value) free_at(pos);
      if (pos > live_.size()) pos = live_.size();
    }
    REQUIRE(span_live_[id.value] == 0);
  }

  void uncache_at(std::size_t pos) {
    const span_id id = held_ids_[pos];
    const mspan& s = h_.span(id);
    const span_class spc{s.span_class};
    INFO("uncache span ", id.value, " after step ", steps_);
    const error e = h_.central(spc).uncache_span(id);
    REQUIRE_MESSAGE(e.code == errc::ok, e.message);
    held_owner_.erase(id.value);
    held_ids_[pos] = held_ids_.back();
    held_ids_.pop_back();
    if (span_live_[id.value] == 0) {
      REQUIRE(s.state.load() == mspan_state::dead);  // back to mheap
    } else {
      REQUIRE(s.state.load() == mspan_state::central);
      REQUIRE(!remote_pending(s));
      REQUIRE(s.alloc_count == span_live_[id.value] + reserved_slots(s.span_class));
    }
  }

  void uncache_one() {
    if (held_ids_.empty()) return;
    uncache_at(pick(static_cast<std::uint32_t>(held_ids_.size())));
  }

  void sweep_some() {
    const span_class spc = random_class();
    const std::uint32_t budget = pick(2) == 0 ? mcentral::sweep_budget : 1 + pick(8);
    h_.central(spc).sweep(budget);
  }

  void alloc_large() {
    if (large_.size() >= max_large) return free_large();
    const std::uint64_t bytes = max_small_size + 1 + pick(3u << 20);
    auto id = h_.alloc_large(bytes, pick(2) == 0, 1 + pick(4));
    REQUIRE_MESSAGE(id, id.err().message);
    ++larges_;
    const mspan& s = h_.span(*id);
    REQUIRE(s.state.load() == mspan_state::large);
    REQUIRE(s.npages == (bytes + page_size - 1) / page_size);
    std::byte* p = v_.span_base(s);
    const handle_t hd = v_.handle_of(p);
    const large_object o{*id, hd, bytes, pattern_of(hd, ++serial_)};
    store64(p, o.pattern);
    store64(p + bytes - 8, ~o.pattern);
    large_.push_back(o);
  }

  void free_large_at(std::size_t pos) {
    const large_object o = large_[pos];
    check_large(o);
    h_.free_span(o.span);
    REQUIRE(v_.span(o.span).state.load() == mspan_state::dead);
    large_[pos] = large_.back();
    large_.pop_back();
  }

  void free_large() {
    if (large_.empty()) return;
    free_large_at(pick(static_cast<std::uint32_t>(large_.size())));
  }

  void scavenge_some() {
    test::advance_fake_clock(pick(2'000'000'000u));
    const std::uint64_t delay = pick(3) == 0 ? 0 : pick(1'000'000'000u);
    const std::uint64_t max_bytes = pick(2) == 0 ? ~std::uint64_t{0} : std::uint64_t{1 + pick(64)} * page_size;
    const heap_accounts& a = h_.accounts();
    const auto chunks = static_cast<std::uint32_t>(a.pages_committed.load() / chunk_pages);
    std::vector<std::uint32_t> released_before(chunks);
    for (std::uint32_t c = 0; c < chunks; ++c) released_before[c] = h_.chunk(c).released_pages;
    h_.scavenge(delay, max_bytes);
    REQUIRE(a.pages_released.load() + a.pages_in_use.load() <= a.pages_committed.load());
    // Chunks with a page freed less than delay ago keep their pages.
    for (std::uint32_t c = 0; c < chunks; ++c) {
      if (h_.now() - h_.chunk(c).last_free_ns < delay)
        REQUIRE_MESSAGE(h_.chunk(c).released_pages == released_before[c], "chunk ", c, " was not idle for ", delay,
                        " ns but was scavenged");
    }
    // With no delay and no limit, every free page goes back to the OS.
    if (delay == 0 && max_bytes == ~std::uint64_t{0})
      REQUIRE(a.pages_released.load() + a.pages_in_use.load() == a.pages_committed.load());
  }

  test_heap& t_;
  mheap& h_;
  const heap_view& v_;
  std::mt19937 rng_;
  stats_block* stats_ = nullptr;

  std::vector<object> live_;
  std::unordered_map<handle_t, std::size_t> where_;  // handle -> index in live_
  std::vector<std::uint32_t> span_live_;              // span id -> live objects of ours
  std::array<std::int64_t, num_size_classes> class_live_{};
  std::unordered_map<std::uint32_t, std::uint32_t> held_owner_;  // span id -> client holding it
  std::vector<span_id> held_ids_;
  std::vector<large_object> large_;
  bool draining_ = false;

  std::uint64_t serial_ = 0, steps_ = 0, checks_ = 0, allocs_ = 0, local_frees_ = 0, remote_frees_ = 0;
  std::uint64_t caches_ = 0, larges_ = 0, folds_ = 0, peak_pages_ = 0, drained_steps_ = 0;
};

// ===========================================================================
// 2. Remote frees pushed concurrently by several processes or threads.
// ===========================================================================

// The parent publishes every live object in a board (a large object), with
// the worker that must free it, or keep.
constexpr std::uint32_t keep = ~std::uint32_t{0};
constexpr std::uint32_t max_workers = 4;

struct share_entry {
  handle_t handle;
  std::uint64_t pattern;
  std::uint32_t freer;  // worker index, or keep
  std::uint32_t size_class;
};

struct share_board {
  std::uint32_t ready;  // workers at the start line (std::atomic_ref)
  std::uint32_t workers;
  std::uint32_t slots[max_workers];  // each worker's stats slot
  std::uint64_t count;
  std::uint64_t pushing_ns[max_workers][2];  // each worker's first and last push (CLOCK_MONOTONIC)
};
constexpr std::size_t board_header_bytes = 128;
static_assert(sizeof(share_board) <= board_header_bytes);
constexpr std::uint64_t board_capacity = 1 << 16;
constexpr std::uint64_t board_bytes = board_header_bytes + board_capacity * sizeof(share_entry);

share_entry* entries_of(share_board* b) {
  return reinterpret_cast<share_entry*>(reinterpret_cast<std::byte*>(b) + board_header_bytes);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// One worker: waits until every worker is ready, then pushes its share of
// the objects in their spans' remote-free bitmaps, counting each free in its
// own stats slot at push time. Returns 0, or a code saying what was wrong.
// Runs in a child process or a thread: no doctest here.
int free_share(const heap_view& v, stats_block& stats, share_board& b, std::uint32_t me) {
  // Check and look up every object of our share first (which also faults
  // the pages in), so that the pushes themselves run back to back.
  struct target {
    mspan* span;
    std::uint32_t index;
    std::uint32_t size_class;
  };
  std::vector<target> mine;
  const share_entry* e = entries_of(&b);
  for (std::uint64_t j = 0; j < b.count; ++j) {
    if (e[j].freer != me) continue;
    object_ref ref;
    if (v.object_at(e[j].handle, &ref) != errc::ok) return 21;
    mspan& s = v.span(ref.span);
    const mspan_state st = s.state.load(std::memory_order_relaxed);
    if (st != mspan_state::cached && st != mspan_state::central) return 22;
    if (span_class{s.span_class}.size_class() != e[j].size_class) return 23;
    if (!is_allocated(s, ref.index)) return 24;
    const auto* p = static_cast<const std::byte*>(v.pointer(e[j].handle));
    if (!pattern_ok(p, s.elem_size, e[j].pattern)) return 25;
    // Touch the bytes the push will write: a child maps the heap afresh.
    (void)*static_cast<const volatile std::byte*>(p);
    mine.push_back({&s, ref.index, e[j].size_class});
  }

  std::atomic_ref<std::uint32_t> ready(b.ready);
  ready.fetch_add(1, std::memory_order_acq_rel);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  // Spin (yielding now and then, for a worker still waiting for a CPU), so
  // that the workers leave the start line together.
  for (std::uint32_t spins = 1; ready.load(std::memory_order_acquire) < b.workers; ++spins) {
    cpu_relax();
    if (spins % 4096 != 0) continue;
    if (std::chrono::steady_clock::now() > deadline) return 20;
    std::this_thread::yield();
  }
  b.pushing_ns[me][0] = mheap::monotonic_ns();
  for (const target& t : mine) {
    if (span_push_remote(v, *t.span, t.index) != errc::ok) return 21;
    bump(stats.small_frees[t.size_class], std::uint64_t{1});
  }
  b.pushing_ns[me][1] = mheap::monotonic_ns();
  return 0;
}

int child_main(const std::string& name, handle_t board_handle, std::uint32_t me) {
  auto att = segment::attach(name);
  if (!att) return 10;
  segment& seg = *att.value();
  mheap child(seg);
  auto* b = static_cast<share_board*>(seg.pointer(board_handle));
  return free_share(child.view(), child.cache_slot(b->slots[me]).stats, *b, me);
}

enum class workers_are { processes, threads };

// Rounds of: cache spans of a few classes and fill them; give half of them
// back (the daemon holds those, full); publish every live object with a
// freer; let the workers push their shares concurrently; fold (the holder
// for the spans still cached, mcentral's sweep for the others) and check
// that exactly the freed objects are free and the kept ones are intact.
void remote_free_rounds(workers_are kind, std::uint32_t nworkers, std::uint32_t seed) {
  REQUIRE(nworkers <= max_workers);
  test_heap t(256ULL << 20, kind == workers_are::processes ? "stress-procs" : "stress-threads");
  mheap& h = *t.heap;
  const heap_view& v = h.view();
  std::mt19937 rng(seed);
  auto pick = [&rng](std::uint32_t n) { return std::uniform_int_distribution<std::uint32_t>(0, n - 1)(rng); };

  auto own_slot = h.assign_cache(mheap::daemon_client);
  REQUIRE(own_slot);
  stats_block& stats = h.cache_slot(*own_slot).stats;

  auto board_span = h.alloc_large(board_bytes, true, 1);
  REQUIRE(board_span);
  auto* board = static_cast<share_board*>(static_cast<void*>(v.span_base(h.span(*board_span))));
  const handle_t board_handle = v.handle_of(board);
  board->workers = nworkers;
  for (std::uint32_t w = 0; w < nworkers; ++w) {
    auto slot = h.assign_cache(100 + w);
    REQUIRE(slot);
    board->slots[w] = *slot;
  }

  struct object {
    handle_t handle;
    span_id span;
    std::uint32_t index;
    std::uint8_t size_class;
    std::uint64_t pattern;
  };
  std::vector<object> live;
  std::uint64_t serial = 0, pushes = 0, pushing_ns = 0;
  int overlapped_rounds = 0;
  static constexpr std::uint8_t classes[] = {1, 2, 3, 5, 8, 13, 20, 33, 41, 48};
  constexpr int rounds = 16;
  constexpr int spans_per_class = 8;

  for (int round = 0; round < rounds; ++round) {
    INFO("round ", round);
    // 1. Cache spans and fill them. cache_span hands out partial spans left
    // from earlier rounds first (holding kept objects), then fresh ones.
    std::vector<span_id> held;
    for (std::uint8_t c : classes) {
      for (int k = 0; k < spans_per_class; ++k) {
        const span_class spc = span_class::make(c, k % 2 == 0);
        auto id = h.central(spc).cache_span(1);
        REQUIRE_MESSAGE(id, id.err().message);
        REQUIRE(std::find(held.begin(), held.end(), *id) == held.end());
        mspan& s = h.span(*id);
        const std::uint32_t free_slots = s.nelems - count_allocated(s);
        std::uint32_t got = 0;
        for (std::int32_t i; (i = span_alloc_object(s)) >= 0;) {
          REQUIRE_MESSAGE(++got <= free_slots, "span ", id->value, " hands out more objects than it has free slots");
          std::byte* p = object_ptr(v, s, static_cast<std::uint32_t>(i));
          const object o{v.handle_of(p), *id, static_cast<std::uint32_t>(i), c, pattern_of(v.handle_of(p), ++serial)};
          write_pattern(p, s.elem_size, o.pattern);
          bump(stats.small_allocs[c], std::uint64_t{1});
          live.push_back(o);
        }
        REQUIRE(got == free_slots);
        held.push_back(*id);
      }
    }
    // 2. Give about half of them back: full, on their mcentral's full list.
    std::vector<span_id> still_held;
    for (std::size_t k = 0; k < held.size(); ++k) {
      if (pick(2) == 0) {
        still_held.push_back(held[k]);
        continue;
      }
      const error e = h.central(span_class{h.span(held[k]).span_class}).uncache_span(held[k]);
      REQUIRE_MESSAGE(e.code == errc::ok, e.message);
      REQUIRE(h.span(held[k]).state.load() == mspan_state::central);
    }
    REQUIRE(live.size() <= board_capacity);

    // 3. Publish: every live object, with a freer or keep.
    std::atomic_ref<std::uint32_t>(board->ready).store(0);
    board->count = live.size();
    share_entry* e = entries_of(board);
    std::unordered_map<std::uint32_t, std::uint32_t> freed_in;  // span id -> objects to be freed
    std::unordered_set<std::uint32_t> touched;                  // spans of all published objects
    for (std::size_t j = 0; j < live.size(); ++j) {
      const std::uint32_t r = pick(nworkers + 1);
      e[j] = {live[j].handle, live[j].pattern, r == nworkers ? keep : r, live[j].size_class};
      touched.insert(live[j].span.value);
      if (r != nworkers) ++freed_in[live[j].span.value];
    }
    std::vector<std::uint64_t> frees_before(nworkers);
    for (std::uint32_t w = 0; w < nworkers; ++w) {
      const stats_block& ws = h.cache_slot(board->slots[w]).stats;
      for (std::size_t c = 0; c < num_size_classes; ++c) frees_before[w] += ws.small_frees[c].load();
    }

    // 4. The workers push concurrently.
    std::vector<int> codes(nworkers, -1);
    if (kind == workers_are::processes) {
      std::fflush(nullptr);
      std::vector<pid_t> pids;
      for (std::uint32_t w = 0; w < nworkers; ++w) {
        const pid_t pid = fork();
        if (pid == 0) {
          int code = 99;
          try {
            code = child_main(t.name, board_handle, w);
          } catch (...) {
            code = 98;
          }
          _exit(code);
        }
        pids.push_back(pid);
      }
      for (std::uint32_t w = 0; w < nworkers; ++w) {
        if (pids[w] < 0) continue;
        int status = 0;
        while (waitpid(pids[w], &status, 0) < 0 && errno == EINTR) {
        }
        codes[w] = WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
      }
    } else {
      std::vector<std::thread> threads;
      for (std::uint32_t w = 0; w < nworkers; ++w)
        threads.emplace_back([&, w] { codes[w] = free_share(v, h.cache_slot(board->slots[w]).stats, *board, w); });
      for (auto& th : threads) th.join();
    }
    for (std::uint32_t w = 0; w < nworkers; ++w) REQUIRE_MESSAGE(codes[w] == 0, "worker ", w, " exit code ", codes[w]);
    {
      // Did the workers really push at the same time? (Reported, not
      // required: it depends on the scheduler.)
      bool overlap = false;
      for (std::uint32_t w = 0; w < nworkers; ++w)
        for (std::uint32_t u = w + 1; u < nworkers; ++u)
          overlap |= std::max(board->pushing_ns[w][0], board->pushing_ns[u][0]) <
                     std::min(board->pushing_ns[w][1], board->pushing_ns[u][1]);
      overlapped_rounds += overlap ? 1 : 0;
      for (std::uint32_t w = 0; w < nworkers; ++w) pushing_ns += board->pushing_ns[w][1] - board->pushing_ns[w][0];
    }

    // Every free was counted by its worker, and the checker agrees with the
    // counts while the frees are still pending.
    std::uint64_t to_free = 0;
    for (const auto& [span, n] : freed_in) to_free += n;
    pushes += to_free;
    std::uint64_t counted = 0;
    for (std::uint32_t w = 0; w < nworkers; ++w) {
      const stats_block& ws = h.cache_slot(board->slots[w]).stats;
      for (std::size_t c = 0; c < num_size_classes; ++c) counted += ws.small_frees[c].load();
      counted -= frees_before[w];
    }
    REQUIRE(counted == to_free);
    std::uint64_t pending = 0;
    for (std::uint32_t id : touched) pending += count_remote_pending(v, h.span(span_id{id}));
    REQUIRE(pending == to_free);
    {
      const verify_report r = verify_counts(h);
      REQUIRE_MESSAGE(r.ok(), r.summary());
    }

    // 5. Fold: the holder for the spans still cached, the sweep for the rest.
    for (span_id id : still_held) {
      errc status{};
      std::string why;
      const std::uint32_t folded = span_fold_remote(v, h.span(id), &status, &why);
      REQUIRE_MESSAGE(status == errc::ok, why);
      CHECK(folded == freed_in[id.value]);
    }
    for (std::uint32_t c = 2; c < num_span_classes; ++c)
      h.central(span_class{static_cast<std::uint8_t>(c)}).sweep(~std::uint32_t{0});

    // 6. Exactly the freed objects are free: each touched span's bitmap is
    // the set of kept objects, and the kept objects are intact.
    std::vector<object> kept;
    std::unordered_map<std::uint32_t, std::array<std::uint64_t, bitmap_words>> want;
    for (std::size_t j = 0; j < live.size(); ++j) {
      if (e[j].freer != keep) continue;
      const object& o = live[j];
      kept.push_back(o);
      want[o.span.value][o.index / 64] |= std::uint64_t{1} << (o.index % 64);
    }
    for (std::uint32_t id : touched) {
      const mspan& s = h.span(span_id{id});
      const mspan_state st = s.state.load();
      const bool cached = std::find(still_held.begin(), still_held.end(), span_id{id}) != still_held.end();
      INFO("span ", id, " state ", int(st), " cached ", cached);
      CHECK(!remote_pending(s));
      const auto w = want.find(id);
      if (w == want.end()) {
        // Nothing kept: a cached span is empty, a central one went back to mheap.
        if (cached) {
          CHECK(st == mspan_state::cached);
          CHECK(count_allocated(s) == reserved_slots(s.span_class));
        } else {
          CHECK(st == mspan_state::dead);
        }
        continue;
      }
      CHECK(st == (cached ? mspan_state::cached : mspan_state::central));
      std::uint64_t expect[bitmap_words];
      for (std::uint32_t k = 0; k < bitmap_words; ++k) expect[k] = w->second[k];
      for (std::uint32_t i = 0; i < reserved_slots(s.span_class); ++i) expect[i / 64] |= std::uint64_t{1} << (i % 64);
      for (std::uint32_t k = 0; k < bitmap_words; ++k) CHECK(s.alloc_bits[k].load() == expect[k]);
      std::uint32_t n = 0;
      for (std::uint64_t x : expect) n += static_cast<std::uint32_t>(std::popcount(x));
      CHECK(s.alloc_count == n);
    }
    for (const object& o : kept) {
      INFO("object handle ", o.handle);
      object_ref ref;
      REQUIRE(v.object_at(o.handle, &ref) == errc::ok);
      CHECK(ref.span.value == o.span.value);
      CHECK(ref.index == o.index);
      CHECK(pattern_ok(static_cast<const std::byte*>(v.pointer(o.handle)), class_to_size(o.size_class), o.pattern));
    }
    live = std::move(kept);

    // 7. Give the cached spans back; the heap is consistent.
    for (span_id id : still_held) {
      const error err = h.central(span_class{h.span(id).span_class}).uncache_span(id);
      REQUIRE_MESSAGE(err.code == errc::ok, err.message);
    }
    const verify_report r = verify_counts(h);
    REQUIRE_MESSAGE(r.ok(), r.summary());
  }

  // Free what was kept (remotely: the daemon holds every span now), sweep,
  // and the heap is empty but for the board.
  for (const object& o : live) {
    REQUIRE(span_push_remote(v, h.span(o.span), o.index) == errc::ok);
    bump(stats.small_frees[o.size_class], std::uint64_t{1});
  }
  for (std::uint32_t c = 2; c < num_span_classes; ++c)
    h.central(span_class{static_cast<std::uint8_t>(c)}).sweep(~std::uint32_t{0});
  h.free_span(*board_span);
  CHECK(h.accounts().pages_in_use.load() == 0);
  CHECK(h.state().span_pool.in_use == 0);
  const verify_report r = verify_counts(h);
  REQUIRE_MESSAGE(r.ok(), r.summary());
  MESSAGE(nworkers, " workers pushed ", pushes, " remote frees in ", rounds, " rounds (", pushing_ns / 1000,
          " us of pushing in all); two or more pushing at once in ", overlapped_rounds, " rounds");
}

}  // namespace

TEST_SUITE("stress") {
  TEST_CASE("random span and object traffic keeps every invariant") {
    test_heap t(256ULL << 20, "stress-traffic");
    traffic run(t, seed_or(0x5eed0001));
    constexpr int steps = 150000;
    constexpr int check_every = 500;
    for (int k = 1; k <= steps; ++k) {
      run.step();
      if (k % check_every == 0) run.check_all();
    }
    run.check_all();
    run.drain();
    MESSAGE(run.summary());
  }

  TEST_CASE("remote frees from several processes fold correctly") {
    remote_free_rounds(workers_are::processes, 3, seed_or(0x5eed0002));
  }

  TEST_CASE("remote frees from several threads fold correctly") {
    remote_free_rounds(workers_are::threads, 2, seed_or(0x5eed0003));
  }
}
