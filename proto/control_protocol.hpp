// control_protocol.hpp: the frames shmallocd and its clients exchange over
// the Unix-domain control socket (docs/protocol.md is the prose version).
//
// Every frame is a 16-byte header and a payload of at most max_payload
// bytes, all integers little-endian:
//
//   u32 length      payload bytes after the header
//   u16 type        msg
//   u16 version     protocol_version of the sender
//   u32 request_id  chosen by the client, echoed in the reply
//   u32 status      replies: an errc; requests: 0
//
// A reply's payload starts with u16 n + n bytes of message text (empty on
// success), then the reply's body. Decoders check every length and range and
// that the payload is consumed exactly: every byte from a peer is untrusted.
// proto/ sits above the heap (shm/) and uses only its header-only facts
// (size classes, layout constants) and its error codes, so shmallocctl
// links it without the heap; it does not depend on Asio.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "shm/errc.hpp"
#include "proto/identity.hpp"
#include "proto/wire.hpp"

namespace shmalloc::proto {

inline constexpr std::uint16_t protocol_version = 2;  // 2: welcome's reattach_token, reattach shows it
inline constexpr std::uint32_t header_bytes = 16;
inline constexpr std::uint32_t max_payload = 64 * 1024;
inline constexpr std::size_t max_name = 64;          // process and root names
inline constexpr std::size_t max_host = 64;          // a hostname (Linux's HOST_NAME_MAX)
inline constexpr std::size_t max_container = 64;     // a container id: docker's 64 hex digits at most
inline constexpr std::size_t max_root_name = 63;     // layout.hpp's root_name_bytes, less the NUL
inline constexpr std::size_t max_heap_name = 255;    // a shm_open name
inline constexpr std::size_t max_class_rows = 67;    // size classes 1..67 (size_classes.hpp)
inline constexpr std::uint16_t max_refill = 64;       // spans per refill
inline constexpr std::uint16_t max_release = 1024;    // spans per release

// The message table: every message once, by number. From it come the msg
// enum, each message's name (the metrics' op label), who may send it and what
// answers it; request_handler dispatches request `name` to on_name. A new
// message is one line here, its handler, and its body's encode and decode.
// Bodies (docs/protocol.md has the rows' layouts):
//   hello        u32 layout_version, u32 pid, str name [, str host, str container]
//   welcome      u32 client_id, u32 cache_slot, u64 instance_id, u32 layout_version, u32 page_size,
//                u64 size_class_checksum, u64 capacity, str heap_name, u64 reattach_token
//   refill       u8 span_class, u16 count
//   spans        u16 count, count x u32 span_id
//   release      u16 count, count x u32 span_id
//   alloc_large  u64 bytes, u8 noscan
//   large        u32 span_id, u64 handle
//   free_large   u64 handle
//   stats_reply  u16 count, count x u64 (SHMALLOC_PROTO_STATS order)
//   shutdown     unsolicited: the daemon is stopping
//   reattach     u32 old_client_id, u64 token, u16 count, count x u32 span_id; reply: the spans taken
//   cache_open   (empty): a cache slot for one more thread
//   cache_slot   u32 slot
//   cache_close  u32 slot: the thread is gone; its counters are retired
//   publish      str name, u64 handle
//   lookup, unpublish  str name
//   root         u64 handle
//   class_table  u16 count (<= 67), count x class_row, by class
//   clients      (empty) or u8 client_rows
//   client_table u32 total, u16 count (<= total), count x client_row (in the format asked), by id: as many
//                as fit one frame
//   page_table   u16 count, count x u64 (SHMALLOC_PROTO_PAGES order)
//   cache_table  u32 total, u16 count (<= total), count x cache_row, by name: as many as fit one frame
//   advise_table u64 heap_inuse_bytes, u16 count (<= 67), count x advise_row, by class
//   leaks        (empty) or u32 window_s
//   leak_table   u64 window_ns, u32 total, u16 count (<= total), count x leak_row: top growers first, as
//                many as fit one frame
//   leak_sites   u64 older_than_ns
//   site_table   u32 capacity, u32 live, u16 count (<= max_site_rows), count x site_row: the most
//                estimated bytes first
// The rest have empty bodies.
//
// Requests, X(name, number, reply, sender): sender says who may send it
// (the sender enum below).
#define SHMALLOC_PROTO_REQUESTS(X)               \
  X(hello, 1, welcome, greeting)                 \
  X(refill, 3, spans, client)                    \
  X(release, 5, ok, client)                      \
  X(alloc_large, 6, large, client)               \
  X(free_large, 8, ok, client)                   \
  X(stats, 9, stats_reply, observer)             \
  X(bye, 11, ok, client)                         \
  X(reattach, 14, spans, client)                 \
  X(cache_open, 15, cache_slot, client)          \
  X(cache_close, 17, ok, client)                 \
  X(publish, 18, ok, client)                     \
  X(lookup, 19, root, client)                    \
  X(unpublish, 21, ok, client)                   \
  X(classes, 22, class_table, observer)          \
  X(clients, 24, client_table, observer)         \
  X(pages, 26, page_table, observer)             \
  X(caches, 28, cache_table, observer)           \
  X(advise, 30, advise_table, observer)          \
  X(leaks, 32, leak_table, observer)             \
  X(leak_sites, 34, site_table, observer)
// The daemon's replies and notices, X(name, number).
#define SHMALLOC_PROTO_REPLIES(X)                                                              \
  X(welcome, 2) X(spans, 4) X(large, 7) X(stats_reply, 10) X(ok, 12) X(shutdown, 13)          \
  X(cache_slot, 16) X(root, 20) X(class_table, 23) X(client_table, 25) X(page_table, 27)      \
  X(cache_table, 29) X(advise_table, 31) X(leak_table, 33) X(site_table, 35)

// Who may send a message.
enum class sender : std::uint8_t {
  daemon,    // a reply or notice: never a request
  greeting,  // hello: the first request of a client
  client,    // a client's, after its hello
  observer,  // a read-only report: anyone, before hello too (shmallocctl need not register)
};

enum class msg : std::uint16_t {
#define SHMALLOC_X(name, number, ...) name = number,
  SHMALLOC_PROTO_REQUESTS(SHMALLOC_X) SHMALLOC_PROTO_REPLIES(SHMALLOC_X)
#undef SHMALLOC_X
};

// The highest message number: per-message arrays have max_msg + 1 rows.
inline constexpr std::uint16_t max_msg = std::max({
#define SHMALLOC_X(name, number, ...) std::uint16_t{number},
    SHMALLOC_PROTO_REQUESTS(SHMALLOC_X) SHMALLOC_PROTO_REPLIES(SHMALLOC_X)
#undef SHMALLOC_X
});

// Who may send type: daemon for replies and for numbers no message has.
constexpr sender sender_of(std::uint16_t type) noexcept {
  switch (static_cast<msg>(type)) {
#define SHMALLOC_X(name, number, reply, who) \
  case msg::name: return sender::who;
    SHMALLOC_PROTO_REQUESTS(SHMALLOC_X)
#undef SHMALLOC_X
    default: return sender::daemon;
  }
}
constexpr bool is_request(std::uint16_t type) noexcept { return sender_of(type) != sender::daemon; }
// Reports that change nothing, so observers need not say hello first.
constexpr bool read_only(std::uint16_t type) noexcept { return sender_of(type) == sender::observer; }

// The message that answers a request (ok for anything else).
constexpr msg reply_of(msg type) noexcept {
  switch (type) {
#define SHMALLOC_X(name, number, reply, who) \
  case msg::name: return msg::reply;
    SHMALLOC_PROTO_REQUESTS(SHMALLOC_X)
#undef SHMALLOC_X
    default: return msg::ok;
  }
}

// A message's name as the table spells it; empty for a number no message has.
constexpr std::string_view msg_name(std::uint16_t type) noexcept {
  switch (static_cast<msg>(type)) {
#define SHMALLOC_X(name, ...) \
  case msg::name: return #name;
    SHMALLOC_PROTO_REQUESTS(SHMALLOC_X) SHMALLOC_PROTO_REPLIES(SHMALLOC_X)
#undef SHMALLOC_X
  }
  return {};
}

struct frame_header {
  std::uint32_t length = 0;
  std::uint16_t type = 0;
  std::uint16_t version = protocol_version;
  std::uint32_t request_id = 0;
  std::uint32_t status = 0;
};

void encode_header(const frame_header& h, std::uint8_t out[header_bytes]) noexcept;
frame_header decode_header(const std::uint8_t in[header_bytes]) noexcept;
// Why a header cannot be accepted (bad length or version), or empty.
std::string check_header(const frame_header& h);

// --- Messages ---------------------------------------------------------------

// hello's host and container are optional and go together: a hello that
// ends after the name (a client from before them) is still well formed, and
// encode leaves them out when both are empty. Each is at most its max_ and
// every byte printable ASCII with no space (valid_identity); empty is fine.
struct hello_msg {
  hello_msg() = default;
  hello_msg(std::uint32_t layout, std::uint32_t pid_, std::string name_, std::string host_ = {},
            std::string container_ = {})
      : layout_version(layout), pid(pid_), name(std::move(name_)), host(std::move(host_)),
        container(std::move(container_)) {}
  std::uint32_t layout_version = 0;
  std::uint32_t pid = 0;  // in the client's own PID namespace (the daemon reads its own view from the socket)
  std::string name;
  std::string host;       // the client's hostname (that of its UTS namespace)
  std::string container;  // its container's id, short (12 hex digits, as docker ps shows it), or empty
};
template <>
struct wire<hello_msg> {  // then host and container, optional (encode, decode_hello)
  static constexpr std::tuple fields{field{"layout_version", &hello_msg::layout_version},
                                     field{"pid", &hello_msg::pid}, field{"name", &hello_msg::name, max_name}};
};
struct welcome_msg {
  std::uint32_t client_id = 0;
  std::uint32_t cache_slot = 0;
  std::uint64_t instance_id = 0;
  std::uint32_t layout_version = 0;
  std::uint32_t page_size = 0;
  std::uint64_t size_class_checksum = 0;
  std::uint64_t capacity = 0;
  std::string heap_name;
  // A secret only this connection learns: after a daemon restart, reattach
  // must show it to take over this client's spans and cache slots.
  std::uint64_t reattach_token = 0;
};
template <>
struct wire<welcome_msg> {
  static constexpr std::tuple fields{
      field{"client_id", &welcome_msg::client_id},
      field{"cache_slot", &welcome_msg::cache_slot},
      field{"instance_id", &welcome_msg::instance_id},
      field{"layout_version", &welcome_msg::layout_version},
      field{"page_size", &welcome_msg::page_size},
      field{"size_class_checksum", &welcome_msg::size_class_checksum},
      field{"capacity", &welcome_msg::capacity},
      field{"heap_name", &welcome_msg::heap_name, max_heap_name},
      field{"reattach_token", &welcome_msg::reattach_token}};
};
struct refill_msg {
  std::uint8_t span_class = 0;
  std::uint16_t count = 0;
};
template <>
struct wire<refill_msg> {
  static constexpr std::tuple fields{field{"span_class", &refill_msg::span_class}, field{"count", &refill_msg::count}};
};
struct span_list_msg {  // spans (reply) and release (request)
  std::vector<std::uint32_t> span_ids;
};
struct reattach_msg {  // after a daemon restart: "these spans were mine as old_client_id"
  std::uint32_t old_client_id = 0;
  std::uint64_t token = 0;               // the old welcome's reattach_token
  std::vector<std::uint32_t> span_ids;  // may be empty: the cache slots alone
};
struct alloc_large_msg {
  std::uint64_t bytes = 0;
  bool noscan = false;
};
template <>
struct wire<alloc_large_msg> {
  static constexpr std::tuple fields{field{"bytes", &alloc_large_msg::bytes}, field{"noscan", &alloc_large_msg::noscan}};
};
struct large_msg {
  std::uint32_t span_id = 0;
  std::uint64_t handle = 0;
};
template <>
struct wire<large_msg> {
  static constexpr std::tuple fields{field{"span_id", &large_msg::span_id}, field{"handle", &large_msg::handle}};
};
struct slot_msg {  // cache_slot (reply) and cache_close (request)
  std::uint32_t slot = 0;
};
template <>
struct wire<slot_msg> {
  static constexpr std::tuple fields{field{"slot", &slot_msg::slot}};
};
struct root_msg {  // publish (name and handle), lookup and unpublish (name only), root (handle only)
  std::string name;
  std::uint64_t handle = 0;
};
template <>
struct wire<root_msg> {  // publish's body
  static constexpr std::tuple fields{field{"name", &root_msg::name, max_root_name}, field{"handle", &root_msg::handle}};
};
struct free_large_msg {
  std::uint64_t handle = 0;
};
template <>
struct wire<free_large_msg> {
  static constexpr std::tuple fields{field{"handle", &free_large_msg::handle}};
};

// The daemon's stats reply, in this order (shmallocctl stats prints them).
// Each counter is named once, by where the daemon takes it from: MEM a
// heap_memstats field, CENSUS a heap_census function (shm/memstats.hpp),
// DAEMON the daemon's own (request_handler::stats).
#define SHMALLOC_PROTO_STATS_BY_SOURCE(MEM, CENSUS, DAEMON)                      \
  MEM(heap_sys_bytes) MEM(heap_inuse_bytes) MEM(heap_idle_bytes)               \
  MEM(heap_released_bytes) CENSUS(heap_alloc_bytes) CENSUS(heap_unused_bytes)  \
  CENSUS(heap_objects) CENSUS(mallocs_total) CENSUS(frees_total)               \
  MEM(large_objects) MEM(large_bytes)                                          \
  MEM(mspan_inuse_bytes) MEM(mspan_sys_bytes) MEM(metadata_sys_bytes)          \
  DAEMON(clients) MEM(reclaimed_bytes_total) MEM(scavenged_bytes_total)        \
  MEM(grow_failures) MEM(capacity_bytes) DAEMON(control_requests_total)        \
  DAEMON(metrics_port)
#define SHMALLOC_PROTO_STATS(X) SHMALLOC_PROTO_STATS_BY_SOURCE(X, X, X)
struct stats_msg {
#define SHMALLOC_X(name) std::uint64_t name = 0;
  SHMALLOC_PROTO_STATS(SHMALLOC_X)
#undef SHMALLOC_X
};

// One size class in the class table: u8 size_class (1..67), u32 object_size
// (1..32768), u32 spans_partial, u32 spans_full, u32 spans_cached, then u64
// objects_live (<= mallocs), bytes_in_use, bytes_wasted (<= bytes_in_use),
// mallocs, frees. Scan and noscan spans of the class count together.
struct class_row {
  std::uint8_t size_class = 0;
  std::uint32_t object_size = 0;
  std::uint32_t spans_partial = 0;  // on mcentral, with free slots
  std::uint32_t spans_full = 0;     // on mcentral, without
  std::uint32_t spans_cached = 0;   // out in client caches
  std::uint64_t objects_live = 0;   // mallocs - frees
  std::uint64_t bytes_in_use = 0;   // the class's spans, whole (its part of heap_inuse_bytes)
  std::uint64_t bytes_wasted = 0;   // of those, bytes holding no live object
  std::uint64_t mallocs = 0;
  std::uint64_t frees = 0;
};
template <>
struct wire<class_row> {
  static constexpr std::tuple fields{
      field{"class", &class_row::size_class},        field{"object_size", &class_row::object_size},
      field{"spans_partial", &class_row::spans_partial}, field{"spans_full", &class_row::spans_full},
      field{"spans_cached", &class_row::spans_cached},  field{"objects_live", &class_row::objects_live},
      field{"bytes_in_use", &class_row::bytes_in_use},  field{"bytes_wasted", &class_row::bytes_wasted},
      field{"mallocs", &class_row::mallocs},            field{"frees", &class_row::frees}};
};
struct class_table_msg {
  std::vector<class_row> rows;  // strictly increasing size_class
};
template <>
struct wire<class_table_msg> {
  static constexpr std::tuple<> fields{};
};

// The rows a clients request asks for: its body is empty (basic) or one u8.
// Basic rows are those of the first protocol, which shmallocctl builds from
// before the identity still ask for; identity rows add what hello said of
// where the client runs.
enum class client_rows : std::uint8_t { basic = 0, identity = 1 };
std::vector<std::uint8_t> encode_clients_request(client_rows format);
std::optional<client_rows> decode_clients_request(std::span<const std::uint8_t> p);

// One connected client: u32 id (> 0, strictly increasing), u32 pid, str name
// (<= 64), u64 bytes_held, u64 objects_live, u32 spans, u32 large_objects,
// u64 connected_unix_ns; identity rows then add u32 pid_in_client, str host
// and str container (valid_identity, <= max_host and max_container).
struct client_row {
  std::uint32_t id = 0;
  std::uint32_t pid = 0;            // from the socket's peer credentials; 0 when the client's is not in
                                    // the daemon's PID namespace (another container)
  std::string name;                 // from hello
  std::uint64_t bytes_held = 0;     // its spans and large objects, whole pages
  std::uint64_t objects_live = 0;   // allocated in its spans (per alloc bits) plus its large objects
  std::uint32_t spans = 0;          // small spans it holds
  std::uint32_t large_objects = 0;  // large objects it allocated and holds
  std::uint64_t connected_unix_ns = 0;  // when it said hello, Unix time
  // Identity rows only: from hello.
  std::uint32_t pid_in_client = 0;  // its pid in its own PID namespace
  std::string host;
  std::string container;
};
template <>
struct wire<client_row> {
  static constexpr std::tuple fields{
      field{"id", &client_row::id},
      field{"pid", &client_row::pid},
      field{"name", &client_row::name, max_name},
      field{"bytes_held", &client_row::bytes_held},
      field{"objects_live", &client_row::objects_live},
      field{"spans", &client_row::spans},
      field{"large_objects", &client_row::large_objects},
      field{"connected_unix_ns", &client_row::connected_unix_ns}};
  // Added by identity rows.
  static constexpr std::tuple identity_fields{field{"pid_in_client", &client_row::pid_in_client},
                                              field{"host", &client_row::host, max_host},
                                              field{"container", &client_row::container, max_container}};
};
// Bytes of a row with empty strings, and what identity rows add to that.
inline constexpr std::size_t client_row_fixed_bytes = empty_fields_size<client_row>();
inline constexpr std::size_t client_row_identity_fixed_bytes = empty_list_size(wire<client_row>::identity_fields);
inline std::size_t encoded_size(const client_row& r, client_rows format = client_rows::basic) noexcept {
  return fields_size(r) + (format == client_rows::identity ? list_size(r, wire<client_row>::identity_fields) : 0);
}
// The most a reply body may take: the payload limit less an empty message text.
inline constexpr std::size_t max_reply_body = max_payload - 2;
struct client_table_msg {
  std::uint32_t total = 0;       // clients connected; rows may hold fewer
  std::vector<client_row> rows;
  client_rows format = client_rows::basic;  // not sent: the request chose it
};
template <>
struct wire<client_table_msg> {  // then rows, in the format asked
  static constexpr std::tuple fields{field{"total", &client_table_msg::total}};
};
inline constexpr std::size_t client_table_header_bytes = empty_fields_size<client_table_msg>() + 2;  // its fields, the u16 count

// The page map summarised (shm/memstats.hpp's page_census). A decoder checks
// pages_in_use + pages_free + pages_released == pages_committed <= pages_capacity.
#define SHMALLOC_PROTO_PAGES(X)                                         \
  X(page_size) X(pages_capacity) X(pages_committed) X(pages_in_use)     \
  X(pages_free) X(pages_released) X(runs_in_use) X(runs_free)           \
  X(runs_released) X(largest_free_run_pages) X(spans_in_use) X(large_spans)
struct page_table_msg {
#define SHMALLOC_X(name) std::uint64_t name = 0;
  SHMALLOC_PROTO_PAGES(SHMALLOC_X)
#undef SHMALLOC_X
};

// One shared cache (cache/census.hpp): str name (1..max_cache_name), then
// u64 counters in SHMALLOC_PROTO_CACHE order. Counters are summed from
// shards and reader slots that clients write while the daemon reads, so
// each is exact but they need not agree with one another: a decoder checks
// none against another.
#define SHMALLOC_PROTO_CACHE(X)                                   \
  X(max_bytes) X(items) X(bytes) X(retired_items) X(retired_bytes) \
  X(hits) X(misses) X(puts) X(erases) X(evictions) X(expirations) \
  X(repairs) X(readers)
// A root name holds 63 characters, "cache:" takes 6 (cache/layout.hpp's cache_max_name).
inline constexpr std::size_t max_cache_name = 57;
struct cache_row {
  std::string name;  // without the "cache:" prefix of its root
#define SHMALLOC_X(name) std::uint64_t name = 0;
  SHMALLOC_PROTO_CACHE(SHMALLOC_X)
#undef SHMALLOC_X
};
template <>
struct wire<cache_row> {
#define SHMALLOC_X(name) , field{#name, &cache_row::name}
  static constexpr std::tuple fields{field{"name", &cache_row::name, max_cache_name} SHMALLOC_PROTO_CACHE(SHMALLOC_X)};
#undef SHMALLOC_X
};
inline constexpr std::size_t cache_row_fixed_bytes = empty_fields_size<cache_row>();  // with an empty name
inline std::size_t encoded_size(const cache_row& r) noexcept { return fields_size(r); }
struct cache_table_msg {
  std::uint32_t total = 0;  // caches in the heap; rows may hold fewer
  std::vector<cache_row> rows;  // strictly increasing names
};
template <>
struct wire<cache_table_msg> {
  static constexpr std::tuple fields{field{"total", &cache_table_msg::total}};
};
inline constexpr std::size_t cache_table_header_bytes = empty_fields_size<cache_table_msg>() + 2;  // its fields, the u16 count

// One size class's sampled requested sizes (layout.hpp's request_stats,
// summed over every cache slot and the retired ones) and what it holds:
// u8 size_class, u32 object_size, u64 objects_live, u64 bytes_in_use,
// 8 x u32 buckets, u64 requested_bytes (the samples' sizes summed).
inline constexpr std::size_t advise_buckets = 8;  // layout.hpp's request_buckets
struct advise_row {
  std::uint8_t size_class = 0;
  std::uint32_t object_size = 0;
  std::uint64_t objects_live = 0;
  std::uint64_t bytes_in_use = 0;
  std::uint32_t buckets[advise_buckets] = {};
  std::uint64_t requested_bytes = 0;
  std::uint64_t samples() const noexcept {
    std::uint64_t n = 0;
    for (std::uint32_t b : buckets) n += b;
    return n;
  }
};
template <>
struct wire<advise_row> {
  static constexpr std::tuple fields{
      field{"class", &advise_row::size_class},         field{"object_size", &advise_row::object_size},
      field{"objects_live", &advise_row::objects_live}, field{"bytes_in_use", &advise_row::bytes_in_use},
      field{"buckets", &advise_row::buckets},           field{"requested_bytes", &advise_row::requested_bytes}};
};
struct advise_table_msg {
  std::uint64_t heap_inuse_bytes = 0;
  std::vector<advise_row> rows;  // strictly increasing size_class
};
template <>
struct wire<advise_table_msg> {
  static constexpr std::tuple fields{field{"heap_inuse_bytes", &advise_table_msg::heap_inuse_bytes}};
};

// A leaks request: the growth window in seconds (1..max_leak_window_s);
// an empty body asks for default_leak_window_s.
inline constexpr std::uint32_t default_leak_window_s = 60;
inline constexpr std::uint32_t max_leak_window_s = 600;
std::vector<std::uint8_t> encode_leaks_request(std::uint32_t window_s);
std::optional<std::uint32_t> decode_leaks_request(std::span<const std::uint8_t> p);

// One connected client's memory and its growth: u32 id (> 0), u32 pid,
// str name (<= 64), u64 bytes_held (its spans and large objects), u64
// live_bytes (objects its threads allocated and did not free, by their
// cache slots' counters, plus its large objects), u64 live_bytes_then (at
// the window's start, or at the oldest sample the daemon has when that is
// younger), u64 then_ago_ns (that sample's age), u32 large_objects, u64
// large_bytes (<= live_bytes), u8 count (< 68), count x (u8 size_class, u64
// objects): live objects by size class, classes strictly increasing.
struct leak_class {
  std::uint8_t size_class = 0;
  std::uint64_t objects = 0;
};
template <>
struct wire<leak_class> {
  static constexpr std::tuple fields{field{"class", &leak_class::size_class}, field{"objects", &leak_class::objects}};
};
struct leak_row {
  std::uint32_t id = 0;
  std::uint32_t pid = 0;
  std::string name;
  std::uint64_t bytes_held = 0;
  std::uint64_t live_bytes = 0;
  std::uint64_t live_bytes_then = 0;
  std::uint64_t then_ago_ns = 0;
  std::uint32_t large_objects = 0;
  std::uint64_t large_bytes = 0;
  std::vector<leak_class> classes;
  std::int64_t growth() const noexcept { return static_cast<std::int64_t>(live_bytes - live_bytes_then); }
};
template <>
struct wire<leak_row> {
  static constexpr std::tuple fields{
      field{"id", &leak_row::id},
      field{"pid", &leak_row::pid},
      field{"name", &leak_row::name, max_name},
      field{"bytes_held", &leak_row::bytes_held},
      field{"live_bytes", &leak_row::live_bytes},
      field{"live_bytes_then", &leak_row::live_bytes_then},
      field{"then_ago_ns", &leak_row::then_ago_ns},
      field{"large_objects", &leak_row::large_objects},
      field{"large_bytes", &leak_row::large_bytes},
      field{"classes", &leak_row::classes, max_class_rows}};
};
inline constexpr std::size_t leak_row_fixed_bytes = empty_fields_size<leak_row>();  // no name, no classes
inline std::size_t encoded_size(const leak_row& r) noexcept { return fields_size(r); }
struct leak_table_msg {
  std::uint64_t window_ns = 0;
  std::uint32_t total = 0;  // clients connected; rows may hold fewer
  std::vector<leak_row> rows;  // the biggest growth first
};
template <>
struct wire<leak_table_msg> {
  static constexpr std::tuple fields{field{"window_ns", &leak_table_msg::window_ns}, field{"total", &leak_table_msg::total}};
};
inline constexpr std::size_t leak_table_header_bytes = empty_fields_size<leak_table_msg>() + 2;  // its fields, the u16 count

// The live sampled allocations (SHMALLOC_PROFILE_RATE; shm/profile.hpp),
// grouped by client and call stack: u32 client (the span's holder; 0: none,
// a large object its ended client left live),
// u32 pid (0: unknown), u32 samples (> 0), u64 bytes (their requested
// sizes), u64 estimated_bytes (each sample scaled as Go's pprof does, by
// 1 / (1 - exp(-size / rate))), u64 oldest_ns and u64 newest_ns (ages,
// oldest >= newest), 3 x u64 aged_bytes (of estimated_bytes, those of
// objects live longer than site_age_bounds_s, each <= the one before), u8
// frames (<= 6), frames x (u64 pc, u64 vma).
inline constexpr std::size_t max_site_frames = 6;  // layout.hpp's profile_frames
inline constexpr std::size_t max_site_rows = 256;
inline constexpr std::uint64_t site_age_bounds_s[3] = {10, 60, 600};
struct site_row {
  std::uint32_t client = 0;
  std::uint32_t pid = 0;
  std::uint32_t samples = 0;
  std::uint64_t bytes = 0;
  std::uint64_t estimated_bytes = 0;
  std::uint64_t oldest_ns = 0;
  std::uint64_t newest_ns = 0;
  std::uint64_t aged_bytes[3] = {};
  std::vector<std::uint64_t> pc;   // innermost first
  std::vector<std::uint64_t> vma;  // as many as pc
};
// A site's frames: u8 count (<= max_site_frames), then (pc, vma) pairs.
struct site_frames {
  std::string_view name = "frames";
  void put(writer& w, const site_row& r) const;
  void get(reader& r, site_row& row) const;
  std::size_t size(const site_row& r) const noexcept { return empty_size + 16 * r.pc.size(); }
  static constexpr std::size_t empty_size = 1;
};
template <>
struct wire<site_row> {
  static constexpr std::tuple fields{
      field{"client", &site_row::client},       field{"pid", &site_row::pid},
      field{"samples", &site_row::samples},     field{"bytes", &site_row::bytes},
      field{"estimated_bytes", &site_row::estimated_bytes}, field{"oldest_ns", &site_row::oldest_ns},
      field{"newest_ns", &site_row::newest_ns}, field{"aged_bytes", &site_row::aged_bytes},
      site_frames{}};
};
struct site_table_msg {
  std::uint32_t capacity = 0;  // entries of the heap's profile table
  std::uint32_t live = 0;      // entries holding a live sample (all of them, also those of rows left out)
  std::vector<site_row> rows;
};
template <>
struct wire<site_table_msg> {
  static constexpr std::tuple fields{field{"capacity", &site_table_msg::capacity}, field{"live", &site_table_msg::live}};
};

std::vector<std::uint8_t> encode(const hello_msg& m);
std::vector<std::uint8_t> encode(const welcome_msg& m);
std::vector<std::uint8_t> encode(const refill_msg& m);
std::vector<std::uint8_t> encode(const span_list_msg& m);
std::vector<std::uint8_t> encode(const reattach_msg& m);
std::vector<std::uint8_t> encode(const alloc_large_msg& m);
std::vector<std::uint8_t> encode(const large_msg& m);
std::vector<std::uint8_t> encode(const free_large_msg& m);
std::vector<std::uint8_t> encode(const slot_msg& m);
std::vector<std::uint8_t> encode_publish(const root_msg& m);
std::vector<std::uint8_t> encode_name(const std::string& name);
std::vector<std::uint8_t> encode_root(std::uint64_t handle);
std::vector<std::uint8_t> encode(const stats_msg& m);
std::vector<std::uint8_t> encode(const class_table_msg& m);
std::vector<std::uint8_t> encode(const client_table_msg& m);
std::vector<std::uint8_t> encode(const page_table_msg& m);
std::vector<std::uint8_t> encode(const cache_table_msg& m);
std::vector<std::uint8_t> encode(const advise_table_msg& m);
std::vector<std::uint8_t> encode(const leak_table_msg& m);
std::vector<std::uint8_t> encode(const site_table_msg& m);
std::vector<std::uint8_t> encode_leak_sites_request(std::uint64_t older_than_ns);

// Each returns nullopt unless the payload is exactly one well-formed
// message with every field in range.
std::optional<hello_msg> decode_hello(std::span<const std::uint8_t> p);
std::optional<welcome_msg> decode_welcome(std::span<const std::uint8_t> p);
std::optional<refill_msg> decode_refill(std::span<const std::uint8_t> p);
// min_count 0: a reattach's reply, which may take nothing.
std::optional<span_list_msg> decode_span_list(std::span<const std::uint8_t> p, std::uint16_t max_count,
                                              std::uint16_t min_count = 1);
std::optional<reattach_msg> decode_reattach(std::span<const std::uint8_t> p);
std::optional<alloc_large_msg> decode_alloc_large(std::span<const std::uint8_t> p);
std::optional<large_msg> decode_large(std::span<const std::uint8_t> p);
std::optional<free_large_msg> decode_free_large(std::span<const std::uint8_t> p);
std::optional<slot_msg> decode_slot(std::span<const std::uint8_t> p);
std::optional<root_msg> decode_publish(std::span<const std::uint8_t> p);
std::optional<std::string> decode_name(std::span<const std::uint8_t> p);
std::optional<std::uint64_t> decode_root(std::span<const std::uint8_t> p);
std::optional<stats_msg> decode_stats(std::span<const std::uint8_t> p);
std::optional<class_table_msg> decode_class_table(std::span<const std::uint8_t> p);
std::optional<client_table_msg> decode_client_table(std::span<const std::uint8_t> p,
                                                    client_rows format = client_rows::basic);
std::optional<page_table_msg> decode_page_table(std::span<const std::uint8_t> p);
std::optional<cache_table_msg> decode_cache_table(std::span<const std::uint8_t> p);
std::optional<advise_table_msg> decode_advise_table(std::span<const std::uint8_t> p);
std::optional<leak_table_msg> decode_leak_table(std::span<const std::uint8_t> p);
std::optional<site_table_msg> decode_site_table(std::span<const std::uint8_t> p);
std::optional<std::uint64_t> decode_leak_sites_request(std::span<const std::uint8_t> p);

// A whole reply frame: header (status, request id) + message text + body.
std::vector<std::uint8_t> make_reply(msg type, std::uint32_t request_id, errc status, const std::string& message,
                                     const std::vector<std::uint8_t>& body = {});
// A whole request frame.
std::vector<std::uint8_t> make_request(msg type, std::uint32_t request_id, const std::vector<std::uint8_t>& body = {});

// Splits a reply payload into its message text and body; nullopt if malformed.
struct reply_parts {
  std::string message;
  std::span<const std::uint8_t> body;
};
std::optional<reply_parts> split_reply(std::span<const std::uint8_t> payload);

}  // namespace shmalloc::proto
