// Fuzz target: one input is a TOML config file, read by shmallocd's own
// entry point for it (load_layers, as at start-up and on SIGHUP; no flag and
// no SHMALLOC_* variable in the way). Either it is refused with one line
// that names a setting ("shmallocd: invalid --...", no control character),
// or every setting is in its documented range, and each the file gives as a
// number of bytes, a duration or a list of ids is the value it says: byte
// sizes and durations against a reference in 128-bit arithmetic (a value
// that does not fit 64 bits must be refused, not wrapped), ids as written
// (one that does not fit 32 bits must be refused, not truncated). A known
// setting whose TOML value is not a string, an integer or a boolean must be
// refused, not ignored.
//
// The file is a memfd named by /proc/self/fd: nothing is written anywhere.
// With clang and -DSHMALLOC_FUZZ=ON this is a libFuzzer target
// (tools/fuzz.sh); otherwise replay.cpp drives it (ctest: config_fuzz_replay).
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <toml++/toml.h>
#include <vector>

#include "fuzz/replay.hpp"
#include "service/config.hpp"

extern char** environ;

using namespace shmalloc;
__extension__ typedef unsigned __int128 u128;

namespace {

[[noreturn]] void fail(const std::string& why, std::string_view input) {
  std::fprintf(stderr, "config_fuzz: %s\n--- input ---\n%.*s\n---\n", why.c_str(), static_cast<int>(input.size()),
               input.data());
  std::abort();
}

// The memfd the input is written to, and no SHMALLOC_* variable.
struct config_file {
  int fd = -1;
  std::string path;
  config_file() {
    std::vector<std::string> ours;
    for (char** e = environ; *e; ++e)
      if (std::strncmp(*e, "SHMALLOC_", 9) == 0) ours.emplace_back(*e, std::strchr(*e, '=') - *e);
    for (const std::string& name : ours) unsetenv(name.c_str());
    fd = memfd_create("config_fuzz", MFD_CLOEXEC);
    if (fd < 0) std::abort();
    path = "/proc/self/fd/" + std::to_string(fd);
  }
  void write(const std::uint8_t* data, std::size_t size) const {
    if (ftruncate(fd, 0) != 0 || (size > 0 && pwrite(fd, data, size, 0) != static_cast<ssize_t>(size))) std::abort();
  }
};

// The number a text starts with (decimal digits, at least one) and the rest.
std::optional<std::pair<u128, std::string>> leading_number(const std::string& t) {
  std::size_t i = 0;
  u128 v = 0;
  while (i < t.size() && t[i] >= '0' && t[i] <= '9') {
    v = std::min<u128>(v * 10 + static_cast<unsigned>(t[i] - '0'), u128{1} << 100);  // saturates: too big anyway
    ++i;
  }
  if (i == 0) return std::nullopt;
  return std::make_pair(v, t.substr(i));
}

std::optional<std::uint64_t> fits(u128 v) {
  if (v > ~std::uint64_t{0}) return std::nullopt;
  return static_cast<std::uint64_t>(v);
}

// Bytes as config.hpp documents them: digits and "", B, K, KiB, M, MiB, G, GiB, T, TiB.
std::optional<std::uint64_t> reference_bytes(const std::string& t) {
  auto n = leading_number(t);
  if (!n) return std::nullopt;
  const std::vector<std::pair<std::string, int>> units{{"", 0},   {"B", 0},    {"K", 10}, {"KiB", 10}, {"M", 20},
                                                       {"MiB", 20}, {"G", 30}, {"GiB", 30}, {"T", 40}, {"TiB", 40}};
  for (const auto& [unit, shift] : units)
    if (n->second == unit) return n->first > ~std::uint64_t{0} ? std::nullopt : fits(n->first << shift);
  return std::nullopt;
}

// Durations: digits and ns, us, ms, s, m or h; a bare number only if 0.
std::optional<std::uint64_t> reference_duration(const std::string& t) {
  auto n = leading_number(t);
  if (!n) return std::nullopt;
  if (n->second.empty()) return n->first == 0 ? std::optional<std::uint64_t>(0) : std::nullopt;
  const std::vector<std::pair<std::string, std::uint64_t>> units{
      {"ns", 1}, {"us", 1000}, {"ms", 1'000'000}, {"s", 1'000'000'000ULL}, {"m", 60'000'000'000ULL}, {"h", 3'600'000'000'000ULL}};
  for (const auto& [unit, ns] : units)
    if (n->second == unit) return n->first > ~std::uint64_t{0} ? std::nullopt : fits(n->first * ns);
  return std::nullopt;
}

// A setting's text in the file, as load_layers reads it; nullopt if absent
// or of another type.
std::optional<std::string> text_of(const toml::table& file, const char* key) {
  const auto node = file[key];
  if (const auto* s = node.as_string()) return s->get();
  if (const auto* i = node.as_integer()) return std::to_string(i->get());
  if (const auto* b = node.as_boolean()) return b->get() ? "true" : "false";
  return std::nullopt;
}

constexpr const char* settings[] = {"heap",          "capacity",      "socket",         "socket_mode",
                                    "heap_mode",     "allow_uid",     "allow_gid",      "quota",
                                    "max_caches_per_client", "scavenge_delay", "hello_timeout", "frame_timeout",
                                    "max_connections", "reattach_grace", "metrics",     "log_level"};

void check_ids(const std::vector<unsigned>& ids, const std::optional<std::string>& text, std::string_view in) {
  if (!text) return;
  std::string written;
  for (unsigned id : ids) written += (written.empty() ? "" : ",") + std::to_string(id);
  std::string expected;  // the text without leading zeros
  std::size_t at = 0;
  while (at <= text->size()) {
    std::size_t comma = text->find(',', at);
    if (comma == std::string::npos) comma = text->size();
    std::string part = text->substr(at, comma - at);
    part.erase(0, std::min(part.find_first_not_of('0'), part.size() - 1));
    expected += (expected.empty() ? "" : ",") + part;
    at = comma + 1;
  }
  if (written != expected) fail("ids '" + *text + "' were read as '" + written + "'", in);
}

void check_settings(const service::daemon_settings& s, const toml::table& file, std::string_view in) {
  auto expect = [&](bool ok, const char* what) {
    if (!ok) fail(std::string("accepted settings break: ") + what, in);
  };
  expect(validate_heap_name(s.heap.name).empty(), "a valid heap name");
  expect(s.heap.capacity >= min_capacity && s.heap.capacity <= max_capacity, "capacity from 4M to 1T");
  expect(!s.socket_path.empty() && s.socket_path.size() < 108, "a socket path of 1 to 107 bytes");
  expect(s.socket_mode <= 0777 && (s.socket_mode & 0600) == 0600, "socket mode with owner rw");
  expect(s.heap.mode <= 0777 && (s.heap.mode & 0600) == 0600, "heap mode with owner rw");
  expect(s.max_caches_per_client >= 1 && s.max_caches_per_client <= default_max_caches, "cache slots in range");
  expect(s.hello_timeout_ns > 0 && s.frame_timeout_ns > 0, "timeouts above 0");
  expect(s.max_connections >= 1 && s.max_connections <= 65536, "max connections from 1 to 65536");
  expect(s.metrics == "off" || s.metrics.rfind(':') != std::string::npos, "metrics ADDR:PORT or off");
  const std::vector<std::string> levels{"trace", "debug", "info", "warn", "error", "critical", "off"};
  expect(std::find(levels.begin(), levels.end(), s.log_level) != levels.end(), "a log level");
  // The values the file wrote, read exactly.
  auto same = [&](const char* key, std::uint64_t got, std::optional<std::uint64_t> (*ref)(const std::string&)) {
    if (auto t = text_of(file, key); t && ref(*t) != got)
      fail(std::string(key) + " '" + *t + "' was read as " + std::to_string(got), in);
  };
  same("capacity", s.heap.capacity, reference_bytes);
  same("quota", s.quota_bytes, reference_bytes);
  same("scavenge_delay", s.scavenge_delay_ns, reference_duration);
  same("hello_timeout", s.hello_timeout_ns, reference_duration);
  same("frame_timeout", s.frame_timeout_ns, reference_duration);
  same("reattach_grace", s.reattach_grace_ns, reference_duration);
  check_ids(std::vector<unsigned>(s.allow_uids.begin(), s.allow_uids.end()), text_of(file, "allow_uid"), in);
  check_ids(std::vector<unsigned>(s.allow_gids.begin(), s.allow_gids.end()), text_of(file, "allow_gid"), in);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  static const config_file file;
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  file.write(data, size);
  service::daemon_settings base;
  base.config_file = file.path;
  std::string why;
  const auto s = service::load_layers(base, &why);
  // The same text parsed here, to know what the file says.
  std::optional<toml::table> table;
  try {
    table = toml::parse(in);
  } catch (const toml::parse_error&) {
  }
  if (!s) {
    if (why.rfind("shmallocd: invalid --", 0) != 0) fail("refused without naming a setting: " + why, in);
    for (char c : why)
      if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) fail("a refusal that is not one printable line: " + why, in);
    return 0;
  }
  if (!table) fail("a file TOML refuses was accepted", in);
  for (const char* key : settings)
    if ((*table)[key] && !text_of(*table, key)) fail(std::string("setting ") + key + " of another type was ignored", in);
  check_settings(*s, *table, in);
  return 0;
}

