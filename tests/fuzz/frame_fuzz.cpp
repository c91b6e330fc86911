// Fuzz target: one input is a stream of frames fed to the frame decoder and
// the request handler of a live heap, exactly as sessions would feed them,
// from two clients: a frame whose request_id is even comes from client A,
// odd from client B (so one client can name the other's spans, objects and
// roots). After every input:
//   - every reply was one well-formed frame that the client side's own
//     decoder accepts (its header, its message text, its body for the type),
//     echoing the request id; only bye and a bad header close;
//   - both clients are disconnected, and what the input left in the heap
//     (large objects the daemon took over, named roots) is freed through
//     the protocol, so inputs do not pile up in the heap;
//   - the heap checker passes, no client or orphan is left and no root or
//     large object remains.
// A frame of type 0xffff is the harness's own: the daemon restarts on the
// kept heap (it leaves its clients, as shmallocd --keep-heap stopping; a
// new mheap and handler check and adopt the heap, and the spans, large
// objects and cache slots of the old clients become orphans); the clients
// may say hello again and try to reattach (what a successful reattach
// needs is not given to them). What is still orphaned after the input is
// reclaimed as when the grace period ends.
// One liberty with the bytes: a hello saying layout version 0 is given this
// build's layout version, so that the corpus survives a layout bump.
//
// With clang and -DSHMALLOC_FUZZ=ON this is a libFuzzer target
// (tools/fuzz.sh); otherwise replay.cpp drives it (ctest: frame_fuzz_replay).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "fuzz/replay.hpp"
#include "service/request_handler.hpp"
#include "shm/segment.hpp"
#include "shm/verify.hpp"

using namespace shmalloc;
using proto::msg;

namespace {

[[noreturn]] void fail(const std::string& why) {
  std::fprintf(stderr, "frame_fuzz: %s\n", why.c_str());
  std::abort();
}

struct fuzz_heap {
  std::string name = "shmalloc-test-fuzz-" + std::to_string(getpid());
  std::unique_ptr<segment> seg;
  std::unique_ptr<mheap> heap;
  std::unique_ptr<service::request_handler> handler;

