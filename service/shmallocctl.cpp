// shmallocctl: the operator CLI for shmalloc.
//
// Each subcommand is one add_<name>() that registers it with CLI11 and returns
// what to run when it is chosen; main() only parses and dispatches. The
// commands that talk to the daemon over its Unix socket (stats, ping,
// classes, clients, spans, caches, leaks, advise) share add_daemon_command and ask();
// size-classes needs no daemon. Tables print as memcached-tool does (a
// header row, aligned columns); --json prints the same names as JSON,
// numbers as numbers.
//
// --socket and --json are options of the root command, and every
// subcommand falls through to it (CLI11's fallthrough), so they may come
// before the subcommand or after it, as with docker -H, kubectl --context or
// redis-cli -s: `shmallocctl --socket P stats` and `shmallocctl stats
// --socket P` are the same. Options of one subcommand (classes --all) come
// after it.
//
// Exit codes: 0 success (also --help, --version), 1 the command failed (no
// daemon answers, it refused, or its reply was malformed: one line on
// stderr), 2 usage error (no or unknown subcommand, bad option; help goes to stderr).

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "proto/control_client.hpp"
#include "shm/layout.hpp"
#include "shm/size_classes.hpp"
#include "service/symbolize.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <functional>
#include <map>
#include <optional>
#include <iostream>
#include <string>
#include <vector>

#ifndef SHMALLOC_VERSION
#define SHMALLOC_VERSION "0.0.0"
#endif

