// request_handler.hpp: the daemon's answer to each control request, as a
// pure function of (client, request) -> reply, tested without sockets (the
// shape of Asio's HTTP server example). One small function per request of the
// message table (proto/control_protocol.hpp), on_<name>, in a file by
// concern: request_handler.cpp the dispatch, the registry and ownership
// (hello, spans, large objects, cache slots, orphans and reattach);
// reports.cpp the read-only reports; roots.cpp the named roots.
//
// It owns the client registry: which spans and large objects each client
// holds. Nothing here takes a lock: the daemon calls it only holding
// heap_mutex_ (from a session's thread, or from the io_context's thread for
// housekeeping), so requests change mheap, mcentral and the registry one at
// a time, and a metrics scrape never reads mid-change.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "proto/control_protocol.hpp"
#include "shm/mheap.hpp"

namespace shmalloc::service {

struct client_state {
  std::uint32_t id = 0;  // 0 until hello
  pid_t pid = 0;         // from SO_PEERCRED, not from hello: 0 if the peer is in another PID namespace
  uid_t uid = 0;
  std::string name;
  // What hello said of where the client runs (checked printable and short).
  std::uint32_t pid_in_client = 0;  // its pid in its own PID namespace
  std::string host;
  std::string container;
  std::uint32_t cache_slot = 0;
  std::uint64_t reattach_check = 0;  // the hash of its reattach token, written into each of its cache slots
  std::vector<std::uint32_t> extra_slots;  // per-thread cache slots, and those held before a daemon restart
  std::set<std::uint32_t> spans;  // small spans it holds
  std::set<std::uint32_t> large;  // large objects it allocated and holds
  std::uint64_t bytes_held = 0;   // spans and large objects, for the quota
  std::uint64_t connected_ns = 0;
  // Its live bytes (request_handler::live_bytes) over time, oldest first,
  // for shmallocctl leaks' growth: a sample a second, taken by the daemon's
  // housekeeping (and one at each leaks request), kept for the longest
  // window (proto::max_leak_window_s).
  struct live_sample {
    std::uint64_t ns;
    std::uint64_t bytes;
  };
  std::vector<live_sample> live_history;
};

// The client for a log line: its id, name and pid, its own pid when that
// differs (another PID namespace), its host and container when it said them.
// The name is the client's to choose: control characters show as '?'.
std::string describe(const client_state& c);

struct handler_settings {
  std::uint64_t quota_bytes = 0;  // per client; 0 = none
  // Cache slots one client may hold (its connection's and one per thread
  // that allocates); 0 = none. The heap has max_caches in all: without a
  // cap, one process's threads could leave no slot for anyone's hello.
  std::uint32_t max_caches_per_client = 0;
};

struct reply {
  std::vector<std::uint8_t> frame;
  bool close = false;  // the framing broke or the client said bye
  // A request that succeeded in part (a refill cut short by the quota or a
  // full heap): the reply is ok, but metrics count the failure's reason.
  errc shortfall = errc::ok;
};

// A request being answered: its header and body, and the reply type the
// message table gives it, so that a handler names neither.
struct request {
  const proto::frame_header& header;
  std::span<const std::uint8_t> body;
  proto::msg reply_type;
  reply fail(errc code, const std::string& why, bool close = false) const;
  reply ok(const std::vector<std::uint8_t>& payload = {}) const;
  reply no_body_error() const;  // for a request that takes none
};

class request_handler {
 public:
  request_handler(mheap& heap, handler_settings settings) : heap_(&heap), settings_(settings) {}

  reply handle(client_state& c, const proto::frame_header& h, std::span<const std::uint8_t> payload);
  // The connection ended (bye, EOF, kill -9): take back every span the
  // client held. Objects still allocated in them stay allocated; their free
  // slots return to mcentral. Large objects stay allocated and pass to the
  // daemon (any client may still free them).
  void disconnect(client_state& c);
  // The daemon stops and keeps the heap: forget the client but leave what it
  // holds owned by its id in the segment, for the next daemon to adopt as
  // orphans and the client to reattach (disconnect would hand its spans to
  // mcentral while the client still allocates from them).
  void leave(client_state& c);

  // Daemon restart: spans and cache slots held by clients of the previous
  // daemon become orphans, grouped by their old client id. A client that
  // reconnects claims its group with reattach (showing its old welcome's
  // reattach token); groups nobody claims within the grace period are
  // reclaimed as if their client had died, unless their client lives: a
  // client that has not spoken since the restart still allocates from its
  // spans, so its group waits for it (segment::liveness_held).
  void adopt_orphans();
  // Reclaims the groups orphaned longer than grace_ns whose client is
  // dead; returns how many.
  std::size_t expire_orphans(std::uint64_t grace_ns);
  std::size_t orphan_groups() const noexcept { return orphans_.size(); }

  void set_settings(handler_settings s) noexcept { settings_ = s; }
  // The port the daemon's metrics endpoint listens on (0 = off), for stats.
  void set_metrics_port(std::uint16_t port) noexcept { metrics_port_ = port; }
  // The clock the site table ages samples on: CLOCK_MONOTONIC, which the
  // clients stamp them with. A test sets one far from the clock's origin:
  // on a machine up less than ten minutes, no real stamp can be that old.
  void set_sample_clock(mheap::clock_fn clock) noexcept { sample_clock_ = clock; }
  std::size_t clients() const noexcept { return clients_; }

