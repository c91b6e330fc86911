#include "metrics/control_stats.hpp"

#include <algorithm>

namespace shmalloc::metrics {

std::string_view op_name(std::size_t op) noexcept {
  return is_request(op) ? proto::msg_name(static_cast<std::uint16_t>(op)) : "unknown";
}

std::string_view reason_name(std::size_t reason) noexcept {
  switch (static_cast<errc>(reason)) {
    case errc::ok: return "ok";
    case errc::no_memory: return "no_memory";
    case errc::no_space: return "no_space";
    case errc::quota_exceeded: return "quota_exceeded";
    case errc::invalid_argument: return "invalid_argument";
    case errc::bad_handle: return "bad_handle";
    case errc::double_free: return "double_free";
    case errc::not_found: return "not_found";
    case errc::exists: return "exists";
    case errc::layout_mismatch: return "layout_mismatch";
    case errc::corrupt: return "corrupt";
    case errc::os_error: return "os_error";
    case errc::protocol_error: return "protocol_error";
    case errc::permission_denied: return "permission_denied";
    case errc::unavailable: return "unavailable";
    case errc::too_large:  // cache/ only: never a daemon reply
    case errc::too_small: return "other";
  }
  return "other";
}

// Types that are not requests (replies, unknown numbers) share row 0, so a
// peer sending junk cannot grow the label set.
op_stats& control_stats::row(std::uint16_t type) noexcept { return ops_[is_request(type) ? type : 0]; }

namespace {
void count_failure(op_stats& s, errc status) noexcept {
  if (status == errc::ok) return;
  const auto r = static_cast<std::size_t>(status);
  ++s.failures[r < num_reasons ? r : num_reasons - 1];
}
}  // namespace

void control_stats::record_refused(std::uint16_t type, errc status) noexcept {
  op_stats& s = row(type);
  ++s.requests;
  count_failure(s, status);
}

void control_stats::record(std::uint16_t type, errc status, double seconds, errc shortfall) noexcept {
  op_stats& s = row(type);
  ++s.requests;
  count_failure(s, status);
  count_failure(s, shortfall);
  const auto b = std::lower_bound(control_duration_bounds.begin(), control_duration_bounds.end(), seconds);
  ++s.duration_counts[static_cast<std::size_t>(b - control_duration_bounds.begin())];
  s.duration_sum += seconds;
}

}  // namespace shmalloc::metrics
