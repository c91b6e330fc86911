#include "service/config.hpp"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <map>
#include <toml++/toml.h>

#ifndef SHMALLOC_VERSION
#define SHMALLOC_VERSION "0.0.0"
#endif

namespace shmalloc::service {

namespace {
// "512M" -> {512, "M"}; a text that does not start with digits -> {0, "?"}.
std::pair<unsigned long long, std::string> split_number(const std::string& text) {
  if (text.empty() || text[0] < '0' || text[0] > '9') return {0, "?"};
  std::size_t used = 0;
  try {
    const unsigned long long v = std::stoull(text, &used);
    return {v, text.substr(used)};
  } catch (...) {
    return {0, "?"};
  }
}
}  // namespace

std::optional<std::uint64_t> parse_bytes(const std::string& text) {
  auto [v, suffix] = split_number(text);
  if (suffix == "?") return std::nullopt;
  static const std::map<std::string, unsigned> shifts{{"", 0},   {"B", 0},   {"K", 10},   {"KiB", 10},
                                                      {"M", 20}, {"MiB", 20}, {"G", 30}, {"GiB", 30},
                                                      {"T", 40}, {"TiB", 40}};
  auto it = shifts.find(suffix);
  if (it == shifts.end() || (it->second && v > (~0ULL >> it->second))) return std::nullopt;
  return v << it->second;
}

std::optional<std::uint64_t> parse_duration(const std::string& text) {
  auto [v, unit] = split_number(text);
  if (unit == "?") return std::nullopt;
  static const std::map<std::string, std::uint64_t> ns{
      {"ns", 1}, {"us", 1000}, {"ms", 1'000'000}, {"s", 1'000'000'000ULL}, {"m", 60'000'000'000ULL}, {"h", 3'600'000'000'000ULL}};
  if (unit.empty()) return v == 0 ? std::optional<std::uint64_t>(0) : std::nullopt;
  auto it = ns.find(unit);
  if (it == ns.end() || v > ~0ULL / it->second) return std::nullopt;  // "5124096h" would wrap
  return v * it->second;
}

namespace {

struct invalid {
  std::string line;
};

// One setting's raw text from flag, environment, then file.
struct layered {
  std::map<std::string, std::string> flags;
  toml::table file;