namespace {

constexpr int exit_ok = 0;
constexpr int exit_failure = 1;
constexpr int exit_usage = 2;

// A registered subcommand: its CLI11 node, and what to run if it was chosen.
struct subcommand {
  CLI::App* app;
  std::function<int()> run;
};

// ---- size-classes -------------------------------------------------------------

// Same columns as tests/data/go-sizeclasses.csv minus max_waste_pct, so the
// output can be diffed against Go's table.
int print_size_classes(std::ostream& out) {
  out << "class,bytes_obj,bytes_span,objects,tail_waste\n";
  for (std::size_t c = 1; c < shmalloc::num_size_classes; ++c) {
    const auto cls = static_cast<std::uint8_t>(c);
    out << c << ',' << shmalloc::class_to_size(cls) << ',' << shmalloc::class_span_bytes(cls) << ','
        << shmalloc::class_to_objects(cls) << ',' << shmalloc::size_class_table[c].tail_waste << '\n';
  }
  out.flush();
  return out ? exit_ok : exit_failure;  // e.g. stdout is a full disk
}

subcommand add_size_classes(CLI::App& root) {
  CLI::App* app =
      root.add_subcommand("size-classes", "Print the compiled-in size-class table as CSV (no daemon needed)");
  return {app, [] { return print_size_classes(std::cout); }};
}

// ---- commands that ask the daemon ------------------------------------------

using shmalloc::proto::msg;
using json = nlohmann::ordered_json;

struct daemon_options {
  std::string socket = shmalloc::default_socket_path();
  bool json = false;
  bool all = false;  // classes: every size class, not only those in use
  // leaks: one client (by id or pid), and the growth window
  std::uint32_t client = 0;
  std::uint32_t pid = 0;
  std::uint32_t window_s = shmalloc::proto::default_leak_window_s;
  // leaks --sites: the sampled allocations' call sites, of objects at least this old
  bool sites = false;
  double older_than_s = 0;
};

// Asks the daemon one read-only question and decodes the reply, or prints
// one error line on stderr and returns nullopt. retry: if the daemon refuses
// the request with protocol_error (a daemon from before the request's body
// was known), the request it is asked instead, and the decoder for its reply.
template <class T>
struct question {
  msg request;
  std::vector<std::uint8_t> body;
  std::function<std::optional<T>(std::span<const std::uint8_t>)> decode;
};
template <class T>
std::optional<T> ask(const daemon_options& o, const question<T>& q, const std::optional<question<T>>& retry = {}) {
  shmalloc::control_client c(o.socket);
  if (!c.connected()) {
    std::cerr << "shmallocctl: no shmallocd answers on " << o.socket << "\n";
    return std::nullopt;
  }
  const question<T>* asked = &q;
  auto body = c.request(q.request, q.body);
  if (!body && body.code() == shmalloc::errc::protocol_error && retry) {
    asked = &*retry;
    body = c.request(retry->request, retry->body);
  }
  if (!body) {
    std::cerr << "shmallocctl: shmallocd on " << o.socket << ": " << body.err().message << "\n";
    return std::nullopt;
  }
  auto reply = asked->decode(body.value());
  if (!reply) std::cerr << "shmallocctl: malformed reply from shmallocd on " << o.socket << "\n";
  return reply;
}
template <class T>
std::optional<T> ask(const daemon_options& o, msg request, std::optional<T> (*decode)(std::span<const std::uint8_t>)) {
  return ask(o, question<T>{request, {}, decode});
}

// JSON as text; bytes that are not UTF-8 (a client's name is its own) become U+FFFD.
std::string dump(const json& j) { return j.dump(2, ' ', false, json::error_handler_t::replace); }

int flush_stdout() {
  std::cout.flush();
  return std::cout ? exit_ok : exit_failure;  // e.g. stdout is a full disk
}

// memcached-tool's display: a header row, then each column as wide as its
// widest cell; text columns (all cells strings) left-aligned, the rest right.
void print_table(const std::vector<std::string>& columns, const json& rows) {
  std::vector<std::vector<std::string>> cells{columns};
  std::vector<bool> text(columns.size(), true);
  for (const auto& row : rows) {
    auto& line = cells.emplace_back();
    for (std::size_t i = 0; i < columns.size(); ++i) {
      const json& v = row.at(columns[i]);
      text[i] = text[i] && v.is_string();
      line.push_back(v.is_string() ? v.get<std::string>() : v.dump());
    }
  }
  std::vector<std::size_t> width(columns.size(), 0);
  for (const auto& line : cells)
    for (std::size_t i = 0; i < line.size(); ++i) width[i] = std::max(width[i], line[i].size());
  for (const auto& line : cells) {
    std::string out;
    for (std::size_t i = 0; i < line.size(); ++i) {
      const std::string pad(width[i] - line[i].size(), ' ');
      out += (i ? "  " : "") + (text[i] ? line[i] + pad : pad + line[i]);
    }
    while (!out.empty() && out.back() == ' ') out.pop_back();
    std::cout << out << '\n';
  }
}

// ---- stats, ping ------------------------------------------------------------

// Flat "name value" lines (like redis-cli INFO), or one JSON object.
int print_stats(const daemon_options& o) {
  auto s = ask(o, msg::stats, &shmalloc::proto::decode_stats);
  if (!s) return exit_failure;
  json j;
#define SHMALLOC_X(name) j[#name] = s->name;
  SHMALLOC_PROTO_STATS(SHMALLOC_X)
#undef SHMALLOC_X
  if (o.json) {
    std::cout << dump(j) << '\n';
  } else {
    for (const auto& [name, value] : j.items()) std::cout << name << ' ' << value << '\n';
  }
  return flush_stdout();
}

int ping(const daemon_options& o) {
  if (!ask(o, msg::stats, &shmalloc::proto::decode_stats)) return exit_failure;
  if (o.json) std::cout << R"({"ok": true})" << '\n';
  else std::cout << "ok\n";
  return flush_stdout();
}

// ---- classes ----------------------------------------------------------------

// A class row's columns and JSON keys are its wire fields (proto::wire<class_row>).
const std::vector<std::string> class_columns = shmalloc::proto::field_names<shmalloc::proto::class_row>();

json class_json(const shmalloc::proto::class_row& r) {
  json j;
  shmalloc::proto::for_each_field(r, [&](std::string_view name, const auto& value) { j[std::string(name)] = value; });
  return j;
}

// Per size class; only classes with a span or a malloc unless --all.
int print_classes(const daemon_options& o) {
  auto t = ask(o, msg::classes, &shmalloc::proto::decode_class_table);
  if (!t) return exit_failure;
  json rows = json::array();
  for (const auto& r : t->rows)
    if (o.all || r.spans_partial + r.spans_full + r.spans_cached != 0 || r.mallocs != 0) rows.push_back(class_json(r));
  if (o.json) std::cout << dump(json{{"classes", rows}}) << '\n';
  else print_table(class_columns, rows);
  return flush_stdout();
}

// ---- clients ----------------------------------------------------------------

const std::vector<std::string> client_columns{"id",           "pid",        "pid_in_client", "name",
                                              "host",         "container",  "bytes_held",    "objects_live",
                                              "spans_held",   "large_objects", "connected_since",
                                              "connected_seconds_ago"};

std::uint64_t unix_now_ns() {
  return static_cast<std::uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::system_clock::now().time_since_epoch()).count());
}

