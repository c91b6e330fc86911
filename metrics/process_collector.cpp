#include "metrics/process_collector.hpp"

#include <dirent.h>
#include <sys/resource.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <sstream>
#include <string>

namespace shmalloc::metrics {

namespace {

using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily one(const char* name, const char* help, MetricType type, double v) {
  MetricFamily f{name, help, type, {}};
  auto& m = f.metric.emplace_back();
  (type == MetricType::Counter ? m.counter.value : m.gauge.value) = v;
  return f;
}

// Fields of /proc/self/stat after the command name, from field 3 (state).
std::vector<std::string> stat_fields() {
  std::ifstream in("/proc/self/stat");
  const std::string line{std::istreambuf_iterator<char>(in), {}};
  const auto close = line.rfind(')');  // the command name may hold spaces and parentheses
  if (close == std::string::npos) return {};
  std::istringstream rest(line.substr(close + 1));
  return {std::istream_iterator<std::string>(rest), {}};
}

double boot_time_seconds() {
  std::ifstream in("/proc/stat");
  std::string key;
  double value = 0;
  while (in >> key) {
    if (key == "btime" && in >> value) return value;
    in.ignore(1 << 20, '\n');
  }
  return 0;
}

double open_fds() {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return 0;
  double n = 0;
  while (const dirent* e = readdir(dir))
    if (e->d_name[0] != '.') ++n;
  closedir(dir);
  return n - 1;  // the directory stream's own fd
}

}  // namespace

std::vector<MetricFamily> process_collector::Collect() const {
  std::vector<MetricFamily> out;
  const std::vector<std::string> f = stat_fields();
  // Indexes into f: field N of proc(5) is f[N - 3].
  if (f.size() > 21) {
    const double tick = static_cast<double>(sysconf(_SC_CLK_TCK));
    const double page = static_cast<double>(sysconf(_SC_PAGESIZE));
    out.push_back(one("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                      MetricType::Counter, (std::stod(f[11]) + std::stod(f[12])) / tick));
    out.push_back(one("process_start_time_seconds", "Start time of the process since unix epoch in seconds.",
                      MetricType::Gauge, boot_time_seconds() + std::stod(f[19]) / tick));
    out.push_back(one("process_virtual_memory_bytes", "Virtual memory size in bytes.", MetricType::Gauge,
                      std::stod(f[20])));
    out.push_back(one("process_resident_memory_bytes", "Resident memory size in bytes.", MetricType::Gauge,
                      std::stod(f[21]) * page));
  }
  out.push_back(one("process_open_fds", "Number of open file descriptors.", MetricType::Gauge, open_fds()));
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) == 0)
    out.push_back(one("process_max_fds", "Maximum number of open file descriptors.", MetricType::Gauge,
                      static_cast<double>(lim.rlim_cur)));
  return out;
}

}  // namespace shmalloc::metrics