  fuzz_heap() {
    segment::remove(name);
    heap_options o;
    o.name = name;
    o.capacity = 128ULL << 20;
    auto made = segment::create(o);
    if (!made) fail(made.err().message);
    seg = std::move(made.value());
    heap = std::make_unique<mheap>(*seg);
    handler = std::make_unique<service::request_handler>(*heap, service::handler_settings{16ULL << 20, 8});
    // Nothing attaches by name: unlinked at once, the object goes with the
    // process however it ends (libFuzzer's _Exit after a finding runs no
    // destructor), and nothing is ever left in /dev/shm.
    segment::remove(name);
  }
};

fuzz_heap& the_heap() {
  static fuzz_heap h;
  return h;
}

// What an input made that outlives its clients, to be freed after it.
struct leftovers {
  std::set<std::uint64_t> large;  // handles of large objects
  std::set<std::string> roots;    // published names
};

// The reply must be one frame the client side decodes: checks it and notes
// what the request made.
void check_reply(const proto::frame_header& req, std::span<const std::uint8_t> req_payload,
                 const service::reply& r, leftovers& left) {
  if (r.frame.size() < proto::header_bytes) fail("a reply shorter than a header");
  const proto::frame_header h = proto::decode_header(r.frame.data());
  if (h.length != r.frame.size() - proto::header_bytes || !proto::check_header(h).empty())
    fail("a reply's header does not fit its frame");
  if (h.request_id != req.request_id) fail("a reply does not echo the request id");
  const auto parts = proto::split_reply(std::span<const std::uint8_t>(r.frame).subspan(proto::header_bytes));
  if (!parts) fail("a reply's message text is malformed");
  const auto type = static_cast<msg>(req.type);
  const bool bad_header = !proto::check_header(req).empty();
  if (r.close != (bad_header || (type == msg::bye && h.status == 0))) fail("a reply closes when it should not, or the reverse");
  if (h.status != static_cast<std::uint32_t>(errc::ok)) {
    if (parts->message.empty() || !parts->body.empty()) fail("an error reply without a message, or with a body");
    return;
  }
  if (!parts->message.empty()) fail("a reply with status ok carries a message");
  const auto body = parts->body;
  bool good = false;
  switch (static_cast<msg>(h.type)) {
    case msg::welcome: good = type == msg::hello && proto::decode_welcome(body).has_value(); break;
    case msg::spans:
      good = (type == msg::refill && proto::decode_span_list(body, proto::max_refill)) ||
             (type == msg::reattach && proto::decode_span_list(body, proto::max_release, 0));
      break;
    case msg::large:
      if (auto m = proto::decode_large(body); m && type == msg::alloc_large) {
        left.large.insert(m->handle);
        good = true;
      }
      break;
    case msg::stats_reply: good = type == msg::stats && proto::decode_stats(body); break;
    case msg::class_table: good = type == msg::classes && proto::decode_class_table(body); break;
    case msg::client_table:
      if (auto format = proto::decode_clients_request(req_payload); format && type == msg::clients)
        good = proto::decode_client_table(body, *format).has_value();
      break;
    case msg::page_table: good = type == msg::pages && proto::decode_page_table(body); break;
    case msg::cache_table: good = type == msg::caches && proto::decode_cache_table(body); break;
    case msg::advise_table: good = type == msg::advise && proto::decode_advise_table(body); break;
    case msg::leak_table: good = type == msg::leaks && proto::decode_leak_table(body); break;
    case msg::site_table: good = type == msg::leak_sites && proto::decode_site_table(body); break;
    case msg::root: good = type == msg::lookup && proto::decode_root(body); break;
    case msg::cache_slot: good = type == msg::cache_open && proto::decode_slot(body); break;
    case msg::ok:
      good = body.empty();
      if (type == msg::publish) left.roots.insert(proto::decode_publish(req_payload)->name);
      break;
    default: break;
  }
  if (!good) fail("reply type " + std::to_string(h.type) + " to request type " + std::to_string(req.type) +
                  " is not what the client side decodes");
}

// A request from the harness itself, which must succeed or find nothing.
void janitor_request(service::client_state& c, msg type, const std::vector<std::uint8_t>& body) {
  fuzz_heap& f = the_heap();
  const auto frame = proto::make_request(type, 0, body);
  const auto r = f.handler->handle(c, proto::decode_header(frame.data()),
                                   std::span<const std::uint8_t>(frame).subspan(proto::header_bytes));
  const auto status = static_cast<errc>(proto::decode_header(r.frame.data()).status);
  if (status != errc::ok && status != errc::not_found && status != errc::bad_handle)
    fail("the janitor's request " + std::to_string(static_cast<int>(type)) + " failed");
}

constexpr std::uint16_t restart_type = 0xffff;

void check_heap(const char* when) {
  const verify_report r = verify_heap(*the_heap().heap);
  if (!r.ok()) fail(std::string("heap check failed ") + when + ": " + r.summary());
}

// The daemon stops keeping the heap, and a new one adopts it.
void restart(service::client_state (&clients)[2]) {
  fuzz_heap& f = the_heap();
  for (service::client_state& c : clients) f.handler->leave(c);
  check_heap("when the daemon left its clients");
  f.handler.reset();
  f.heap = std::make_unique<mheap>(*f.seg);
  check_heap("when a new daemon adopted the heap");
  f.handler = std::make_unique<service::request_handler>(*f.heap, service::handler_settings{16ULL << 20, 8});
  f.handler->adopt_orphans();
}

// Frees what the input left: large objects the daemon took over from its
// clients and the roots they published; then checks the heap is clean.
void clean_up(const leftovers& left) {
  fuzz_heap& f = the_heap();
  f.handler->expire_orphans(0);
  if (f.handler->orphan_groups() != 0) fail("orphans are left after their grace period");
  service::client_state janitor;
  janitor_request(janitor, msg::hello, proto::encode(proto::hello_msg{layout_version, 1, "janitor"}));
  for (std::uint64_t handle : left.large) janitor_request(janitor, msg::free_large, proto::encode(proto::free_large_msg{handle}));
  for (const std::string& name : left.roots) janitor_request(janitor, msg::unpublish, proto::encode_name(name));
  f.handler->disconnect(janitor);
  check_heap("after the input");
  const proto::stats_msg s = f.handler->stats();
  if (s.clients != 0 || f.handler->clients() != 0) fail("a client is left after every one disconnected");
  if (s.large_objects != 0) fail(std::to_string(s.large_objects) + " large objects are left after the clean-up");
  const auto* roots = f.seg->at<root_entry>(f.seg->regions().roots.offset);
  for (std::uint32_t i = 0; i < max_roots; ++i)
    if (roots[i].handle != 0) fail(std::string("root '") + roots[i].name + "' is left after the clean-up");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz_heap& f = the_heap();
  service::client_state clients[2];
  leftovers left;
  std::vector<std::uint8_t> payload;
  std::size_t at = 0;
  while (size - at >= proto::header_bytes) {
    const proto::frame_header h = proto::decode_header(data + at);
    at += proto::header_bytes;
    const std::size_t n = std::min<std::size_t>(h.length, size - at);
    payload.assign(data + at, data + at + n);
    at += n;
    if (h.type == restart_type) {
      restart(clients);
      continue;
    }
    std::uint32_t layout = 0;  // little-endian hosts only, as the heap itself
    if (h.type == static_cast<std::uint16_t>(msg::hello) && n >= 4 && (std::memcpy(&layout, payload.data(), 4), layout == 0)) {
      layout = layout_version;
      std::memcpy(payload.data(), &layout, 4);
    }
    service::client_state& c = clients[h.request_id & 1];
    const service::reply r = f.handler->handle(c, h, payload);
    check_reply(h, payload, r, left);
    if (r.close) break;
  }
  for (auto& c : clients) f.handler->disconnect(c);
  clean_up(left);
  return 0;
}

namespace shmalloc::fuzz {

// Every request type, well formed, from A (even ids) and B (odd ids); the
// streams a client sends (hello, then work); and what an old daemon or a
// broken peer sends. Layout version 0 in a hello stands for this build's.
std::vector<std::pair<std::string, input>> fuzz_seeds() {
  using proto::make_request;
  const auto hello_a = make_request(msg::hello, 2, proto::encode(proto::hello_msg{0, 100, "fuzz-a"}));
  const auto hello_b = make_request(msg::hello, 1, proto::encode(proto::hello_msg{0, 101, "fuzz-b", "host-1", "3f2a9c1b0d4e"}));
  const std::vector<std::pair<std::string, input>> frames{
      {"refill", make_request(msg::refill, 4, proto::encode(proto::refill_msg{20, 3}))},
      {"refill-max", make_request(msg::refill, 6, proto::encode(proto::refill_msg{135, proto::max_refill}))},
      {"release", make_request(msg::release, 8, proto::encode(proto::span_list_msg{{0, 1, 2}}))},
      {"alloc-large", make_request(msg::alloc_large, 10, proto::encode(proto::alloc_large_msg{70000, false}))},
      {"alloc-large-noscan", make_request(msg::alloc_large, 12, proto::encode(proto::alloc_large_msg{1 << 20, true}))},
      {"free-large", make_request(msg::free_large, 14, proto::encode(proto::free_large_msg{1 << 26}))},
      {"reattach", make_request(msg::reattach, 16, proto::encode(proto::reattach_msg{1, 7, {0, 1}}))},
      {"stats", make_request(msg::stats, 18)},
      {"classes", make_request(msg::classes, 20)},
      {"clients", make_request(msg::clients, 22)},
      {"clients-identity", make_request(msg::clients, 24, proto::encode_clients_request(proto::client_rows::identity))},
      {"pages", make_request(msg::pages, 26)},
      {"caches", make_request(msg::caches, 28)},
      {"advise", make_request(msg::advise, 46)},
      {"leaks", make_request(msg::leaks, 48)},
      {"leaks-window", make_request(msg::leaks, 50, proto::encode_leaks_request(5))},
      {"leak-sites", make_request(msg::leak_sites, 52, proto::encode_leak_sites_request(0))},
      {"cache-open", make_request(msg::cache_open, 30)},
      {"cache-close", make_request(msg::cache_close, 32, proto::encode(proto::slot_msg{1}))},
      // A root under the caches' prefix naming a large object (not a cache
      // header): the cache census must skip it, not trust it.
      {"publish", make_request(msg::publish, 34, proto::encode_publish({"cache:fuzz", 1 << 26}))},
      {"lookup", make_request(msg::lookup, 36, proto::encode_name("cache:fuzz"))},
      {"unpublish", make_request(msg::unpublish, 38, proto::encode_name("cache:fuzz"))},
      {"bye", make_request(msg::bye, 40)},
  };
  auto cat = [](std::initializer_list<input> parts) {
    input out;
    for (const input& p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
  };
  std::vector<std::pair<std::string, input>> seeds;
  // Each request alone after A's hello.
  for (const auto& [name, frame] : frames) seeds.emplace_back("a-" + name, cat({hello_a, frame}));
  // Read-only reports need no hello; anything else does.
  seeds.emplace_back("no-hello-stats", frames[7].second);
  seeds.emplace_back("no-hello-refill", frames[0].second);
  // Two clients: A allocates, B frees, publishes and looks up A's objects.
  auto from_b = [](input frame) {
    frame[8] |= 1;  // request_id odd
    return frame;
  };
  seeds.emplace_back("ab-large", cat({hello_a, hello_b, frames[3].second, from_b(frames[5].second),
                                      from_b(frames[15].second), frames[16].second, from_b(frames[10].second)}));
  seeds.emplace_back("ab-spans", cat({hello_a, hello_b, frames[0].second, from_b(frames[2].second),
                                      frames[2].second, frames[13].second, from_b(frames[14].second)}));
  seeds.emplace_back("a-session", cat({hello_a, frames[0].second, frames[3].second, frames[13].second,
                                       frames[15].second, frames[16].second, frames[17].second, frames[2].second,
                                       frames[9].second, frames[18].second}));
  // A second hello, a hello from the wrong layout, an old client's hello.
  seeds.emplace_back("hello-twice", cat({hello_a, hello_a}));
  seeds.emplace_back("hello-old-layout", make_request(msg::hello, 2, proto::encode(proto::hello_msg{1, 100, "old"})));
  // Bad framing: another protocol version, an oversized length, a cut frame.
  input v2 = cat({hello_a, frames[7].second});
  v2[proto::header_bytes + 6] = 2;
  seeds.emplace_back("bad-version", v2);
  proto::frame_header big{proto::max_payload + 1, static_cast<std::uint16_t>(msg::stats), 1, 2, 0};
  input oversized(proto::header_bytes);
  proto::encode_header(big, oversized.data());
  seeds.emplace_back("bad-length", cat({hello_a, oversized}));
  input cut = cat({hello_a, frames[3].second});
  cut.resize(cut.size() - 3);
  seeds.emplace_back("cut-frame", cut);
  seeds.emplace_back("unknown-type", cat({hello_a, make_request(static_cast<msg>(99), 2)}));
  // A daemon restart: A and B hold spans, a large object and a thread's
  // cache slot; A comes back and tries to reattach, B does not.
  const input restart = make_request(static_cast<msg>(restart_type), 0);
  seeds.emplace_back("restart-reattach", cat({hello_a, hello_b, frames[0].second, frames[3].second, frames[13].second,
                                              from_b(frames[0].second), restart, hello_a, frames[6].second,
                                              frames[2].second, frames[9].second}));
  seeds.emplace_back("restart-idle", cat({hello_a, restart, frames[7].second, hello_a, frames[6].second}));
  return seeds;
}

}  // namespace shmalloc::fuzz