// "2026-01-31T12:34:56Z"
std::string iso8601_utc(std::uint64_t unix_ns) {
  const auto t = static_cast<std::time_t>(unix_ns / 1'000'000'000);
  std::tm tm{};
  char buf[32];
  if (gmtime_r(&t, &tm) == nullptr || std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0) return "?";
  return buf;
}

// A client names itself: control characters would reach the terminal.
std::string printable(std::string name) {
  for (char& ch : name)
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f) ch = '?';
  return name;
}

// pid: the daemon's view, from the socket; null when the client's pid is
// not in the daemon's PID namespace (another container). pid_in_client:
// what the client said in hello (its own namespace's); host and container:
// where it said it runs (null if it did not: a client from before them, or
// no container). From a daemon that predates them, all three are null.
json client_json(const shmalloc::proto::client_row& r, shmalloc::proto::client_rows format, std::uint64_t now_ns) {
  const std::uint64_t ago = now_ns > r.connected_unix_ns ? (now_ns - r.connected_unix_ns) / 1'000'000'000 : 0;
  const bool identity = format == shmalloc::proto::client_rows::identity;
  auto text_or_null = [&](const std::string& s) { return identity && !s.empty() ? json(printable(s)) : json(nullptr); };
  return {{"id", r.id},
          {"pid", r.pid != 0 ? json(r.pid) : json(nullptr)},
          {"pid_in_client", identity ? json(r.pid_in_client) : json(nullptr)},
          {"name", printable(r.name)},
          {"host", text_or_null(r.host)},
          {"container", text_or_null(r.container)},
          {"bytes_held", r.bytes_held},
          {"objects_live", r.objects_live},
          {"spans_held", r.spans},
          {"large_objects", r.large_objects},
          {"connected_since", iso8601_utc(r.connected_unix_ns)},
          {"connected_seconds_ago", ago}};
}

// Per connected client. The reply is one frame: past about 600 clients the
// daemon sends as many as fit and the total, and we say how many are missing.
int print_clients(const daemon_options& o) {
  using shmalloc::proto::client_rows;
  auto rows_of = [](client_rows format) {
    return question<shmalloc::proto::client_table_msg>{
        msg::clients, shmalloc::proto::encode_clients_request(format),
        [format](std::span<const std::uint8_t> p) { return shmalloc::proto::decode_client_table(p, format); }};
  };
  // A daemon from before identity rows refuses a clients request with a body: ask it for basic rows.
  auto t = ask(o, rows_of(client_rows::identity), {rows_of(client_rows::basic)});
  if (!t) return exit_failure;
  const std::uint64_t now = unix_now_ns();
  json rows = json::array();
  for (const auto& r : t->rows) rows.push_back(client_json(r, t->format, now));
  const std::size_t left_out = t->total - t->rows.size();
  if (o.json) {
    std::cout << dump(json{{"total", t->total}, {"shown", t->rows.size()}, {"left_out", left_out}, {"clients", rows}})
              << '\n';
  } else {
    for (json& row : rows)
      for (const char* column : {"pid", "pid_in_client", "host", "container"})
        if (row[column].is_null()) row[column] = "-";
    print_table(client_columns, rows);
    if (left_out != 0)
      std::cout << "(" << left_out << " of " << t->total << " clients left out: the reply is limited to "
                << shmalloc::proto::max_payload / 1024 << " KiB)\n";
  }
  return flush_stdout();
}

// ---- spans ------------------------------------------------------------------