  std::optional<std::string> get(const std::string& key) const {
    if (auto it = flags.find(key); it != flags.end()) return it->second;
    std::string env = "SHMALLOC_";
    for (char c : key) env += c == '-' ? '_' : static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    if (const char* e = std::getenv(env.c_str()); e && *e) return std::string(e);
    std::string toml_key = key;
    for (char& c : toml_key) c = c == '-' ? '_' : c;
    if (auto node = file[toml_key]) {
      if (auto s = node.value_exact<std::string>()) return *s;
      if (auto i = node.value_exact<std::int64_t>()) return std::to_string(*i);
      if (auto b = node.value_exact<bool>()) return *b ? "true" : "false";
      // A float, date, array or table: refused, not ignored.
      throw invalid{"shmallocd: invalid --" + key + " in the config file: a string, an integer or true/false"};
    }
    return std::nullopt;
  }
};

template <class T>
T need(std::optional<T> v, const std::string& setting, const std::string& allowed, const std::string& got) {
  if (!v) throw invalid{"shmallocd: invalid --" + setting + " '" + got + "': " + allowed};
  return *v;
}

std::optional<std::uint64_t> parse_uint(const std::string& s) {
  if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos || s.size() > 10) return std::nullopt;
  return std::stoull(s);
}

template <class T>
std::vector<T> parse_id_list(const std::string& text, const std::string& setting) {
  std::vector<T> out;
  std::size_t at = 0;
  while (at <= text.size()) {
    const std::size_t comma = text.find(',', at);
    const std::string part = text.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
    const auto id = parse_uint(part);  // 10 digits at most: the range is checked here
    const bool fits = id && *id <= std::numeric_limits<T>::max();  // not cut: 4294967297 is not uid 1
    out.push_back(static_cast<T>(need(fits ? id : std::nullopt, setting, "a comma-separated list of numeric ids", text)));
    if (comma == std::string::npos) break;
    at = comma + 1;
  }
  return out;
}

// An octal file mode that keeps the owner's read and write bits.
mode_t parse_mode(const std::string& text, const std::string& setting) {
  const bool octal = !text.empty() && text.size() <= 4 && text.find_first_not_of("01234567") == std::string::npos;
  const auto mode = octal ? std::strtoul(text.c_str(), nullptr, 8) : 0UL;
  if (!octal || mode > 0777 || (mode & 0600) != 0600)
    throw invalid{"shmallocd: invalid --" + setting + " '" + text + "': octal, at most 0777, owner rw needed"};
  return static_cast<mode_t>(mode);
}

void apply(const layered& in, daemon_settings& s) {
  if (auto v = in.get("heap")) {
    if (auto why = validate_heap_name(*v); !why.empty()) throw invalid{"shmallocd: invalid --heap '" + *v + "': " + why};
    s.heap.name = *v;
  }
  if (auto v = in.get("capacity"))
    s.heap.capacity = need(parse_bytes(*v), "capacity", "bytes with an optional K, M, G or T suffix, 4M to 1T", *v);
  if (s.heap.capacity < min_capacity || s.heap.capacity > max_capacity)
    throw invalid{"shmallocd: invalid --capacity: must be between 4M and 1T"};
  s.socket_path = in.get("socket").value_or(default_socket_path());
  if (s.socket_path.empty() || s.socket_path.size() >= 108)
    throw invalid{"shmallocd: invalid --socket: a path of 1 to 107 bytes"};
  if (auto v = in.get("socket-mode")) s.socket_mode = parse_mode(*v, "socket-mode");
  if (auto v = in.get("heap-mode")) s.heap.mode = parse_mode(*v, "heap-mode");
  if (auto v = in.get("allow-uid")) s.allow_uids = parse_id_list<uid_t>(*v, "allow-uid");
  if (auto v = in.get("allow-gid")) s.allow_gids = parse_id_list<gid_t>(*v, "allow-gid");
  if (auto v = in.get("quota")) s.quota_bytes = need(parse_bytes(*v), "quota", "bytes with an optional K, M, G suffix (0 = none)", *v);
  if (auto v = in.get("max-caches-per-client")) {
    const auto n = parse_uint(*v);
    if (!n || *n == 0 || *n > default_max_caches)
      throw invalid{"shmallocd: invalid --max-caches-per-client '" + *v + "': a count from 1 to " +
                    std::to_string(default_max_caches)};
    s.max_caches_per_client = static_cast<std::uint32_t>(*n);
  }
  if (auto v = in.get("scavenge-delay"))
    s.scavenge_delay_ns = need(parse_duration(*v), "scavenge-delay", "a duration such as 300s, 5m or 0", *v);
  if (auto v = in.get("hello-timeout"))
    s.hello_timeout_ns = need(parse_duration(*v), "hello-timeout", "a duration such as 10s or 500ms, above 0", *v);
  if (auto v = in.get("frame-timeout"))
    s.frame_timeout_ns = need(parse_duration(*v), "frame-timeout", "a duration such as 5s or 500ms, above 0", *v);
  if (s.hello_timeout_ns == 0 || s.frame_timeout_ns == 0)
    throw invalid{"shmallocd: invalid --hello-timeout or --frame-timeout: must be above 0"};
  if (auto v = in.get("max-connections")) {
    const auto n = parse_uint(*v);
    if (!n || *n == 0 || *n > 65536)
      throw invalid{"shmallocd: invalid --max-connections '" + *v + "': a count from 1 to 65536"};
    s.max_connections = static_cast<std::uint32_t>(*n);
  }
  if (auto v = in.get("reattach-grace"))
    s.reattach_grace_ns = need(parse_duration(*v), "reattach-grace", "a duration such as 30s or 0", *v);
  if (auto v = in.get("sweep-backstop")) {
    s.sweep_backstop_ns = need(parse_duration(*v), "sweep-backstop", "a duration such as 60s or 1s, above 0", *v);
    if (s.sweep_backstop_ns == 0) throw invalid{"shmallocd: invalid --sweep-backstop: must be above 0"};
  }
  if (auto v = in.get("metrics")) {
    const std::size_t colon = v->rfind(':');
    const auto port = colon == std::string::npos ? std::nullopt : parse_uint(v->substr(colon + 1));
    if (*v != "off" && (colon == 0 || !port || *port > 65535))
      throw invalid{"shmallocd: invalid --metrics '" + *v + "': ADDR:PORT (such as 127.0.0.1:9464) or off"};
    s.metrics = *v;
  }
  if (auto v = in.get("log-level")) {
    static const std::vector<std::string> levels{"trace", "debug", "info", "warn", "error", "critical", "off"};
    if (std::find(levels.begin(), levels.end(), *v) == levels.end())
      throw invalid{"shmallocd: invalid --log-level '" + *v + "': one of trace, debug, info, warn, error, critical, off"};
    s.log_level = *v;
  }
}

}  // namespace

