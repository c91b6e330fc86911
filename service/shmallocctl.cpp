// shmallocctl: the operator CLI for shmalloc.
//
// Each subcommand is one add_<name>() that registers it with CLI11 and returns
// what to run when it is chosen; main() only parses and dispatches. The
// commands that talk to the daemon over its Unix socket (stats, ping; later
// classes, clients, spans) slot in the same way; size-classes needs no daemon.
//
// Exit codes: 0 success (also --help, --version), 1 the command failed,
// 2 usage error (no or unknown subcommand, bad option; help goes to stderr).

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "shm/control_client.hpp"
#include "shm/size_classes.hpp"

#include <cstdint>
#include <functional>
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

struct daemon_options {
  std::string socket = shmalloc::default_socket_path();
  bool json = false;
};

// The daemon's stats, or an error line on stderr and nullopt.
std::optional<shmalloc::proto::stats_msg> fetch_stats(const daemon_options& o) {
  shmalloc::control_client c(o.socket);
  if (!c.connected()) {
    std::cerr << "shmallocctl: no shmallocd answers on " << o.socket << "\n";
    return std::nullopt;
  }
  auto body = c.request(shmalloc::proto::msg::stats);
  if (!body) {
    std::cerr << "shmallocctl: " << body.err().message << "\n";
    return std::nullopt;
  }
  auto stats = shmalloc::proto::decode_stats(body.value());
  if (!stats) std::cerr << "shmallocctl: malformed stats reply from " << o.socket << "\n";
  return stats;
}

// Flat "name value" lines (like redis-cli INFO), or one JSON object.
int print_stats(const daemon_options& o) {
  auto s = fetch_stats(o);
  if (!s) return exit_failure;
  nlohmann::ordered_json j;
#define SHMALLOC_X(name) j[#name] = s->name;
  SHMALLOC_PROTO_STATS(SHMALLOC_X)
#undef SHMALLOC_X
  if (o.json) {
    std::cout << j.dump(2) << '\n';
  } else {
    for (const auto& [name, value] : j.items()) std::cout << name << ' ' << value << '\n';
  }
  std::cout.flush();
  return std::cout ? exit_ok : exit_failure;
}

int ping(const daemon_options& o) {
  if (!fetch_stats(o)) return exit_failure;
  if (o.json) std::cout << R"({"ok": true})" << '\n';
  else std::cout << "ok\n";
  return exit_ok;
}

void add_daemon_options(CLI::App* app, daemon_options& o) {
  app->add_option("--socket", o.socket, "control socket (default: $SHMALLOC_SOCKET or the standard path)");
  app->add_flag("--json", o.json, "print JSON");
}

subcommand add_stats(CLI::App& root, daemon_options& o) {
  CLI::App* app = root.add_subcommand("stats", "Print the heap's memory summary (MemStats names)");
  add_daemon_options(app, o);
  return {app, [&o] { return print_stats(o); }};
}

subcommand add_ping(CLI::App& root, daemon_options& o) {
  CLI::App* app = root.add_subcommand("ping", "Exit 0 when the daemon answers (a container healthcheck)");
  add_daemon_options(app, o);
  return {app, [&o] { return ping(o); }};
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
  const std::vector<subcommand> commands{
      add_size_classes(root),
      add_stats(root, daemon),
      add_ping(root, daemon),
  };

  try {
    root.parse(argc, argv);
  } catch (const CLI::Success& e) {  // --help, --version: print to stdout, exit 0
    return root.exit(e);
  } catch (const CLI::ParseError& e) {
    return usage_error(root, e.what());
  }

  for (const auto& cmd : commands)
    if (cmd.app->parsed()) return cmd.run();
  return usage_error(root, "no subcommand given");
}