json spans_json(const shmalloc::proto::page_table_msg& p) {
  json j;
  j["page_size"] = p.page_size;
  const std::pair<const char*, std::uint64_t> page_counts[] = {
      {"capacity", p.pages_capacity}, {"committed", p.pages_committed}, {"in_use", p.pages_in_use},
      {"free", p.pages_free},         {"released", p.pages_released}};
  for (const auto& [name, pages] : page_counts) {
    j[std::string("pages_") + name] = pages;
    j[std::string("bytes_") + name] = pages * p.page_size;
  }
  j["runs_in_use"] = p.runs_in_use;
  j["runs_free"] = p.runs_free;
  j["runs_released"] = p.runs_released;
  j["largest_free_run_pages"] = p.largest_free_run_pages;
  j["largest_free_run_bytes"] = p.largest_free_run_pages * p.page_size;
  j["spans_in_use"] = p.spans_in_use;
  j["large_spans"] = p.large_spans;
  return j;
}

// Text: pages, bytes and runs per kind of page, then the span counts.
void print_spans_text(const json& j) {
  json rows = json::array();
  for (const char* kind : {"capacity", "committed", "in_use", "free", "released"}) {
    const std::string runs = std::string("runs_") + kind;
    rows.push_back({{"kind", kind},
                    {"pages", j[std::string("pages_") + kind]},
                    {"bytes", j[std::string("bytes_") + kind]},
                    {"runs", j.contains(runs) ? j[runs] : json("-")}});
  }
  rows.push_back({{"kind", "largest_free_run"},
                  {"pages", j["largest_free_run_pages"]},
                  {"bytes", j["largest_free_run_bytes"]},
                  {"runs", "-"}});
  print_table({"kind", "pages", "bytes", "runs"}, rows);
  std::cout << '\n';
  print_table({"spans_in_use", "large_spans"}, json::array({j}));
}

// The page map: what is committed, in use, free and released, in runs.
int print_spans(const daemon_options& o) {
  auto p = ask(o, msg::pages, &shmalloc::proto::decode_page_table);
  if (!p) return exit_failure;
  const json j = spans_json(*p);
  if (o.json) std::cout << dump(j) << '\n';
  else print_spans_text(j);
  return flush_stdout();
}

// ---- caches -----------------------------------------------------------------

const std::vector<std::string> cache_columns{"name", "max_bytes", "items", "bytes", "retired_bytes", "hits", "misses",
                                             "hit_ratio", "puts", "evictions", "expirations", "repairs", "readers"};

// hits / (hits + misses) to three places; null before the first lookup.
json hit_ratio(std::uint64_t hits, std::uint64_t misses) {
  if (hits + misses == 0) return nullptr;
  return std::round(1000.0 * static_cast<double>(hits) / static_cast<double>(hits + misses)) / 1000.0;
}

json cache_json(const shmalloc::proto::cache_row& r) {
  return {{"name", printable(r.name)},
          {"max_bytes", r.max_bytes},
          {"items", r.items},
          {"bytes", r.bytes},
          {"retired_bytes", r.retired_bytes},
          {"hits", r.hits},
          {"misses", r.misses},
          {"hit_ratio", hit_ratio(r.hits, r.misses)},
          {"puts", r.puts},
          {"evictions", r.evictions},
          {"expirations", r.expirations},
          {"repairs", r.repairs},
          {"readers", r.readers}};
}

// Per shared cache, by name. Like clients, the reply is one frame: past
// about 400 caches the daemon sends as many as fit and the total.
int print_caches(const daemon_options& o) {
  auto t = ask(o, msg::caches, &shmalloc::proto::decode_cache_table);
  if (!t) return exit_failure;
  json rows = json::array();
  for (const auto& r : t->rows) rows.push_back(cache_json(r));
  const std::size_t left_out = t->total - t->rows.size();
  if (o.json) {
    std::cout << dump(json{{"total", t->total}, {"shown", t->rows.size()}, {"left_out", left_out}, {"caches", rows}})
              << '\n';
    return flush_stdout();
  }
  for (json& row : rows)
    if (row["hit_ratio"].is_null()) row["hit_ratio"] = "-";
  print_table(cache_columns, rows);
  if (left_out != 0)
    std::cout << "(" << left_out << " of " << t->total << " caches left out: the reply is limited to "
              << shmalloc::proto::max_payload / 1024 << " KiB)\n";
  return flush_stdout();
}

