// Cross-client protection through the control protocol, process against
// process: a client that speaks raw frames cannot release another client's
// spans, free its small objects or the inside of its large ones, close its
// cache slots, claim its spans by reattach, or name one of its free slots
// as a root. Each attempt gets an error, and the victim (this process,
// through libshmalloc) keeps its spans and objects intact and keeps working.
// (By design, and not tested as a refusal: any process may free any whole
// object, large ones through free_large too; roots are global names; the
// reports, stats and clients, are open to every peer the socket admits.)
// tests/unit/service/request_handler_test.cpp checks one release of
// another's span in process.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstring>
#include <set>
#include <thread>
#include <vector>

#include "security/security_support.hpp"
#include "shm/mspan.hpp"
#include "shm/segment.hpp"
#include "shmalloc/shmalloc.h"
#include "support/daemon_process.hpp"

using namespace shmalloc;
using namespace shmalloc::test;
using proto::msg;

namespace {

// A victim's object: its bytes all equal its number's low byte.
struct object {
  unsigned char* p;
  std::size_t n;
  unsigned char tag;
  bool intact() const { return std::all_of(p, p + n, [this](unsigned char b) { return b == tag; }); }
};

object make_object(std::size_t n, unsigned char tag) {
  auto* p = static_cast<unsigned char*>(shmalloc_alloc(n));
  REQUIRE(p != nullptr);
  std::memset(p, tag, n);
  return {p, n, tag};
}

// What the attacker knows of the victim: read from the heap, which any
// process that may map it can.
struct victim_view {
  std::uint32_t client_id = 0;
  std::vector<std::uint32_t> spans;  // small spans it holds
  std::uint32_t large_span = 0;
  std::uint64_t large_handle = 0;
  std::uint64_t small_handle = 0;  // a live object
  std::uint64_t freed_handle = 0;  // a slot it freed
};

// In the attacker's child: every request must be refused; returns how many
// were not (each named on stderr).
int attack(const std::string& socket, const victim_view& v) {
  raw_client c(socket);
  if (!c.hello("attacker")) return 100;
  int wrong = 0;
  auto expect = [&](const char* what, msg type, const std::vector<std::uint8_t>& body, errc want) {
    auto f = c.call(type, body);
    const errc got = f ? f->status() : errc::unavailable;
    if (got != want) {
      std::fprintf(stderr, "%s: %s, not %s\n", what, to_string(got), to_string(want));
      ++wrong;
    }
  };
  auto release = [](std::vector<std::uint32_t> ids) { return proto::encode(proto::span_list_msg{std::move(ids)}); };
  auto free_large = [](std::uint64_t h) { return proto::encode(proto::free_large_msg{h}); };
  for (std::uint32_t id : v.spans) expect("release of the victim's span", msg::release, release({id}), errc::bad_handle);
  // One of its own with one of the victim's: refused whole, its own kept.
  auto own = c.call(msg::refill, proto::encode(proto::refill_msg{span_class::make(5, false).value, 1}));
  const auto own_ids = own ? proto::decode_span_list(proto::split_reply(own->payload)->body, proto::max_refill) : std::nullopt;
  if (!own_ids || own_ids->span_ids.size() != 1) return 101;
  const std::uint32_t mine = own_ids->span_ids[0];
  if (std::count(v.spans.begin(), v.spans.end(), mine) != 0) ++wrong;  // handed a span the victim holds
  expect("release of its own and the victim's", msg::release, release({mine, v.spans[0]}), errc::bad_handle);
  expect("release of its own after that", msg::release, release({mine}), errc::ok);
  expect("free_large of the victim's small object", msg::free_large, free_large(v.small_handle), errc::bad_handle);
  expect("free_large inside the victim's large object", msg::free_large, free_large(v.large_handle + 8), errc::bad_handle);
  expect("free_large of a handle in the heap's metadata", msg::free_large, free_large(64), errc::bad_handle);
  std::vector<std::uint32_t> all = v.spans;
  all.push_back(v.large_span);
  expect("reattach of the live victim's spans", msg::reattach,
         proto::encode(proto::reattach_msg{v.client_id, 0, all}), errc::not_found);
  for (std::uint32_t slot = 0; slot < 64; ++slot)
    expect("cache_close of a slot not its own", msg::cache_close, proto::encode(proto::slot_msg{slot}), errc::bad_handle);
  expect("publish of a slot the victim freed", msg::publish,
         proto::encode_publish(proto::root_msg{"stolen", v.freed_handle}), errc::bad_handle);
  c.call(msg::bye);
  return wrong;
}

}  // namespace

TEST_SUITE("security: cross-client protection") {
  TEST_CASE("raw requests of another client cannot release, free, close or claim what a client holds") {
    daemon_process d({"--keep-heap"});
    REQUIRE(d.started());
    REQUIRE(shmalloc_attach(d.socket.c_str()) == 0);
    std::vector<object> objects;
    for (int i = 0; i < 400; ++i) objects.push_back(make_object(i % 2 ? 48 : 1000, static_cast<unsigned char>(i)));
    const object large = make_object(100000, 0xab);
    auto* freed = static_cast<unsigned char*>(shmalloc_alloc(48));
    REQUIRE(freed != nullptr);
    shmalloc_free(freed);  // a free slot in a span this thread holds

    auto seg = segment::attach(d.heap);
    REQUIRE(seg);
    const heap_view hv = heap_view::of(*seg.value());
    victim_view v;
    std::set<std::uint32_t> spans;
    for (const object& o : objects) spans.insert(hv.span_at(shmalloc_handle(o.p)).value);
    v.spans.assign(spans.begin(), spans.end());
    v.client_id = hv.span(span_id{v.spans[0]}).owner_client;
    REQUIRE(v.client_id != 0);
    v.large_handle = shmalloc_handle(large.p);
    v.large_span = hv.span_at(v.large_handle).value;
    v.small_handle = shmalloc_handle(objects[1].p);
    v.freed_handle = shmalloc_handle(freed);

    const std::string sock = d.socket;
    const child_end end = run_child([&] { return attack(sock, v); });
    CHECK_MESSAGE(end.exit_code == 0, end.err);

    // The victim's spans are still its own, its objects whole.
    for (std::uint32_t id : v.spans) {
      CHECK(hv.span(span_id{id}).owner_client == v.client_id);
      CHECK(hv.span(span_id{id}).state.load() == mspan_state::cached);
    }
    CHECK(hv.span(span_id{v.large_span}).state.load() == mspan_state::large);
    for (const object& o : objects) CHECK(o.intact());
    CHECK(large.intact());
    // It goes on working: a new thread (a new cache slot), frees, more objects.
    std::thread([] {
      void* p = shmalloc_alloc(200);
      CHECK(p != nullptr);
      shmalloc_free(p);
    }).join();
    for (const object& o : objects) shmalloc_free(o.p);
    shmalloc_free(large.p);
    const object again = make_object(48, 7);
    CHECK(again.intact());
    shmalloc_free(again.p);
    seg.value().reset();
    shmalloc_detach();
    check_heap_after(d);
  }
}