std::optional<daemon_settings> parse_settings(int argc, char** argv, int* exit_code) {
  CLI::App app{"shmallocd: the shmalloc shared-memory heap daemon"};
  app.set_version_flag("--version", std::string("shmallocd ") + SHMALLOC_VERSION);
  layered in;
  daemon_settings s;
  const std::vector<std::pair<std::string, std::string>> options{
      {"heap", "heap name (default shmalloc)"},
      {"capacity", "heap capacity in bytes, K/M/G suffixes (default 4G)"},
      {"socket", "control socket path"},
      {"socket-mode", "control socket mode, octal (default 0660)"},
      {"heap-mode", "shared-memory object mode, octal (default 0600)"},
      {"allow-uid", "uids allowed to connect, comma-separated (besides ours and root)"},
      {"allow-gid", "gids allowed to connect, comma-separated"},
      {"quota", "per-client byte quota (default none)"},
      {"max-caches-per-client", "cache slots one client may hold: its connection's and one per allocating thread (default 256 of the heap's 1024)"},
      {"scavenge-delay", "return pages idle this long to the OS (default 300s)"},
      {"hello-timeout", "close connections that do not say hello within this (default 10s)"},
      {"frame-timeout", "close connections that leave a frame incomplete this long (default 5s)"},
      {"max-connections", "connections served at once, each by a thread of its own; more are refused (default 1024)"},
      {"reattach-grace", "after adopting a heap, how long clients of the old daemon have to reattach (default 30s)"},
      {"sweep-backstop", "one pass of the backstop sweep over every span, for frees whose freer died mid-push (default 60s)"},
      {"metrics", "ADDR:PORT to serve Prometheus /metrics on, or off (default 127.0.0.1:9464, loopback only; port 0 picks a free port)"},
      {"log-level", "trace, debug, info, warn, error, critical or off"}};
  for (const auto& [name, help] : options) {
    app.add_option_function<std::string>("--" + name, [&in, name = name](const std::string& v) { in.flags[name] = v; },
                                         help);
  }
  app.add_option("--config", s.config_file, "TOML config file (flags win over SHMALLOC_* variables, which win over it)");
  app.add_flag("--keep-heap", s.keep_heap, "keep the heap object when stopping (a restarted daemon adopts it)");
  app.add_flag("--fresh", s.fresh, "discard a heap left by a daemon that died and create it anew");
  try {
    app.parse(argc, argv);
  } catch (const CLI::Success& e) {
    *exit_code = app.exit(e);
    return std::nullopt;
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "shmallocd: %s\n", e.what());
    *exit_code = 2;
    return std::nullopt;
  }
  if (s.config_file.empty())
    if (const char* c = std::getenv("SHMALLOC_CONFIG"); c && *c) s.config_file = c;
  s.flags = in.flags;
  std::string why;
  auto loaded = load_layers(s, &why);
  if (!loaded) {
    std::fprintf(stderr, "%s\n", why.c_str());
    *exit_code = 2;
  }
  return loaded;
}

std::optional<daemon_settings> load_layers(const daemon_settings& base, std::string* why) {
  layered in;
  in.flags = base.flags;
  daemon_settings s;  // defaults, so a setting dropped from the file reverts
  s.config_file = base.config_file;
  s.flags = base.flags;
  s.keep_heap = base.keep_heap;
  s.fresh = base.fresh;
  try {
    if (!s.config_file.empty()) {
      try {
        in.file = toml::parse_file(s.config_file);
      } catch (const toml::parse_error& e) {
        throw invalid{"shmallocd: invalid --config '" + s.config_file + "': " + std::string(e.description())};
      }
    }
    apply(in, s);
  } catch (const invalid& e) {
    *why = e.line;
    // One line: a value quoted in it may hold a newline or escape codes.
    for (char& c : *why)
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
    return std::nullopt;
  }
  return s;
}

}  // namespace shmalloc::service
