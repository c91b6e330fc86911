// shmallocctl: the operator CLI for shmalloc.
//
// Each subcommand is one add_<name>() that registers it with CLI11 and returns
// what to run when it is chosen; main() only parses and dispatches. The
// commands that will talk to the daemon over its Unix socket (stats, classes,
// clients, spans, ping) slot in the same way; size-classes needs no daemon.
//
// Exit codes: 0 success (also --help, --version), 1 the command failed,
// 2 usage error (no or unknown subcommand, bad option; help goes to stderr).

#include "shm/size_classes.hpp"

#include <CLI/CLI.hpp>

#include <cstdint>
#include <functional>
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

  const std::vector<subcommand> commands{
      add_size_classes(root),
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
