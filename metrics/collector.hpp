// collector.hpp: the daemon's Prometheus metrics (the metrics/ layer).
//
// Design
// ======
// Every value is read at scrape time, never pushed from the allocation
// path: the heap's counters already live in the segment (heap_accounts,
// which the daemon writes, and one statistics block per client thread,
// which that thread writes), so a scrape reads them and builds its metric
// families afresh, as Prometheus' guide for exporters asks ("values read
// from another system"). Nothing in a client process knows about metrics;
// libshmalloc never links prometheus-cpp.
//
//   civetweb thread (scrape)            daemon threads (sessions, io_context)
//   ------------------------            -------------------------------------
//   heap_collector::Collect()           handle requests, sweep, scavenge:
//     sample_fn() --- heap lock --->      hold the heap lock while they
//       read_census(heap)                 change mheap, mcentral or the
//       read_caches(segment)              client registry (and the named
//       control_stats copy                roots the caches are found by)
//     build families (no lock held)
//
// The sample is taken under the lock the daemon holds while it changes the
// heap, so heap_sys = heap_inuse + heap_idle holds in every scrape; the
// client-written statistics blocks are relaxed atomics and may move while
// they are summed (memstats.hpp). So are the shared caches' counters
// (cache/census.hpp): clients write them, the daemon only reads them, and
// no lock of ours orders the two. Families are built outside the lock.
//
// Names mirror client_golang's Go collector with the prefix shmalloc_
// (go_memstats_heap_inuse_bytes -> shmalloc_heap_inuse_bytes), so a Go
// memory dashboard ports by a rename; each HELP says what it mirrors.
// Label sets are bounded: size_class (67 values), state (3), op (one per
// request type), reason (one per error code), cache (one per shared cache,
// at most the 1,024 named roots), and client, pid and name only on
// shmalloc_client_live_bytes, for the top max_client_series clients by live
// bytes (more per-client detail is shmallocctl clients' and leaks').
//
// This layer depends on shm/, cache_census and prometheus-cpp only (no Asio,
// nor the caches' client library); the daemon (service/) supplies the
// sample function and owns the HTTP endpoint.
#pragma once

#include <prometheus/collectable.h>
#include <prometheus/metric_family.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "cache/census.hpp"
#include "metrics/control_stats.hpp"
#include "shm/memstats.hpp"

namespace shmalloc::metrics {

// Clients with a series of shmalloc_client_live_bytes: the top ones by live
// bytes, so that the label set stays bounded however many clients connect.
inline constexpr std::size_t max_client_series = 10;
struct client_live {
  std::uint32_t id = 0;
  std::uint32_t pid = 0;  // 0: not in the daemon's PID namespace
  std::string name;
  std::uint64_t live_bytes = 0;
};

// One scrape's worth of daemon state.
struct metrics_sample {
  heap_census census;
  std::uint64_t clients = 0;  // connected client processes
  control_stats control;
  std::uint64_t shm_avail_bytes = 0;  // statvfs of the filesystem behind the heap
  std::vector<cache_census> caches;   // the shared caches, read under the heap lock too
  std::vector<client_live> top_clients;  // at most max_client_series, the most live bytes first
  bool valid = false;  // false: the daemon could not be sampled (stopping)
};

using sample_fn = std::function<metrics_sample()>;

struct build_info {
  std::string version;
  std::string revision;
};

// `git describe --always --dirty` of the tree this was built from
// ("unknown" outside a git checkout); generated at build time.
const char* build_revision() noexcept;

// The shmalloc_* families, from a sample.
std::vector<prometheus::MetricFamily> heap_families(const metrics_sample& s, const build_info& b);

// A Collectable that samples the daemon at each scrape.
class heap_collector final : public prometheus::Collectable {
 public:
  heap_collector(sample_fn sample, build_info build) : sample_(std::move(sample)), build_(std::move(build)) {}
  std::vector<prometheus::MetricFamily> Collect() const override;

 private:
  sample_fn sample_;
  build_info build_;
};

// Free bytes (for unprivileged users) of the filesystem holding path; 0 if
// it cannot be read.
std::uint64_t filesystem_avail_bytes(const std::string& path) noexcept;

}  // namespace shmalloc::metrics
