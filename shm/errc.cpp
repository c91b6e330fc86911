#include "shm/errc.hpp"

namespace shmalloc {

const char* to_string(errc e) noexcept {
  switch (e) {
    case errc::ok: return "ok";
    case errc::no_memory: return "heap capacity exhausted";
    case errc::no_space: return "no space left in the shared-memory filesystem";
    case errc::quota_exceeded: return "client quota exceeded";
    case errc::invalid_argument: return "invalid argument";
    case errc::bad_handle: return "not an object of this heap";
    case errc::double_free: return "already free (double free)";
    case errc::not_found: return "not found";
    case errc::exists: return "already exists";
    case errc::layout_mismatch: return "heap layout mismatch";
    case errc::corrupt: return "heap metadata corrupt";
    case errc::os_error: return "system call failed";
    case errc::protocol_error: return "protocol error";
    case errc::permission_denied: return "permission denied";
    case errc::unavailable: return "daemon unavailable";
    case errc::too_large: return "key or value too large for the cache";
    case errc::too_small: return "buffer too small for the value";
  }
  return "unknown error";
}

namespace {
class category final : public std::error_category {
 public:
  const char* name() const noexcept override { return "shmalloc"; }
  std::string message(int v) const override { return to_string(static_cast<errc>(v)); }
};
}  // namespace

const std::error_category& shmalloc_category() noexcept {
  static const category instance;
  return instance;
}

}  // namespace shmalloc
