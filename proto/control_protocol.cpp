#include "proto/control_protocol.hpp"

#include "shm/layout.hpp"

#include <cstring>
#include <initializer_list>

namespace shmalloc::proto {

namespace {
// Each number names one message: the enum would take a repeat silently.
constexpr bool numbers_unique() noexcept {
  constexpr std::uint16_t numbers[] = {
#define SHMALLOC_X(name, number, ...) number,
      SHMALLOC_PROTO_REQUESTS(SHMALLOC_X) SHMALLOC_PROTO_REPLIES(SHMALLOC_X)
#undef SHMALLOC_X
  };
  for (std::size_t i = 0; i < std::size(numbers); ++i)
    for (std::size_t j = i + 1; j < std::size(numbers); ++j)
      if (numbers[i] == numbers[j]) return false;
  return true;
}
static_assert(numbers_unique(), "two messages of the message table share a number");
}  // namespace

void encode_header(const frame_header& h, std::uint8_t out[header_bytes]) noexcept {
  put_le(out, h.length);
  put_le(out + 4, h.type);
  put_le(out + 6, h.version);
  put_le(out + 8, h.request_id);
  put_le(out + 12, h.status);
}

frame_header decode_header(const std::uint8_t in[header_bytes]) noexcept {
  return {get_le<std::uint32_t>(in), get_le<std::uint16_t>(in + 4), get_le<std::uint16_t>(in + 6),
          get_le<std::uint32_t>(in + 8), get_le<std::uint32_t>(in + 12)};
}

std::string check_header(const frame_header& h) {
  if (h.version != protocol_version)
    return "protocol version " + std::to_string(h.version) + " is not supported (this side speaks " +
           std::to_string(protocol_version) + ")";
  if (h.length > max_payload)
    return "frame of " + std::to_string(h.length) + " bytes exceeds the limit of " + std::to_string(max_payload);
  return {};
}

// --- encode -----------------------------------------------------------------

namespace {
template <class T>
std::vector<std::uint8_t> encode_fields(const T& m) {
  writer w;
  write_fields(w, m);
  return std::move(w.bytes());
}

// A table: its own fields, u16 count, then each row's fields.
template <class Table>
std::vector<std::uint8_t> encode_table(const Table& m) {
  writer w;
  write_fields(w, m);
  w.u16(static_cast<std::uint16_t>(m.rows.size()));
  for (const auto& row : m.rows) write_fields(w, row);
  return std::move(w.bytes());
}

std::vector<std::uint8_t> encode_u64(std::uint64_t v) {
  writer w;
  w.u64(v);
  return std::move(w.bytes());
}

// u16 count + count x u32: the span lists.
void put_ids(writer& w, const std::vector<std::uint32_t>& ids) {
  w.u16(static_cast<std::uint16_t>(ids.size()));
  for (std::uint32_t id : ids) w.u32(id);
}

// u16 count + count x u64: the stats and page tables, fields in X-macro order.
std::vector<std::uint8_t> encode_counters(std::initializer_list<std::uint64_t> fields) {
  writer w;
  w.u16(static_cast<std::uint16_t>(fields.size()));
  for (std::uint64_t v : fields) w.u64(v);
  return std::move(w.bytes());
}
}  // namespace

void site_frames::put(writer& w, const site_row& r) const {
  w.u8(static_cast<std::uint8_t>(r.pc.size()));
  for (std::size_t f = 0; f < r.pc.size(); ++f) w.u64(r.pc[f]).u64(r.vma[f]);
}

std::vector<std::uint8_t> encode(const hello_msg& m) {
  writer w;
  write_fields(w, m);
  if (!m.host.empty() || !m.container.empty()) w.str(m.host).str(m.container);
  return std::move(w.bytes());
}
std::vector<std::uint8_t> encode(const welcome_msg& m) { return encode_fields(m); }
std::vector<std::uint8_t> encode(const refill_msg& m) { return encode_fields(m); }
std::vector<std::uint8_t> encode(const alloc_large_msg& m) { return encode_fields(m); }
std::vector<std::uint8_t> encode(const large_msg& m) { return encode_fields(m); }
std::vector<std::uint8_t> encode(const free_large_msg& m) { return encode_fields(m); }
std::vector<std::uint8_t> encode(const slot_msg& m) { return encode_fields(m); }
std::vector<std::uint8_t> encode_publish(const root_msg& m) { return encode_fields(m); }
std::vector<std::uint8_t> encode(const span_list_msg& m) {
  writer w;
  put_ids(w, m.span_ids);
  return std::move(w.bytes());
}
std::vector<std::uint8_t> encode(const reattach_msg& m) {
  writer w;
  w.u32(m.old_client_id).u64(m.token);
  put_ids(w, m.span_ids);
  return std::move(w.bytes());
}
std::vector<std::uint8_t> encode_name(const std::string& name) {
  writer w;
  w.str(name);
  return std::move(w.bytes());
}
std::vector<std::uint8_t> encode_root(std::uint64_t handle) { return encode_u64(handle); }

#define SHMALLOC_FIELD(name) m.name,
std::vector<std::uint8_t> encode(const stats_msg& m) { return encode_counters({SHMALLOC_PROTO_STATS(SHMALLOC_FIELD)}); }
std::vector<std::uint8_t> encode(const page_table_msg& m) { return encode_counters({SHMALLOC_PROTO_PAGES(SHMALLOC_FIELD)}); }
#undef SHMALLOC_FIELD

std::vector<std::uint8_t> encode(const class_table_msg& m) { return encode_table(m); }
std::vector<std::uint8_t> encode(const advise_table_msg& m) { return encode_table(m); }
std::vector<std::uint8_t> encode(const leak_table_msg& m) { return encode_table(m); }
std::vector<std::uint8_t> encode(const site_table_msg& m) { return encode_table(m); }
std::vector<std::uint8_t> encode(const cache_table_msg& m) { return encode_table(m); }

// Its rows in the format the request asked for.
std::vector<std::uint8_t> encode(const client_table_msg& m) {
  writer w;
  write_fields(w, m);
  w.u16(static_cast<std::uint16_t>(m.rows.size()));
  for (const client_row& r : m.rows) {
    write_fields(w, r);
    if (m.format == client_rows::identity) write_list(w, r, wire<client_row>::identity_fields);
  }
  return std::move(w.bytes());
}

std::vector<std::uint8_t> encode_leaks_request(std::uint32_t window_s) {
  if (window_s == default_leak_window_s) return {};  // what a daemon from before the window reads
  writer w;
  w.u32(window_s);
  return std::move(w.bytes());
}

std::vector<std::uint8_t> encode_leak_sites_request(std::uint64_t older_than_ns) { return encode_u64(older_than_ns); }

std::vector<std::uint8_t> encode_clients_request(client_rows format) {
  if (format == client_rows::basic) return {};
  writer w;
  w.u8(static_cast<std::uint8_t>(format));
  return std::move(w.bytes());
}

// --- decode -----------------------------------------------------------------

namespace {
template <class T>
std::optional<T> finish(const reader& r, T value) {
  if (!r.done()) return std::nullopt;
  return value;
}

template <class T>
std::optional<T> decode_fields(std::span<const std::uint8_t> p) {
  reader r(p);
  T m;
  read_fields(r, m);
  return finish(r, std::move(m));
}

// A table: its own fields, u16 count, then rows as they arrive (the count
// alone is untrusted). head(m, n) judges the count against the table's own
// fields; row(r, m, last) reads what the row's fields leave (if anything)
// and judges the row just read, m.rows.back().
template <class Table, class Head, class Row>
std::optional<Table> read_table(std::span<const std::uint8_t> p, Table m, Head head, Row row) {
  reader r(p);
  read_fields(r, m);
  const std::uint16_t n = r.u16();
  if (r.failed() || !head(m, n)) return std::nullopt;
  for (std::uint16_t i = 0; i < n; ++i) {
    read_fields(r, m.rows.emplace_back());
    if (r.failed() || !row(r, m.rows.back(), i == 0 ? nullptr : &m.rows[i - 1]) || r.failed()) return std::nullopt;
  }
  return finish(r, std::move(m));
}

template <class Table>
bool at_most_total(const Table& m, std::uint16_t n) {
  return n <= m.total;
}
template <class Table>
bool at_most_classes(const Table&, std::uint16_t n) {
  return n < num_size_classes;
}
// Rows by size class, strictly increasing.
template <class Row>
bool next_class(const Row& row, const Row* last) {
  return row.size_class > (last != nullptr ? last->size_class : 0) && row.size_class < num_size_classes;
}

// Reads u16 count + count x u64 into fields; false unless the count is
// exactly theirs.
bool read_counters(reader& r, std::initializer_list<std::uint64_t*> fields) {
  if (r.u16() != fields.size()) return false;
  for (std::uint64_t* f : fields) *f = r.u64();
  return !r.failed();
}

bool valid_root_name(const std::string& n) {
  if (n.empty() || n.size() > max_root_name) return false;
  for (char c : n)
    if (c < 0x21 || c > 0x7e) return false;  // printable, no spaces
  return true;
}

std::optional<std::vector<std::uint32_t>> read_ids(reader& r, std::uint16_t min_count, std::uint16_t max_count) {
  const std::uint16_t n = r.u16();
  if (r.failed() || n < min_count || n > max_count) return std::nullopt;
  std::vector<std::uint32_t> ids;
  ids.reserve(n);  // at most max_count: bounded
  for (std::uint16_t i = 0; i < n; ++i) ids.push_back(r.u32());
  return ids;
}
}  // namespace

static_assert(max_root_name == root_name_bytes - 1);
static_assert(max_class_rows == num_size_classes - 1);

void site_frames::get(reader& r, site_row& row) const {
  const std::uint8_t frames = r.u8();
  if (frames > max_site_frames) r.fail();
  for (std::uint8_t f = 0; f < frames && !r.failed(); ++f) {
    row.pc.push_back(r.u64());
    row.vma.push_back(r.u64());
  }
}

std::optional<hello_msg> decode_hello(std::span<const std::uint8_t> p) {
  reader r(p);
  hello_msg m;
  read_fields(r, m);
  if (!r.failed() && !r.done()) {  // a client that says where it runs
    m.host = r.str(max_host);
    m.container = r.str(max_container);
    if (!valid_identity(m.host, max_host) || !valid_identity(m.container, max_container)) return std::nullopt;
  }
  return finish(r, std::move(m));
}
std::optional<welcome_msg> decode_welcome(std::span<const std::uint8_t> p) { return decode_fields<welcome_msg>(p); }
std::optional<large_msg> decode_large(std::span<const std::uint8_t> p) { return decode_fields<large_msg>(p); }
std::optional<free_large_msg> decode_free_large(std::span<const std::uint8_t> p) {
  return decode_fields<free_large_msg>(p);
}
std::optional<slot_msg> decode_slot(std::span<const std::uint8_t> p) { return decode_fields<slot_msg>(p); }

std::optional<refill_msg> decode_refill(std::span<const std::uint8_t> p) {
  auto m = decode_fields<refill_msg>(p);
  // Span classes 0 and 1 tag large spans: a refill names a small one.
  if (!m || m->span_class < 2 || m->span_class >= 136 || m->count == 0 || m->count > max_refill) return std::nullopt;
  return m;
}
std::optional<alloc_large_msg> decode_alloc_large(std::span<const std::uint8_t> p) {
  auto m = decode_fields<alloc_large_msg>(p);
  if (!m || m->bytes == 0) return std::nullopt;
  return m;
}
std::optional<root_msg> decode_publish(std::span<const std::uint8_t> p) {
  auto m = decode_fields<root_msg>(p);
  if (!m || !valid_root_name(m->name) || m->handle == 0) return std::nullopt;
  return m;
}

std::optional<span_list_msg> decode_span_list(std::span<const std::uint8_t> p, std::uint16_t max_count,
                                              std::uint16_t min_count) {
  reader r(p);
  auto ids = read_ids(r, min_count, max_count);
  if (!ids) return std::nullopt;
  return finish(r, span_list_msg{std::move(*ids)});
}
std::optional<reattach_msg> decode_reattach(std::span<const std::uint8_t> p) {
  reader r(p);
  reattach_msg m;
  m.old_client_id = r.u32();
  m.token = r.u64();
  auto ids = read_ids(r, 0, max_release);
  if (!ids || m.old_client_id == 0) return std::nullopt;
  m.span_ids = std::move(*ids);
  return finish(r, std::move(m));
}
std::optional<std::string> decode_name(std::span<const std::uint8_t> p) {
  reader r(p);
  std::string name = r.str(max_root_name);
  if (!valid_root_name(name)) return std::nullopt;
  return finish(r, std::move(name));
}
std::optional<std::uint64_t> decode_root(std::span<const std::uint8_t> p) {
  reader r(p);
  const std::uint64_t handle = r.u64();
  if (handle == 0) return std::nullopt;
  return finish(r, handle);
}

#define SHMALLOC_FIELD(name) &m.name,
std::optional<stats_msg> decode_stats(std::span<const std::uint8_t> p) {
  reader r(p);
  stats_msg m;
  if (!read_counters(r, {SHMALLOC_PROTO_STATS(SHMALLOC_FIELD)})) return std::nullopt;
  return finish(r, m);
}

std::optional<page_table_msg> decode_page_table(std::span<const std::uint8_t> p) {
  reader r(p);
  page_table_msg m;
  if (!read_counters(r, {SHMALLOC_PROTO_PAGES(SHMALLOC_FIELD)})) return std::nullopt;
  // Each part at most the whole, so that the sum cannot wrap.
  const bool parts_fit = m.pages_in_use <= m.pages_committed && m.pages_free <= m.pages_committed &&
                         m.pages_released <= m.pages_committed;
  if (m.page_size == 0 || m.pages_committed > m.pages_capacity || !parts_fit ||
      m.pages_in_use + m.pages_free + m.pages_released != m.pages_committed ||
      m.largest_free_run_pages > m.pages_free + m.pages_released || m.large_spans > m.spans_in_use)
    return std::nullopt;
  return finish(r, m);
}
#undef SHMALLOC_FIELD

std::optional<class_table_msg> decode_class_table(std::span<const std::uint8_t> p) {
  return read_table(p, class_table_msg{}, at_most_classes<class_table_msg>,
                    [](reader&, const class_row& row, const class_row* last) {
                      return next_class(row, last) && row.object_size != 0 && row.object_size <= max_small_size &&
                             row.bytes_wasted <= row.bytes_in_use && row.objects_live <= row.mallocs;
                    });
}

std::optional<advise_table_msg> decode_advise_table(std::span<const std::uint8_t> p) {
  return read_table(p, advise_table_msg{}, at_most_classes<advise_table_msg>,
                    [](reader&, const advise_row& row, const advise_row* last) {
                      // Each sample is a request no larger than the class's object size.
                      return next_class(row, last) && row.object_size == class_to_size(row.size_class) &&
                             row.requested_bytes <= row.samples() * row.object_size;
                    });
}

std::optional<std::uint32_t> decode_leaks_request(std::span<const std::uint8_t> p) {
  if (p.empty()) return default_leak_window_s;
  reader r(p);
  const std::uint32_t window = r.u32();
  if (r.failed() || window == 0 || window > max_leak_window_s) return std::nullopt;
  return finish(r, window);
}

std::optional<leak_table_msg> decode_leak_table(std::span<const std::uint8_t> p) {
  return read_table(p, leak_table_msg{}, at_most_total<leak_table_msg>,
                    [](reader&, const leak_row& row, const leak_row*) {
                      const leak_class* last = nullptr;
                      for (const leak_class& c : row.classes) {
                        if (!next_class(c, last)) return false;
                        last = &c;
                      }
                      return row.id != 0 && row.large_bytes <= row.live_bytes;
                    });
}

std::optional<std::uint64_t> decode_leak_sites_request(std::span<const std::uint8_t> p) {
  reader r(p);
  const std::uint64_t older_than = r.u64();
  if (r.failed()) return std::nullopt;
  return finish(r, older_than);
}

std::optional<site_table_msg> decode_site_table(std::span<const std::uint8_t> p) {
  return read_table(
      p, site_table_msg{},
      [](const site_table_msg& m, std::uint16_t n) { return m.live <= m.capacity && n <= max_site_rows && n <= m.live; },
      [](reader&, const site_row& row, const site_row*) {
        return row.samples != 0 && row.oldest_ns >= row.newest_ns && row.aged_bytes[0] <= row.estimated_bytes &&
               row.aged_bytes[1] <= row.aged_bytes[0] && row.aged_bytes[2] <= row.aged_bytes[1];
      });
}

std::optional<client_rows> decode_clients_request(std::span<const std::uint8_t> p) {
  if (p.empty()) return client_rows::basic;
  reader r(p);
  const std::uint8_t format = r.u8();
  if (format > static_cast<std::uint8_t>(client_rows::identity)) return std::nullopt;
  return finish(r, static_cast<client_rows>(format));
}

std::optional<client_table_msg> decode_client_table(std::span<const std::uint8_t> p, client_rows format) {
  client_table_msg m;
  m.format = format;
  return read_table(p, std::move(m), at_most_total<client_table_msg>,
                    [format](reader& r, client_row& row, const client_row* last) {
                      if (format == client_rows::identity) {
                        read_list(r, row, wire<client_row>::identity_fields);
                        if (!valid_identity(row.host, max_host) || !valid_identity(row.container, max_container))
                          return false;
                      }
                      return row.id > (last != nullptr ? last->id : 0);
                    });
}

std::optional<cache_table_msg> decode_cache_table(std::span<const std::uint8_t> p) {
  return read_table(p, cache_table_msg{}, at_most_total<cache_table_msg>,
                    [](reader&, const cache_row& row, const cache_row* last) {
                      // Names are unique (they come from root names) and sorted.
                      return !row.name.empty() && (last == nullptr || row.name > last->name);
                    });
}

// --- frames -----------------------------------------------------------------

namespace {
std::vector<std::uint8_t> frame(msg type, std::uint32_t request_id, errc status, const std::vector<std::uint8_t>& payload) {
  std::vector<std::uint8_t> out(header_bytes + payload.size());
  frame_header h;
  h.length = static_cast<std::uint32_t>(payload.size());
  h.type = static_cast<std::uint16_t>(type);
  h.request_id = request_id;
  h.status = static_cast<std::uint32_t>(status);
  encode_header(h, out.data());
  if (!payload.empty()) std::memcpy(out.data() + header_bytes, payload.data(), payload.size());
  return out;
}
}  // namespace

std::vector<std::uint8_t> make_reply(msg type, std::uint32_t request_id, errc status, const std::string& message,
                                     const std::vector<std::uint8_t>& body) {
  writer w;
  w.str(message.size() > 1024 ? message.substr(0, 1024) : message);
  w.bytes().insert(w.bytes().end(), body.begin(), body.end());
  return frame(type, request_id, status, w.bytes());
}

std::vector<std::uint8_t> make_request(msg type, std::uint32_t request_id, const std::vector<std::uint8_t>& body) {
  return frame(type, request_id, errc::ok, body);
}

std::optional<reply_parts> split_reply(std::span<const std::uint8_t> payload) {
  reader r(payload);
  std::string message = r.str(1024);
  if (r.failed()) return std::nullopt;
  const std::size_t used = 2 + message.size();
  return reply_parts{std::move(message), payload.subspan(used)};
}

}  // namespace shmalloc::proto
