// wire.hpp: how the control protocol's bodies are written and read. The
// writer and reader move little-endian integers and u16-counted strings;
// above them, each message and row type lists its fields once, in wire
// order (proto::wire<T>::fields, next to the type in control_protocol.hpp),
// and write_fields, read_fields and fields_size walk that list. A field's
// name is also its key in shmallocctl's JSON and its column.
//
// What a list cannot say stays hand-written beside the type: validation
// (ranges, order, sums), optional tails (hello's identity) and fields whose
// presence depends on the request (client rows' identity).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

namespace shmalloc::proto {

// A little-endian integer into bytes, and back.
template <class T>
void put_le(std::uint8_t* out, T v) noexcept {
  for (std::size_t i = 0; i < sizeof(T); ++i) out[i] = static_cast<std::uint8_t>(v >> (8 * i));
}
template <class T>
T get_le(const std::uint8_t* in) noexcept {
  T v = 0;
  for (std::size_t i = 0; i < sizeof(T); ++i) v = static_cast<T>(v | static_cast<T>(T{in[i]} << (8 * i)));
  return v;
}

// Little-endian payload writer.
class writer {
 public:
  writer& u8(std::uint8_t v);
  writer& u16(std::uint16_t v);
  writer& u32(std::uint32_t v);
  writer& u64(std::uint64_t v);
  writer& str(const std::string& s);  // u16 length + bytes
  std::vector<std::uint8_t>& bytes() noexcept { return buf_; }

 private:
  std::vector<std::uint8_t> buf_;
};

// Bounds-checked reader; any short read sets failed() and yields zeros.
class reader {
 public:
  explicit reader(std::span<const std::uint8_t> in) noexcept : in_(in) {}
  std::uint8_t u8() noexcept;
  std::uint16_t u16() noexcept;
  std::uint32_t u32() noexcept;
  std::uint64_t u64() noexcept;
  std::string str(std::size_t max_len);
  bool failed() const noexcept { return failed_; }
  // A value read whole but out of range: the message is malformed.
  void fail() noexcept { failed_ = true; }
  // True when everything was read and nothing is left over.
  bool done() const noexcept { return !failed_ && pos_ == in_.size(); }

