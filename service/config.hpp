// config.hpp: shmallocd's settings, from flags, the environment
// (SHMALLOC_*) and a TOML file, in that order of precedence.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "proto/control_client.hpp"
#include "shm/segment.hpp"

namespace shmalloc::service {

struct daemon_settings {
  heap_options heap;
  std::string socket_path;
  mode_t socket_mode = 0660;
  std::vector<uid_t> allow_uids;  // besides the daemon's own uid and root
  std::vector<gid_t> allow_gids;
  std::uint64_t quota_bytes = 0;  // per client, 0 = none
  std::uint32_t max_caches_per_client = default_max_caches / 4;  // cache slots one client may hold
  std::uint64_t scavenge_delay_ns = 300'000'000'000ULL;  // 5 minutes, Go's scavenger spirit
  std::uint64_t hello_timeout_ns = 10'000'000'000ULL;  // a connection must say hello within this
  std::uint64_t frame_timeout_ns = 5'000'000'000ULL;   // and finish any frame it starts within this
  std::uint32_t max_connections = 1024;  // each has a thread in the daemon; more are refused
  std::uint64_t reattach_grace_ns = 30'000'000'000ULL;  // after a restart, orphans wait this long
  // The backstop sweep's pass over every span, for remote frees whose freer
  // was killed before it put their span on the sweep queue.
  std::uint64_t sweep_backstop_ns = 60'000'000'000ULL;
  std::string metrics = "127.0.0.1:9464";  // Prometheus /metrics: ADDR:PORT, or "off"
  std::string log_level = "info";
  std::string config_file;
  bool keep_heap = false;
  bool fresh = false;
  std::map<std::string, std::string> flags;  // the command line's settings, kept for reloads
};

// "4G", "512M", "64K", "1024": bytes, or nullopt.
std::optional<std::uint64_t> parse_bytes(const std::string& text);
// "300s", "5m", "250ms", "0": nanoseconds, or nullopt.
std::optional<std::uint64_t> parse_duration(const std::string& text);

// Parses argv (CLI11), the environment and the config file. On --help or
// --version prints and sets *exit_code = 0; on an invalid value prints one
// line naming the setting and what is allowed to stderr and sets
// *exit_code = 2. Returns nullopt in both cases.
std::optional<daemon_settings> parse_settings(int argc, char** argv, int* exit_code);

// Builds settings from base's command-line flags, the environment and
// base.config_file read anew (SIGHUP). nullopt and *why on an invalid value.
std::optional<daemon_settings> load_layers(const daemon_settings& base, std::string* why);

}  // namespace shmalloc::service