// ---- advise -----------------------------------------------------------------

const std::vector<std::string> advise_columns{"class",        "object_size",     "samples",       "mean_request",
                                              "waste_pct",    "live_bytes",      "wasted_bytes",  "wasted_heap_pct",
                                              "split_at",     "split_covers",    "saved_bytes",   "saved_heap_pct"};

double percent(double part, double whole) { return whole > 0 ? std::round(part / whole * 1000.0) / 10.0 : 0.0; }

// One class's internal fragmentation, from its sampled requests: the mean
// request against the object size, applied to its live bytes; and the one
// extra class boundary inside it (a multiple of 8, at a bucket's top) that
// would save most: the sampled requests at or under it would take it.
json advice_json(const shmalloc::proto::advise_row& r, std::uint64_t heap_inuse) {
  const double n = static_cast<double>(r.samples());
  const double size = r.object_size;
  const double mean = r.requested_bytes / n;
  const double live_bytes = static_cast<double>(r.objects_live) * size;
  const double wasted = live_bytes * (size - mean) / size;
  std::uint64_t best_at = 0, best_lo = 0;
  double best_saved = 0;
  std::uint64_t under = 0;
  for (std::uint32_t k = 0; k + 1 < shmalloc::request_buckets; ++k) {
    under += r.buckets[k];
    const std::uint64_t at = (shmalloc::request_bucket_top(r.size_class, k) + 7) / 8 * 8;
    if (at >= r.object_size) break;
    const double saved = static_cast<double>(r.objects_live) * (static_cast<double>(under) / n) * (size - static_cast<double>(at));
    if (saved > best_saved || (best_at == 0 && under != 0)) {
      best_saved = saved;
      best_at = at;
      best_lo = shmalloc::request_floor(r.size_class) + 1;
    }
  }
  const auto bytes = [](double b) { return static_cast<std::uint64_t>(std::llround(b)); };
  return {{"class", r.size_class},
          {"object_size", r.object_size},
          {"samples", r.samples()},
          {"mean_request", std::round(mean * 10.0) / 10.0},
          {"waste_pct", percent(size - mean, size)},
          {"live_bytes", bytes(live_bytes)},
          {"wasted_bytes", bytes(wasted)},
          {"wasted_heap_pct", percent(wasted, static_cast<double>(heap_inuse))},
          {"split_at", best_at != 0 ? json(best_at) : json(nullptr)},
          {"split_covers", best_at != 0 ? json(std::to_string(best_lo) + ".." + std::to_string(best_at)) : json("-")},
          {"saved_bytes", bytes(best_saved)},
          {"saved_heap_pct", percent(best_saved, static_cast<double>(heap_inuse))}};
}

// Per size class with sampled requests, the most wasted bytes first.
int print_advice(const daemon_options& o) {
  auto t = ask(o, msg::advise, &shmalloc::proto::decode_advise_table);
  if (!t) return exit_failure;
  json rows = json::array();
  for (const auto& r : t->rows)
    if (r.samples() != 0) rows.push_back(advice_json(r, t->heap_inuse_bytes));
  std::stable_sort(rows.begin(), rows.end(), [](const json& a, const json& b) {
    return a["wasted_bytes"].get<std::uint64_t>() > b["wasted_bytes"].get<std::uint64_t>();
  });
  if (o.json) std::cout << dump(json{{"heap_inuse_bytes", t->heap_inuse_bytes}, {"classes", rows}}) << '\n';
  else print_table(advise_columns, rows);
  return flush_stdout();
}

// ---- leaks ------------------------------------------------------------------

const std::vector<std::string> leak_columns{"id",           "pid",                 "name",       "live_bytes",
                                            "growth_bytes", "growth_over_seconds", "bytes_held", "large_bytes",
                                            "top_classes",  "sampled_live_over_60s"};

