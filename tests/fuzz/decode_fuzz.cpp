// Fuzz target: the control protocol's decoders alone, the replies' too
// (what a client or shmallocctl reads from a daemon: welcome, spans, tables),
// which frame_fuzz only feeds the daemon's own well-formed output. The first
// byte of an input picks a decoder, the rest is its payload. Whatever a
// decoder accepts must encode to a payload that decodes again and encodes
// to the same bytes; headers round-trip exactly; split_reply's parts cover
// the payload; the container-id scanners return a short id found in the
// text, or nothing.
//
// With clang and -DSHMALLOC_FUZZ=ON this is a libFuzzer target
// (tools/fuzz.sh); otherwise replay.cpp drives it (ctest: decode_fuzz_replay).
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "fuzz/replay.hpp"
#include "proto/control_protocol.hpp"

using namespace shmalloc;
using bytes = std::vector<std::uint8_t>;
using payload = std::span<const std::uint8_t>;

namespace {

[[noreturn]] void fail(const std::string& why) {
  std::fprintf(stderr, "decode_fuzz: %s\n", why.c_str());
  std::abort();
}

// decode -> encode -> decode -> encode: the two encodings must be equal.
template <class Decode, class Encode>
void round_trip(const char* what, payload p, Decode decode, Encode encode) {
  const auto m = decode(p);
  if (!m) return;
  const bytes once = encode(*m);
  const auto again = decode(once);
  if (!again) fail(std::string(what) + ": an accepted message encodes to one its decoder refuses");
  if (encode(*again) != once) fail(std::string(what) + ": encoding is not stable across a round trip");
  if (once.size() > p.size()) fail(std::string(what) + ": the encoding is longer than what was decoded");
}

template <class T>
bytes enc(const T& m) {
  return proto::encode(m);
}

void check_container_id(const char* what, const std::string& id, std::string_view text) {
  if (id.empty()) return;
  if (id.size() != 12 || id.find_first_not_of("0123456789abcdef") != std::string::npos ||
      text.find(id) == std::string_view::npos)
    fail(std::string(what) + " returned '" + id + "', not a short id from the text");
}

using target = std::function<void(payload)>;

const std::vector<target>& targets() {
  using namespace proto;
  static const std::vector<target> all{
      [](payload p) { round_trip("hello", p, decode_hello, enc<hello_msg>); },
      [](payload p) { round_trip("welcome", p, decode_welcome, enc<welcome_msg>); },
      [](payload p) { round_trip("refill", p, decode_refill, enc<refill_msg>); },
      [](payload p) {
        round_trip("spans", p, [](payload q) { return decode_span_list(q, max_refill); }, enc<span_list_msg>);
        round_trip("release", p, [](payload q) { return decode_span_list(q, max_release); }, enc<span_list_msg>);
      },
      [](payload p) { round_trip("reattach", p, decode_reattach, enc<reattach_msg>); },
      [](payload p) { round_trip("alloc_large", p, decode_alloc_large, enc<alloc_large_msg>); },
      [](payload p) { round_trip("large", p, decode_large, enc<large_msg>); },
      [](payload p) { round_trip("free_large", p, decode_free_large, enc<free_large_msg>); },
      [](payload p) { round_trip("slot", p, decode_slot, enc<slot_msg>); },
      [](payload p) { round_trip("publish", p, decode_publish, encode_publish); },
      [](payload p) { round_trip("name", p, decode_name, encode_name); },
      [](payload p) { round_trip("root", p, decode_root, encode_root); },
      [](payload p) { round_trip("stats", p, decode_stats, enc<stats_msg>); },
      [](payload p) { round_trip("class_table", p, decode_class_table, enc<class_table_msg>); },
      [](payload p) { round_trip("clients", p, decode_clients_request, encode_clients_request); },
      [](payload p) {
        for (client_rows f : {client_rows::basic, client_rows::identity})
          round_trip("client_table", p, [f](payload q) { return decode_client_table(q, f); }, enc<client_table_msg>);
      },
      [](payload p) { round_trip("page_table", p, decode_page_table, enc<page_table_msg>); },
      [](payload p) { round_trip("cache_table", p, decode_cache_table, enc<cache_table_msg>); },
      [](payload p) {  // a reply's message text and body
        const auto parts = split_reply(p);
        if (parts && (2 + parts->message.size() + parts->body.size() != p.size() || parts->message.size() > 1024))
          fail("split_reply's parts do not make up the payload");
      },
      [](payload p) {  // a header, then frame checks
        if (p.size() < header_bytes) return;
        const frame_header h = decode_header(p.data());
        std::uint8_t out[header_bytes];
        encode_header(h, out);
        if (!std::equal(out, out + header_bytes, p.begin())) fail("a header does not round-trip");
        if (check_header(h).empty() != (h.version == protocol_version && h.length <= max_payload))
          fail("check_header accepts what it should refuse, or the reverse");
      },
      [](payload p) {  // what hello's identity fields are made from
        const std::string_view text(reinterpret_cast<const char*>(p.data()), p.size());
        check_container_id("container_from_cgroup", container_from_cgroup(text), text);
        check_container_id("container_from_mountinfo", container_from_mountinfo(text), text);
        for (std::size_t max : {max_host, max_container})
          if (!valid_identity(identity_text(text, max), max)) fail("identity_text made an invalid identity");
      },
      // Later messages go last, so that the seeds' first bytes keep picking the same decoder.
      [](payload p) { round_trip("advise_table", p, decode_advise_table, enc<advise_table_msg>); },
      [](payload p) { round_trip("leaks", p, decode_leaks_request, encode_leaks_request); },
      [](payload p) { round_trip("leak_table", p, decode_leak_table, enc<leak_table_msg>); },
      [](payload p) { round_trip("leak_sites", p, decode_leak_sites_request, encode_leak_sites_request); },
      [](payload p) { round_trip("site_table", p, decode_site_table, enc<site_table_msg>); },
  };
  return all;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const auto& all = targets();
  all[data[0] % all.size()](payload(data + 1, size - 1));
  return 0;
}

namespace shmalloc::fuzz {

// One well-formed payload for each decoder, built with the encoders, the
// first byte naming the decoder (the index in targets()).
std::vector<std::pair<std::string, input>> fuzz_seeds() {
  using namespace proto;
  auto seed = [](std::uint8_t which, const bytes& body) {
    input in(1 + body.size(), which);
    std::copy(body.begin(), body.end(), in.begin() + 1);
    return in;
  };
  class_table_msg classes;
  classes.rows = {{1, 8, 1, 2, 3, 40, 8192, 100, 50, 10}, {67, 32768, 0, 1, 0, 1, 32768, 0, 1, 0}};
  client_table_msg clients;
  clients.total = 3;
  clients.rows = {{1, 4242, "worker", 65536, 12, 2, 1, 1700000000000000000ULL, 7, "host-1", "3f2a9c1b0d4e"},
                  {5, 0, "other-ns", 8192, 0, 1, 0, 1700000000000000001ULL, 1, "h", ""}};
  client_table_msg identity = clients;
  identity.format = client_rows::identity;
  page_table_msg pages;
  pages.page_size = 8192;
  pages.pages_capacity = 8192;
  pages.pages_committed = 1024;
  pages.pages_in_use = 512;
  pages.pages_free = 256;
  pages.pages_released = 256;
  pages.largest_free_run_pages = 300;
  pages.spans_in_use = 20;
  pages.large_spans = 2;
  cache_table_msg caches;
  caches.total = 2;
  caches.rows.resize(2);
  caches.rows[0].name = "demo";
  caches.rows[0].hits = 10;
  caches.rows[1].name = "sessions";
  stats_msg stats;
  stats.heap_sys_bytes = 1 << 26;
  stats.clients = 2;
  welcome_msg welcome{3, 7, 0x1234, 3, 8192, 0xfeedULL, 4ULL << 30, "shmalloc"};
  frame_header header{12, static_cast<std::uint16_t>(msg::refill), protocol_version, 9, 0};
  input header_bytes_(proto::header_bytes);
  encode_header(header, header_bytes_.data());
  return {
      {"hello", seed(0, encode(hello_msg{3, 100, "fuzz"}))},
      {"hello-identity", seed(0, encode(hello_msg{3, 100, "fuzz", "host-1", "3f2a9c1b0d4e"}))},
      {"welcome", seed(1, encode(welcome))},
      {"refill", seed(2, encode(refill_msg{20, 3}))},
      {"span-list", seed(3, encode(span_list_msg{{5, 6, 7}}))},
      {"reattach", seed(4, encode(reattach_msg{2, 7, {5, 9}}))},
      {"alloc-large", seed(5, encode(alloc_large_msg{70000, true}))},
      {"large", seed(6, encode(large_msg{12, 1ULL << 26}))},
      {"free-large", seed(7, encode(free_large_msg{1ULL << 26}))},
      {"slot", seed(8, encode(slot_msg{4}))},
      {"publish", seed(9, encode_publish({"cache:demo", 1ULL << 26}))},
      {"name", seed(10, encode_name("greeting"))},
      {"root", seed(11, encode_root(1ULL << 26))},
      {"stats", seed(12, encode(stats))},
      {"class-table", seed(13, encode(classes))},
      {"clients-request", seed(14, encode_clients_request(client_rows::identity))},
      {"client-table", seed(15, encode(clients))},
      {"client-table-identity", seed(15, encode(identity))},
      {"page-table", seed(16, encode(pages))},
      {"cache-table", seed(17, encode(caches))},
      {"reply", seed(18, make_reply(msg::spans, 9, errc::ok, "", encode(span_list_msg{{5}})))},
      {"reply-error", seed(18, make_reply(msg::ok, 9, errc::protocol_error, "malformed refill"))},
      {"header", seed(19, header_bytes_)},
      {"cgroup-v1", seed(20, bytes_of("12:memory:/docker/" + std::string(64, 'a') + "\n0::/\n"))},
      {"cgroup-v2-systemd", seed(20, bytes_of("0::/system.slice/docker-" + std::string(64, 'b') + ".scope\n"))},
      {"mountinfo",
       seed(20, bytes_of("600 590 8:1 /var/lib/docker/containers/" + std::string(64, 'c') +
                         "/hostname /etc/hostname rw,relatime - ext4 /dev/sda1 rw\n"))},
      {"advise-table", seed(21, encode(advise_table_msg{1 << 20, {advise_row{5, 48, 100, 8192, {1, 2, 3, 4, 5, 6, 7, 8}, 36 * 40}}}))},
      {"leaks-request", seed(22, encode_leaks_request(5))},
      {"leak-table", seed(23, encode(leak_table_msg{1'000'000'000, 1, {leak_row{3, 77, "fuzz", 8192, 4800, 1200, 1'000'000'000, 0, 0, {{5, 100}}}}}))},
      {"leak-sites", seed(24, encode_leak_sites_request(2'000'000'000))},
      {"site-table", seed(25, encode(site_table_msg{2048, 3, {site_row{3, 77, 2, 200, 16'000, 90'000'000'000, 1'000, {8'000, 8'000, 0}, {0x401234, 0x7f0000001000}, {0x1234, 0x1000}}}}))},
  };
}

}  // namespace shmalloc::fuzz
