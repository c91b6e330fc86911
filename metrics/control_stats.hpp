// control_stats.hpp: what the daemon counts about its control requests, per
// op (request type): requests, failures by reason (errc), and the time from
// a whole request read to its reply built, as a histogram.
//
// Written by the daemon's threads (sessions and the io_context's) only under
// the daemon's heap lock, and copied out under the same lock by the scrape
// (see collector.hpp), so it needs no atomics. Bounded: one row per known
// request type plus "unknown".
#pragma once

#include <array>
#include <cstdint>
#include <string_view>

#include "proto/control_protocol.hpp"
#include "shm/errc.hpp"

namespace shmalloc::metrics {

// Upper bounds in seconds: a refill is tens of microseconds, a stall is
// milliseconds.
inline constexpr std::array<double, 12> control_duration_bounds{
    5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0};

// One row per message number (the message table's), requests only in use;
// row 0 is "unknown".
inline constexpr std::size_t max_ops = proto::max_msg + 1;
// errc values 0..15; cache/'s too_small (16) is never a daemon's reply and
// would count with 15 as "other".
inline constexpr std::size_t num_reasons = 16;

// The op label of a request type, its name in the message table ("unknown"
// for anything not a request).
std::string_view op_name(std::size_t op) noexcept;
// The reason label of an error code: its enumerator's name.
std::string_view reason_name(std::size_t reason) noexcept;

struct op_stats {
  std::uint64_t requests = 0;
  std::array<std::uint64_t, num_reasons> failures{};
  std::array<std::uint64_t, control_duration_bounds.size() + 1> duration_counts{};  // per bucket, last = +Inf
  double duration_sum = 0;
};

// True for the message types a client sends (the op label's values).
constexpr bool is_request(std::size_t op) noexcept {
  return op < max_ops && proto::is_request(static_cast<std::uint16_t>(op));
}

class control_stats {
 public:
  // One request of the given type was answered with status (or succeeded in
  // part: status ok, shortfall the reason it stopped short), seconds after
  // it was read.
  void record(std::uint16_t type, errc status, double seconds, errc shortfall = errc::ok) noexcept;
  // A request refused before it could be timed (a malformed header): counted
  // and failed, kept out of the duration histogram.
  void record_refused(std::uint16_t type, errc status) noexcept;
  const op_stats& op(std::size_t i) const noexcept { return ops_[i]; }

  std::uint64_t connections = 0;         // accepted
  std::uint64_t peers_refused = 0;       // peer credentials not allowed
  std::uint64_t connections_refused = 0; // no room: over max_connections, or no thread to serve them
  std::uint64_t deadline_closes = 0;     // hello or frame deadline passed

 private:
  op_stats& row(std::uint16_t type) noexcept;
  std::array<op_stats, max_ops> ops_{};
};

}  // namespace shmalloc::metrics