// Per client, what its live samples (SHMALLOC_PROFILE_RATE) say of its
// objects' ages: estimated bytes in all, and of objects live longer than
// 10 s, 60 s and 600 s. Clients that sample nothing have no entry.
std::map<std::uint32_t, json> sampled_ages(const shmalloc::proto::site_table_msg& sites) {
  std::map<std::uint32_t, json> by_client;
  for (const auto& r : sites.rows) {
    json& a = by_client[r.client];
    if (a.is_null()) {
      a = {{"estimated_bytes", 0}};
      for (std::uint64_t bound : shmalloc::proto::site_age_bounds_s) a["older_than_" + std::to_string(bound) + "s"] = 0;
    }
    a["estimated_bytes"] = a["estimated_bytes"].get<std::uint64_t>() + r.estimated_bytes;
    for (std::size_t k = 0; k < std::size(shmalloc::proto::site_age_bounds_s); ++k) {
      const std::string key = "older_than_" + std::to_string(shmalloc::proto::site_age_bounds_s[k]) + "s";
      a[key] = a[key].get<std::uint64_t>() + r.aged_bytes[k];
    }
  }
  return by_client;
}

json leak_json(const shmalloc::proto::leak_row& r) {
  json classes = json::array();
  for (const auto& c : r.classes) {
    const std::uint64_t size = shmalloc::class_to_size(c.size_class);
    classes.push_back({{"class", c.size_class}, {"object_size", size}, {"objects", c.objects}, {"bytes", c.objects * size}});
  }
  std::stable_sort(classes.begin(), classes.end(), [](const json& a, const json& b) {
    return a["bytes"].get<std::uint64_t>() > b["bytes"].get<std::uint64_t>();
  });
  std::string top;  // "48x20000 112x5000": object size x objects, the three biggest
  for (std::size_t i = 0; i < classes.size() && i < 3; ++i)
    top += (i ? " " : "") + classes[i]["object_size"].dump() + "x" + classes[i]["objects"].dump();
  return {{"id", r.id},
          {"pid", r.pid != 0 ? json(r.pid) : json(nullptr)},
          {"name", printable(r.name)},
          {"live_bytes", r.live_bytes},
          {"growth_bytes", r.growth()},
          {"growth_over_seconds", std::round(static_cast<double>(r.then_ago_ns) / 1e8) / 10.0},
          {"bytes_held", r.bytes_held},
          {"large_objects", r.large_objects},
          {"large_bytes", r.large_bytes},
          {"top_classes", top.empty() ? "-" : top},
          {"classes", classes}};
}

