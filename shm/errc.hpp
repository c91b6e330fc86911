// errc.hpp: the one error vocabulary of the control plane (heap growth,
// attach, protocol). The fast path never uses it: it returns nullptr/false.
#pragma once

#include <string>
#include <system_error>
#include <utility>

namespace shmalloc {

enum class errc : int {
  ok = 0,
  no_memory = 1,         // the heap's capacity (address space) is exhausted
  no_space = 2,          // the filesystem behind the heap is full (fallocate: ENOSPC)
  quota_exceeded = 3,    // a client asked for more than its byte quota
  invalid_argument = 4,  // a size, name, alignment or setting out of range
  bad_handle = 5,        // not inside the heap, not an object's start, or not held
  double_free = 6,       // the object (or span) is already free
  not_found = 7,         // no heap / root / client by that name
  exists = 8,            // a heap or root by that name already exists
  layout_mismatch = 9,   // the segment was made by an incompatible build
  corrupt = 10,          // shared metadata failed an integrity check
  os_error = 11,         // a system call failed; the message says which
  protocol_error = 12,   // malformed or unexpected control message
  permission_denied = 13,// peer credentials or file modes refuse access
  unavailable = 14,      // the daemon is not there or is shutting down
  too_large = 15,        // a key or value larger than the cache takes (cache/)
  too_small = 16,        // the caller's buffer cannot hold the value (cache/)
};

const std::error_category& shmalloc_category() noexcept;
inline std::error_code make_error_code(errc e) noexcept { return {static_cast<int>(e), shmalloc_category()}; }
const char* to_string(errc e) noexcept;

// An error with the sentence an operator needs (names both sides' values for
// a mismatch, the path for an OS error).
struct error {
  errc code = errc::ok;
  std::string message;
};

// A value or an error. Control-plane only (it may allocate a message).
template <class T>
class result {
 public:
  result(T value) : value_(std::move(value)) {}  // NOLINT: implicit by design
  result(error e) : error_(std::move(e)) {}      // NOLINT
  result(errc code, std::string message) : error_{code, std::move(message)} {}

  explicit operator bool() const noexcept { return error_.code == errc::ok; }
  T& value() & { return value_; }
  T&& value() && { return std::move(value_); }
  const T& value() const& { return value_; }
  T* operator->() { return &value_; }
  T& operator*() { return value_; }
  const error& err() const noexcept { return error_; }
  errc code() const noexcept { return error_.code; }

 private:
  T value_{};
  error error_{};
};

}  // namespace shmalloc

template <>
struct std::is_error_code_enum<shmalloc::errc> : std::true_type {};
