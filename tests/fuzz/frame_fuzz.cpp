// Fuzz target: one input is a stream of frames fed to the frame decoder and
// the request handler of a live heap, exactly as a session would feed them.
// The heap checker must pass after every input.
//
// With clang and -DSHMALLOC_FUZZ=ON this builds as a libFuzzer target
// (build/tests/frame_fuzz, run it for as long as you like). Otherwise it
// builds with a small driver that replays seeded random inputs, so CI keeps
// the target compiling and exercised (ctest: frame_fuzz_replay).
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "service/request_handler.hpp"
#include "shm/segment.hpp"
#include "shm/verify.hpp"

using namespace shmalloc;

namespace {
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
    if (!made) {
      std::fprintf(stderr, "frame_fuzz: %s\n", made.err().message.c_str());
      std::abort();
    }
    seg = std::move(made.value());
    heap = std::make_unique<mheap>(*seg);
    handler = std::make_unique<service::request_handler>(*heap, service::handler_settings{16ULL << 20});
  }
  ~fuzz_heap() { segment::remove(name); }
};

fuzz_heap& the_heap() {
  static fuzz_heap h;
  return h;
}

void check_heap() {
  const verify_report r = verify_heap(*the_heap().heap);
  if (!r.ok()) {
    std::fprintf(stderr, "frame_fuzz: heap check failed: %s\n", r.summary().c_str());
    std::abort();
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  fuzz_heap& f = the_heap();
  service::client_state client;
  std::size_t at = 0;
  while (size - at >= proto::header_bytes) {
    const proto::frame_header h = proto::decode_header(data + at);
    at += proto::header_bytes;
    const std::size_t n = std::min<std::size_t>(h.length, size - at);
    const service::reply r = f.handler->handle(client, h, std::span<const std::uint8_t>(data + at, n));
    at += n;
    if (r.frame.size() < proto::header_bytes) std::abort();  // every request gets a reply
    if (r.close) break;
  }
  f.handler->disconnect(client);
  check_heap();
  return 0;
}

#ifndef SHMALLOC_LIBFUZZER
// Replays seeded inputs built from well-formed frames, mutated.
int main(int argc, char** argv) {
  const int inputs = argc > 1 ? std::atoi(argv[1]) : 20000;
  std::mt19937_64 rng(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 42);
  const std::vector<std::vector<std::uint8_t>> seeds{
      proto::make_request(proto::msg::hello, 1, proto::encode(proto::hello_msg{layout_version, 1, "fuzz"})),
      proto::make_request(proto::msg::refill, 2, proto::encode(proto::refill_msg{20, 3})),
      proto::make_request(proto::msg::release, 3, proto::encode(proto::span_list_msg{{0, 1, 2}})),
      proto::make_request(proto::msg::alloc_large, 4, proto::encode(proto::alloc_large_msg{70000, false})),
      proto::make_request(proto::msg::free_large, 5, proto::encode(proto::free_large_msg{1 << 26})),
      proto::make_request(proto::msg::reattach, 6, proto::encode(proto::reattach_msg{1, {0, 1}})),
      proto::make_request(proto::msg::stats, 7),
      // A root under the caches' prefix naming the large object above (not
      // a cache header): the cache census must skip it, not trust it.
      proto::make_request(proto::msg::publish, 8, proto::encode_publish({"cache:fuzz", 1 << 26})),
      proto::make_request(proto::msg::caches, 9),
      // hello saying where the client runs (refused after the first), and
      // the client table with those fields.
      proto::make_request(proto::msg::hello, 10, proto::encode(proto::hello_msg{layout_version, 1, "fuzz", "host-1",
                                                                                "3f2a9c1b0d4e"})),
      proto::make_request(proto::msg::clients, 11, proto::encode_clients_request(proto::client_rows::identity))};
  for (int i = 0; i < inputs; ++i) {
    // Most inputs start well: hello first, one in four saying where it runs.
    constexpr std::size_t hello = 0, hello_with_host = 9;
    std::vector<std::uint8_t> input = seeds[rng() % 4 == 0 ? hello_with_host : hello];
    const int frames = 1 + static_cast<int>(rng() % 8);
    for (int k = 0; k < frames; ++k) {
      std::vector<std::uint8_t> f = seeds[rng() % seeds.size()];
      if (rng() % 2) f[rng() % f.size()] ^= static_cast<std::uint8_t>(1 + rng() % 255);
      if (rng() % 4 == 0) f.resize(rng() % (f.size() + 8), static_cast<std::uint8_t>(rng()));
      input.insert(input.end(), f.begin(), f.end());
    }
    if (rng() % 8 == 0) input.erase(input.begin(), input.begin() + static_cast<std::ptrdiff_t>(rng() % input.size()));
    LLVMFuzzerTestOneInput(input.data(), input.size());
  }
  std::printf("frame_fuzz: %d inputs replayed, the heap checked after each\n", inputs);
  return 0;
}
#endif
