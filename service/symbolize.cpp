// symbolize.cpp: symbolizer (symbolize.hpp).
#include "service/symbolize.hpp"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

extern char** environ;

namespace shmalloc::service {

namespace {

std::string hex(std::uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

// Runs addr2line on `module` for `vmas` (return addresses: each looked up
// one byte back, inside the call). Its output is two lines an address:
// the function, then file:line ("??" for what it does not know).
std::vector<std::pair<std::string, std::string>> addr2line(const std::string& module, const std::vector<std::uint64_t>& vmas) {
  std::vector<std::string> args{"addr2line", "-f", "-C", "-e", module};
  for (std::uint64_t v : vmas) args.push_back(hex(v - 1));
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) return {};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, "/dev/null", O_WRONLY, 0);
  pid_t child = -1;
  const int spawned = posix_spawnp(&child, "addr2line", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(out[1]);
  std::string text;
  if (spawned == 0) {
    char buf[4096];
    for (ssize_t n; (n = read(out[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(n));
  }
  close(out[0]);
  if (spawned != 0) return {};
  int status = 0;
  waitpid(child, &status, 0);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return {};
  std::vector<std::pair<std::string, std::string>> names;
  std::istringstream lines(text);
  for (std::string function, location; std::getline(lines, function) && std::getline(lines, location);)
    names.emplace_back(function, location);
  return names;
}

}  // namespace

const std::vector<symbolizer::mapping>& symbolizer::maps_of(std::uint32_t pid) {
  auto [it, fresh] = maps_.try_emplace(pid);
  if (!fresh || pid == 0) return it->second;
  std::ifstream in("/proc/" + std::to_string(pid) + "/maps");
  for (std::string line; std::getline(in, line);) {
    // start-end perms offset dev inode path
    std::istringstream f(line);
    std::string range, perms, offset, dev, inode, path;
    if (!(f >> range >> perms >> offset >> dev >> inode) || perms.find('x') == std::string::npos) continue;
    std::getline(f >> std::ws, path);
    if (path.empty() || path.front() != '/') continue;  // anonymous, [vdso], ...
    const auto dash = range.find('-');
    if (dash == std::string::npos) continue;
    it->second.push_back({std::stoull(range.substr(0, dash), nullptr, 16), std::stoull(range.substr(dash + 1), nullptr, 16), path});
  }
  return it->second;
}

std::string symbolizer::module_of(std::uint32_t pid, std::uint64_t pc) {
  // A return address may sit just past its call at the very end of a mapping.
  for (const mapping& m : maps_of(pid))
    if (pc - 1 >= m.start && pc - 1 < m.end) {
      // The process may see its files under another root (a container).
      return m.path;
    }
  return {};
}

void symbolizer::want(std::uint32_t pid, std::uint64_t pc, std::uint64_t vma) {
  const auto key = std::make_pair(pid, pc);
  if (module_.count(key) != 0) return;
  const std::string module = module_of(pid, pc);
  module_[key] = module;
  if (!module.empty()) wanted_[{pid, module}].push_back(vma);
}

void symbolizer::resolve() {
  for (auto& [key, vmas] : wanted_) {
    const auto& [pid, module] = key;
    // The process may see its files under another root (a container).
    const std::string rooted = "/proc/" + std::to_string(pid) + "/root" + module;
    const auto found = addr2line(access(rooted.c_str(), R_OK) == 0 ? rooted : module, vmas);
    for (std::size_t i = 0; i < vmas.size(); ++i) {
      frame_name n{hex(vmas[i]), "", module};
      if (i < found.size()) {
        if (found[i].first != "??") n.function = found[i].first;
        if (found[i].second.rfind("??", 0) != 0) n.location = found[i].second;
      }
      names_[{module, vmas[i]}] = n;
    }
  }
  wanted_.clear();
}

frame_name symbolizer::name(std::uint32_t pid, std::uint64_t pc, std::uint64_t vma) const {
  const auto m = module_.find({pid, pc});
  if (m == module_.end() || m->second.empty()) return {hex(vma), "", ""};
  const auto n = names_.find({m->second, vma});
  return n != names_.end() ? n->second : frame_name{hex(vma), "", m->second};
}

bool is_allocator_frame(const frame_name& f) {
  const std::string& fn = f.function;
  if (fn.rfind("shmalloc::client::", 0) == 0 || fn.rfind("shmalloc_", 0) == 0) return true;
  const auto slash = f.module.rfind('/');
  return f.module.compare(slash == std::string::npos ? 0 : slash + 1, 11, "libshmalloc") == 0;
}

}  // namespace shmalloc::service