// Per client, the top growers first; --client or --pid keeps one.
int print_leaks(const daemon_options& o) {
  using namespace shmalloc::proto;
  auto t = ask(o, question<leak_table_msg>{msg::leaks, encode_leaks_request(o.window_s), &decode_leak_table});
  if (!t) return exit_failure;
  auto sites = ask(o, question<site_table_msg>{msg::leak_sites, encode_leak_sites_request(0), &decode_site_table});
  if (!sites) return exit_failure;
  const std::map<std::uint32_t, json> ages = sampled_ages(*sites);
  json rows = json::array();
  for (const auto& r : t->rows) {
    if ((o.client != 0 && r.id != o.client) || (o.pid != 0 && r.pid != o.pid)) continue;
    rows.push_back(leak_json(r));
    const auto a = ages.find(r.id);
    rows.back()["sampled_live"] = a != ages.end() ? a->second : json(nullptr);
  }
  const std::size_t left_out = t->total - t->rows.size();
  if (o.json) {
    std::cout << dump(json{{"window_seconds", t->window_ns / 1'000'000'000}, {"total", t->total},
                           {"shown", t->rows.size()}, {"left_out", left_out}, {"clients", rows}})
              << '\n';
    return flush_stdout();
  }
  for (json& row : rows) {
    if (row["pid"].is_null()) row["pid"] = "-";
    row["sampled_live_over_60s"] = row["sampled_live"].is_null() ? json("-") : row["sampled_live"]["older_than_60s"];
  }
  print_table(leak_columns, rows);
  if (left_out != 0) std::cout << "(" << left_out << " more clients did not fit the reply)\n";
  return flush_stdout();
}

// ---- leaks --sites ------------------------------------------------------------

const std::vector<std::string> site_columns{"pid", "client", "estimated_bytes", "samples", "oldest_seconds", "site",
                                            "called_from"};

// One row of live sampled allocations, its stack named: the site is the
// first frame that is not libshmalloc's.
json site_json(const shmalloc::proto::site_row& r, const shmalloc::service::symbolizer& names) {
  using shmalloc::service::frame_name;
  json frames = json::array();
  std::vector<frame_name> named;
  for (std::size_t f = 0; f < r.pc.size(); ++f) {
    named.push_back(names.name(r.pid, r.pc[f], r.vma[f]));
    frames.push_back({{"function", printable(named.back().function)},
                      {"location", printable(named.back().location)},
                      {"module", printable(named.back().module)},
                      {"vma", r.vma[f]}});
  }
  std::size_t site = 0;
  while (site + 1 < named.size() && shmalloc::service::is_allocator_frame(named[site])) ++site;
  auto where = [&](std::size_t i) {
    return i >= named.size() ? std::string("-")
                             : printable(named[i].function) + (named[i].location.empty() ? "" : " at " + printable(named[i].location));
  };
  return {{"pid", r.pid != 0 ? json(r.pid) : json(nullptr)},
          {"client", r.client},
          {"estimated_bytes", r.estimated_bytes},
          {"samples", r.samples},
          {"sampled_bytes", r.bytes},
          {"oldest_seconds", std::round(static_cast<double>(r.oldest_ns) / 1e8) / 10.0},
          {"newest_seconds", std::round(static_cast<double>(r.newest_ns) / 1e8) / 10.0},
          {"site", named.empty() ? "-" : printable(named[site].function)},
          {"site_location", named.empty() ? "" : printable(named[site].location)},
          {"called_from", where(site + 1)},
          {"frames", frames}};
}

// The sampled allocations still live (SHMALLOC_PROFILE_RATE), by client and
// call site, the most estimated bytes first.
int print_leak_sites(const daemon_options& o) {
  using namespace shmalloc::proto;
  const auto older_than_ns = static_cast<std::uint64_t>(o.older_than_s * 1e9);
  auto t = ask(o, question<site_table_msg>{msg::leak_sites, encode_leak_sites_request(older_than_ns), &decode_site_table});
  if (!t) return exit_failure;
  shmalloc::service::symbolizer names;
  std::vector<const site_row*> kept;
  for (const auto& r : t->rows)
    if ((o.client == 0 || r.client == o.client) && (o.pid == 0 || r.pid == o.pid)) kept.push_back(&r);
  for (const site_row* r : kept)
    for (std::size_t f = 0; f < r->pc.size(); ++f) names.want(r->pid, r->pc[f], r->vma[f]);
  names.resolve();
  json rows = json::array();
  for (const site_row* r : kept) rows.push_back(site_json(*r, names));
  if (o.json) {
    std::cout << dump(json{{"older_than_seconds", o.older_than_s}, {"table_capacity", t->capacity},
                           {"table_live", t->live}, {"sites", rows}})
              << '\n';
    return flush_stdout();
  }
  for (json& row : rows) {
    if (row["pid"].is_null()) row["pid"] = "-";
    if (!row["site_location"].get<std::string>().empty())
      row["site"] = row["site"].get<std::string>() + " at " + row["site_location"].get<std::string>();
  }
  print_table(site_columns, rows);
  if (t->live == 0)
    std::cout << "(no sampled allocation is live: clients sample only with SHMALLOC_PROFILE_RATE set)\n";
  else if (t->live == t->capacity)
    std::cout << "(the profile table is full: " << t->capacity << " samples; later allocations go unsampled)\n";
  return flush_stdout();
}

// ---- registration -----------------------------------------------------------

// The connection options, on the root command; subcommands fall through to
// it, so they may come before or after the subcommand.
struct connection_options {
  CLI::Option* socket;
  CLI::Option* json;
};
connection_options add_daemon_options(CLI::App& root, daemon_options& o) {
  const char* group = "Options of every command that asks the daemon (before or after the command)";
  CLI::Option* socket =
      root.add_option("--socket", o.socket, "control socket (default: $SHMALLOC_SOCKET or the standard path)")
          ->group(group);
  CLI::Option* as_json = root.add_flag("--json", o.json, "print JSON")->group(group);
  root.fallthrough();  // inherited by the subcommands added after this
  return {socket, as_json};
}

subcommand add_daemon_command(CLI::App& root, daemon_options& o, const char* name, const char* help,
                              int (*run)(const daemon_options&)) {
  CLI::App* app = root.add_subcommand(name, help);
  app->footer("Also: --socket PATH and --json, before or after the command (see shmallocctl --help).");
  return {app, [&o, run] { return run(o); }};
}

subcommand add_classes(CLI::App& root, daemon_options& o) {
  subcommand cmd = add_daemon_command(root, o, "classes", "Per size class: spans, live objects, bytes in use and wasted",
                                      &print_classes);
  cmd.app->add_flag("--all", o.all, "every size class, not only those with a span or an allocation");
  return cmd;
}

subcommand add_leaks(CLI::App& root, daemon_options& o) {
  subcommand cmd = add_daemon_command(
      root, o, "leaks", "Per client: bytes held and their growth over a window, by size class; the top growers first",
      [](const daemon_options& opt) { return opt.sites ? print_leak_sites(opt) : print_leaks(opt); });
  cmd.app->add_option("--client", o.client, "only the client with this id");
  cmd.app->add_option("--pid", o.pid, "only the client with this pid (as the daemon sees it)");
  cmd.app->add_option("--window", o.window_s, "growth over the last SECONDS (default 60)")
      ->check(CLI::Range(1u, shmalloc::proto::max_leak_window_s));
  CLI::Option* sites = cmd.app->add_flag("--sites", o.sites,
                    "the call sites of live sampled allocations (clients sample with SHMALLOC_PROFILE_RATE=BYTES)");
  cmd.app->add_option("--older-than", o.older_than_s, "with --sites: only objects live at least SECONDS")
      ->check(CLI::Range(0.0, 1e9))
      ->needs(sites);
  return cmd;
}

// ---- main -------------------------------------------------------------------

int usage_error(const CLI::App& root, const std::string& message) {
  std::cerr << "shmallocctl: " << message << "\n\n" << root.help();
  return exit_usage;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App root{"Operator CLI for the shmalloc shared-memory allocator.", "shmallocctl"};
  root.set_version_flag("--version", "shmallocctl " SHMALLOC_VERSION);
  root.require_subcommand(0, 1);  // at most one; none is reported below

  daemon_options daemon;
  const connection_options connection = add_daemon_options(root, daemon);
  const std::vector<subcommand> commands{
      add_size_classes(root),
      add_daemon_command(root, daemon, "stats", "Print the heap's memory summary (MemStats names)", &print_stats),
      add_daemon_command(root, daemon, "ping", "Exit 0 when the daemon answers (a container healthcheck)", &ping),
      add_classes(root, daemon),
      add_daemon_command(root, daemon, "clients", "Per connected client: pid, name, bytes, objects and spans held",
                         &print_clients),
      add_daemon_command(root, daemon, "spans", "The page map: pages committed, in use, free, released; runs; spans",
                         &print_spans),
      add_daemon_command(root, daemon, "caches", "Per shared cache: items, bytes, hits, misses, evictions",
                         &print_caches),
      add_leaks(root, daemon),
      add_daemon_command(root, daemon, "advise",
                         "Per size class: waste from sampled request sizes, and the extra class boundary that would save most",
                         &print_advice),
  };

  try {
    root.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version: print to stdout, exit 0
    return root.exit(e);
  } catch (const CLI::ParseError& e) {
    return usage_error(root, e.what());
  }

  const CLI::App* size_classes = commands.front().app;
  if (size_classes->parsed() && (connection.socket->count() != 0 || connection.json->count() != 0))
    return usage_error(root, "size-classes asks no daemon: --socket and --json do not apply to it");
  for (const auto& cmd : commands)
    if (cmd.app->parsed()) return cmd.run();
  return usage_error(root, "no subcommand given");
}
