#include "proto/wire.hpp"

#include <algorithm>

namespace shmalloc::proto {

writer& writer::u8(std::uint8_t v) {
  buf_.push_back(v);
  return *this;
}
writer& writer::u16(std::uint16_t v) {
  std::uint8_t b[2];
  put_le(b, v);
  buf_.insert(buf_.end(), b, b + 2);
  return *this;
}
writer& writer::u32(std::uint32_t v) {
  std::uint8_t b[4];
  put_le(b, v);
  buf_.insert(buf_.end(), b, b + 4);
  return *this;
}
writer& writer::u64(std::uint64_t v) {
  std::uint8_t b[8];
  put_le(b, v);
  buf_.insert(buf_.end(), b, b + 8);
  return *this;
}
writer& writer::str(const std::string& s) {
  const std::size_t n = std::min<std::size_t>(s.size(), 0xffff);
  u16(static_cast<std::uint16_t>(n));
  buf_.insert(buf_.end(), s.begin(), s.begin() + static_cast<std::ptrdiff_t>(n));
  return *this;
}

bool reader::take(std::size_t n) noexcept {
  if (failed_ || in_.size() - pos_ < n) {
    failed_ = true;
    return false;
  }
  return true;
}
std::uint8_t reader::u8() noexcept { return take(1) ? in_[pos_++] : 0; }
std::uint16_t reader::u16() noexcept {
  if (!take(2)) return 0;
  pos_ += 2;
  return get_le<std::uint16_t>(in_.data() + pos_ - 2);
}
std::uint32_t reader::u32() noexcept {
  if (!take(4)) return 0;
  pos_ += 4;
  return get_le<std::uint32_t>(in_.data() + pos_ - 4);
}
std::uint64_t reader::u64() noexcept {
  if (!take(8)) return 0;
  pos_ += 8;
  return get_le<std::uint64_t>(in_.data() + pos_ - 8);
}
std::string reader::str(std::size_t max_len) {
  const std::uint16_t n = u16();
  if (n > max_len || !take(n)) {
    failed_ = true;
    return {};
  }
  std::string s(reinterpret_cast<const char*>(in_.data() + pos_), n);
  pos_ += n;
  return s;
}

}  // namespace shmalloc::proto