  // The read-only reports (stats, classes, clients, pages, caches), from the
  // census of the heap (shm/memstats.hpp), the client registry and the
  // shared caches' counters (cache/census.hpp).
  proto::stats_msg stats() const;
  proto::class_table_msg class_table() const;
  // Clients by id, as many as fit one reply frame; total counts them all.
  proto::client_table_msg client_table(proto::client_rows format = proto::client_rows::identity) const;
  proto::page_table_msg page_table() const;
  // Caches by name, as many as fit one reply frame; total counts them all.
  proto::cache_table_msg cache_table() const;
  // Per size class, the sampled requested sizes and what the class holds
  // (shmallocctl advise).
  proto::advise_table_msg advise_table() const;
  // Per client, what it holds and how that grew over the last window_s
  // seconds, the biggest growth first (shmallocctl leaks).
  proto::leak_table_msg leak_table(std::uint32_t window_s);
  // The k clients with the most live bytes, the most first (the metrics'
  // shmalloc_client_live_bytes).
  std::vector<proto::leak_row> top_live_clients(std::size_t k) const;
  // The live sampled allocations at least older_than_ns old, by holder and
  // call stack, the most estimated bytes first (shmallocctl leaks --sites).
  proto::site_table_msg site_table(std::uint64_t older_than_ns) const;
  // Appends each client's live bytes to its history (shmallocctl leaks'
  // growth windows), if a second has passed since the last sample (or
  // force). The daemon's housekeeping calls it every second, whatever the
  // requests; a leaks request takes one more, now.
  void sample_held(std::uint64_t now, bool force);

 private:
  // One handler per request of the message table (proto::SHMALLOC_PROTO_REQUESTS).
#define SHMALLOC_X(name, ...) reply on_##name(client_state& c, const request& req);
  SHMALLOC_PROTO_REQUESTS(SHMALLOC_X)
#undef SHMALLOC_X
  root_entry* find_root(const std::string& name) const noexcept;
  // Bytes of the objects its threads allocated and did not free (by its
  // cache slots' counters), plus its large objects; per_class (67 + 1
  // entries, or nullptr): the objects by size class.
  std::uint64_t live_bytes(const client_state& c, std::uint64_t* per_class) const noexcept;
  proto::leak_row leak_row_of(const client_state& c, std::uint64_t now, std::uint64_t window_ns) const;
  proto::client_row row_of(const client_state& c, std::uint64_t now_ns, std::uint64_t unix_now_ns) const;
  // Objects allocated in the client's spans (alloc bits, less tiny spans'
  // counter blocks) plus its large objects.
  std::uint64_t objects_held(const client_state& c) const noexcept;
  bool over_quota(const client_state& c, std::uint64_t more) const noexcept;
  // Cache slots c holds, and whether it may take more (max_caches_per_client).
  static std::size_t slots_held(const client_state& c) noexcept;
  bool slots_fit(const client_state& c, std::size_t more) const noexcept;
  std::uint64_t span_bytes(std::uint32_t span) const noexcept;
  // Takes back owner's small spans (their free slots return to mcentral),
  // lets its large objects stay allocated with no holder, and retires cache
  // slots. A span whose descriptor no longer says owner held it (the heap is
  // shared with processes the daemon does not trust) is left alone.
  void reclaim(std::uint32_t owner, const std::set<std::uint32_t>& spans, const std::set<std::uint32_t>& large,
               const std::vector<std::uint32_t>& slots);
  bool holds(std::uint32_t owner, std::uint32_t id, mspan_state state) const noexcept;
  // Drops c from the registry (what it held is reclaimed, or left to its id).
  void forget(client_state& c);

  std::uint64_t reattach_check_of(std::uint64_t token) const noexcept;
  void label_slot(const client_state& c, std::uint32_t slot) noexcept;
  struct orphan_group;
  bool orphan_alive(const orphan_group& g) const noexcept;
  void retire_dead_tiny(std::uint32_t slot);

  struct orphan_group {
    std::set<std::uint32_t> spans;
    std::set<std::uint32_t> large;
    std::vector<std::uint32_t> slots;
    std::uint64_t reattach_check = 0;  // from its slots; 0: none, no reattach can claim the group
    std::uint64_t since_ns = 0;
  };

  mheap* heap_;
  handler_settings settings_;
  std::size_t clients_ = 0;
  std::uint64_t requests_ = 0;  // handled, for stats (the daemon's metrics count them by op)
  std::uint16_t metrics_port_ = 0;
  mheap::clock_fn sample_clock_ = &mheap::monotonic_ns;
  std::uint64_t last_held_sample_ns_ = 0;
  std::map<std::uint32_t, client_state*> by_id_;  // live clients, for frees of their large objects
  std::map<std::uint32_t, orphan_group> orphans_;  // by old client id
};

}  // namespace shmalloc::service