 private:
  bool take(std::size_t n) noexcept;
  std::span<const std::uint8_t> in_;
  std::size_t pos_ = 0;
  bool failed_ = false;
};

// One field of T: its name and member. max bounds what a decoder accepts:
// a string's length, or a list's elements (u8-counted rows of their own
// wire type).
template <class T, class M>
struct field {
  std::string_view name;
  M T::*member;
  std::size_t max = 0;
};
template <class T, class M>
field(std::string_view, M T::*, std::size_t = 0) -> field<T, M>;

// wire<T>::fields: T's fields in wire order, a tuple of field (or of a
// codec of its own with put, get and size, for an odd shape).
template <class T>
struct wire;

// --- one value ---------------------------------------------------------------

inline void put_value(writer& w, bool v) { w.u8(v ? 1 : 0); }
inline void put_value(writer& w, std::uint8_t v) { w.u8(v); }
inline void put_value(writer& w, std::uint16_t v) { w.u16(v); }
inline void put_value(writer& w, std::uint32_t v) { w.u32(v); }
inline void put_value(writer& w, std::uint64_t v) { w.u64(v); }
inline void put_value(writer& w, const std::string& v) { w.str(v); }
template <class V, std::size_t N>
void put_value(writer& w, const V (&a)[N]) {
  for (const V& v : a) put_value(w, v);
}
template <class R>
void put_value(writer& w, const std::vector<R>& rows);

inline void get_value(reader& r, bool& v, std::size_t) {
  const std::uint8_t b = r.u8();
  if (b > 1) r.fail();
  v = b == 1;
}
inline void get_value(reader& r, std::uint8_t& v, std::size_t) { v = r.u8(); }
inline void get_value(reader& r, std::uint16_t& v, std::size_t) { v = r.u16(); }
inline void get_value(reader& r, std::uint32_t& v, std::size_t) { v = r.u32(); }
inline void get_value(reader& r, std::uint64_t& v, std::size_t) { v = r.u64(); }
inline void get_value(reader& r, std::string& v, std::size_t max) { v = r.str(max); }
template <class V, std::size_t N>
void get_value(reader& r, V (&a)[N], std::size_t) {
  for (V& v : a) get_value(r, v, 0);
}
template <class R>
void get_value(reader& r, std::vector<R>& rows, std::size_t max);

constexpr std::size_t value_size(std::uint8_t) noexcept { return 1; }
constexpr std::size_t value_size(bool) noexcept { return 1; }
constexpr std::size_t value_size(std::uint16_t) noexcept { return 2; }
constexpr std::size_t value_size(std::uint32_t) noexcept { return 4; }
constexpr std::size_t value_size(std::uint64_t) noexcept { return 8; }
inline std::size_t value_size(const std::string& v) noexcept { return 2 + v.size(); }
template <class V, std::size_t N>
std::size_t value_size(const V (&a)[N]) noexcept {
  return N * value_size(a[0]);
}
template <class R>
std::size_t value_size(const std::vector<R>& rows) noexcept;

// --- one field, as its list says --------------------------------------------

template <class T, class M>
void put_field(writer& w, const T& v, const field<T, M>& f) {
  put_value(w, v.*f.member);
}
template <class T, class M>
void get_field(reader& r, T& v, const field<T, M>& f) {
  get_value(r, v.*f.member, f.max);
}
template <class T, class M>
std::size_t field_size(const T& v, const field<T, M>& f) noexcept {
  return value_size(v.*f.member);
}
// A codec of its own (an odd shape: say, two lists sent interleaved).
template <class T, class C>
void put_field(writer& w, const T& v, const C& c) {
  c.put(w, v);
}
template <class T, class C>
void get_field(reader& r, T& v, const C& c) {
  c.get(r, v);
}
template <class T, class C>
std::size_t field_size(const T& v, const C& c) noexcept {
  return c.size(v);
}

// --- a list of fields --------------------------------------------------------

template <class T, class List>
void write_list(writer& w, const T& v, const List& list) {
  std::apply([&](const auto&... f) { (put_field(w, v, f), ...); }, list);
}
// Stops at the first failure: a short read yields zeros from then on.
template <class T, class List>
void read_list(reader& r, T& v, const List& list) {
  std::apply([&](const auto&... f) { ((r.failed() ? void() : get_field(r, v, f)), ...); }, list);
}
template <class T, class List>
std::size_t list_size(const T& v, const List& list) noexcept {
  return std::apply([&](const auto&... f) { return (std::size_t{0} + ... + field_size(v, f)); }, list);
}

template <class T>
void write_fields(writer& w, const T& v) {
  write_list(w, v, wire<T>::fields);
}
template <class T>
void read_fields(reader& r, T& v) {
  read_list(r, v, wire<T>::fields);
}
template <class T>
std::size_t fields_size(const T& v) noexcept {
  return list_size(v, wire<T>::fields);
}
// Bytes of a value with its strings and lists empty, from its type alone
// (what a row costs before its text: the fixed part of encoded sizes).
template <class M>
constexpr std::size_t empty_size() noexcept {
  if constexpr (std::is_same_v<M, std::string>) return 2;
  else if constexpr (std::is_array_v<M>) return std::extent_v<M> * empty_size<std::remove_extent_t<M>>();
  else if constexpr (requires { typename M::value_type; }) return 1;  // a u8-counted list
  else return std::is_same_v<M, bool> ? 1 : sizeof(M);
}
template <class T, class M>
constexpr std::size_t empty_field_size(const field<T, M>&) noexcept {
  return empty_size<M>();
}
template <class C>
constexpr std::size_t empty_field_size(const C&) noexcept {
  return C::empty_size;
}
template <class List>
constexpr std::size_t empty_list_size(const List& list) noexcept {
  return std::apply([](const auto&... f) { return (std::size_t{0} + ... + empty_field_size(f)); }, list);
}
template <class T>
constexpr std::size_t empty_fields_size() noexcept {
  return empty_list_size(wire<T>::fields);
}

// f(name, value) for each field of v that is a plain member, in order.
template <class T, class F>
void for_each_field(const T& v, F f) {
  std::apply([&](const auto&... fs) { (f(fs.name, v.*fs.member), ...); }, wire<T>::fields);
}
// The names of T's fields, in order.
template <class T>
std::vector<std::string> field_names() {
  return std::apply([](const auto&... fs) { return std::vector<std::string>{std::string(fs.name)...}; },
                    wire<T>::fields);
}

// Rows inside a row: u8 count, then each row's fields.
template <class R>
void put_value(writer& w, const std::vector<R>& rows) {
  w.u8(static_cast<std::uint8_t>(rows.size()));
  for (const R& row : rows) write_fields(w, row);
}
template <class R>
void get_value(reader& r, std::vector<R>& rows, std::size_t max) {
  const std::uint8_t n = r.u8();
  if (n > max) r.fail();
  for (std::uint8_t i = 0; i < n && !r.failed(); ++i) read_fields(r, rows.emplace_back());  // as they arrive
}
template <class R>
std::size_t value_size(const std::vector<R>& rows) noexcept {
  std::size_t n = 1;
  for (const R& row : rows) n += fields_size(row);
  return n;
}

}  // namespace shmalloc::proto