namespace shmalloc::fuzz {

// Every setting valid, each edge of each range, and values just outside.
std::vector<std::pair<std::string, input>> fuzz_seeds() {
  return {
      {"all-settings.toml",
       bytes_of("# every setting shmallocd reads from its file\n"
                "heap = \"shmalloc-fuzz\"\ncapacity = \"1G\"\nsocket = \"/run/shmalloc/d.sock\"\n"
                "socket_mode = \"0660\"\nheap_mode = \"0600\"\nallow_uid = \"1000,1001\"\nallow_gid = \"100\"\n"
                "quota = \"512MiB\"\nmax_caches_per_client = 16\nscavenge_delay = \"5m\"\n"
                "hello_timeout = \"10s\"\nframe_timeout = \"500ms\"\nmax_connections = 1024\n"
                "reattach_grace = \"30s\"\nmetrics = \"127.0.0.1:9464\"\nlog_level = \"debug\"\n")},
      {"empty.toml", {}},
      {"comments.toml", bytes_of("# nothing but comments\n\n   # and blank lines\n")},
      {"capacity-int.toml", bytes_of("capacity = 4194304\n")},
      {"capacity-min.toml", bytes_of("capacity = \"4M\"\n")},
      {"capacity-max.toml", bytes_of("capacity = \"1TiB\"\n")},
      {"capacity-below.toml", bytes_of("capacity = \"4194303\"\n")},
      {"capacity-above.toml", bytes_of("capacity = \"1025G\"\n")},
      {"capacity-wraps.toml", bytes_of("capacity = \"17179869184T\"\n")},
      {"capacity-float.toml", bytes_of("capacity = 1.5e9\n")},
      {"capacity-negative.toml", bytes_of("capacity = -1\n")},
      {"bytes-suffixes.toml", bytes_of("capacity = \"2GiB\"\nquota = \"64K\"\n")},
      {"bytes-bad-suffix.toml", bytes_of("quota = \"12Q\"\n")},
      {"duration-units.toml",
       bytes_of("scavenge_delay = \"0\"\nhello_timeout = \"1500us\"\nframe_timeout = \"7ns\"\nreattach_grace = \"2h\"\n")},
      {"duration-wraps.toml", bytes_of("scavenge_delay = \"5124096h\"\n")},
      {"duration-bare.toml", bytes_of("hello_timeout = \"10\"\n")},
      {"timeout-zero.toml", bytes_of("frame_timeout = \"0ms\"\n")},
      {"modes.toml", bytes_of("socket_mode = \"0777\"\nheap_mode = \"600\"\n")},
      {"mode-no-owner.toml", bytes_of("socket_mode = \"0066\"\n")},
      {"mode-not-octal.toml", bytes_of("heap_mode = \"0680\"\n")},
      {"ids-int.toml", bytes_of("allow_uid = 1000\nallow_gid = 0\n")},
      {"ids-32bit.toml", bytes_of("allow_uid = \"4294967295,0001\"\n")},
      {"ids-too-big.toml", bytes_of("allow_uid = \"4294967297\"\n")},
      {"ids-empty-part.toml", bytes_of("allow_gid = \"10,,11\"\n")},
      {"connections-edges.toml", bytes_of("max_connections = 65536\nmax_caches_per_client = 1\n")},
      {"connections-zero.toml", bytes_of("max_connections = 0\n")},
      {"metrics-off.toml", bytes_of("metrics = \"off\"\n")},
      {"metrics-no-addr.toml", bytes_of("metrics = \":9464\"\n")},
      {"metrics-ipv6.toml", bytes_of("metrics = \"[::1]:0\"\n")},
      {"log-level-bad.toml", bytes_of("log_level = \"loud\"\n")},
      {"heap-bad-name.toml", bytes_of("heap = \"../etc\"\n")},
      {"socket-long.toml", bytes_of("socket = \"/" + std::string(107, 's') + "\"\n")},
      {"value-newline.toml", bytes_of("log_level = \"info\\nfake line\"\n")},
      {"table-and-array.toml", bytes_of("unknown = 1\n[section]\ncapacity = \"8G\"\nallow_uid = [1, 2]\n")},
      {"bool-value.toml", bytes_of("heap = true\n")},
      {"not-toml.toml", bytes_of("capacity = \"1G\ncapacity = 2\n[[x\n")},
      {"duplicate-key.toml", bytes_of("capacity = \"1G\"\ncapacity = \"2G\"\n")},
      {"unicode.toml", bytes_of("heap = \"h\\u00e9ap\"\n'log_level' = \"warn\"\n")},
  };
}

}  // namespace shmalloc::fuzz
