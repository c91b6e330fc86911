// shmallocd: the shmalloc heap daemon. See daemon.hpp.
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdio>

#include "service/config.hpp"
#include "service/daemon.hpp"

int main(int argc, char** argv) {
  int exit_code = 0;
  auto settings = shmalloc::service::parse_settings(argc, argv, &exit_code);
  if (!settings) return exit_code;
  spdlog::set_default_logger(spdlog::stderr_color_mt("shmallocd"));
  spdlog::set_level(spdlog::level::from_str(settings->log_level));
  auto d = shmalloc::service::daemon::open(*settings);
  if (!d) {
    spdlog::error("{}", d.err().message);
    return 1;
  }
  d.value()->run();
  return 0;
}
