#include "proto/identity.hpp"

namespace shmalloc::proto {

namespace {
bool identity_char(char c) noexcept { return c > 0x20 && c < 0x7f; }  // printable ASCII, no space

bool is_container_id(std::string_view s) noexcept {
  if (s.size() != 64) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

constexpr std::size_t short_container_id = 12;  // as docker ps shows it

// Calls f(line) for each line of text; stops when f returns true.
template <class F>
void each_line(std::string_view text, F f) {
  while (!text.empty()) {
    const std::size_t end = text.find('\n');
    if (f(text.substr(0, end))) return;
    if (end == std::string_view::npos) return;
    text.remove_prefix(end + 1);
  }
}
}  // namespace

bool valid_identity(std::string_view s, std::size_t max) noexcept {
  if (s.size() > max) return false;
  for (char c : s)
    if (!identity_char(c)) return false;
  return true;
}

std::string identity_text(std::string_view s, std::size_t max) {
  std::string out(s.substr(0, max));
  for (char& c : out)
    if (!identity_char(c)) c = '?';
  return out;
}

std::string container_from_cgroup(std::string_view cgroup) {
  std::string found;
  each_line(cgroup, [&](std::string_view line) {
    // hierarchy-id:controllers:path
    const std::size_t first = line.find(':');
    const std::size_t second = first == std::string_view::npos ? first : line.find(':', first + 1);
    if (second == std::string_view::npos) return false;
    std::string_view path = line.substr(second + 1);
    // The innermost path component that names a container.
    while (!path.empty()) {
      const std::size_t slash = path.rfind('/');
      std::string_view part = slash == std::string_view::npos ? path : path.substr(slash + 1);
      path = slash == std::string_view::npos ? std::string_view{} : path.substr(0, slash);
      if (part.size() > 6 && part.substr(part.size() - 6) == ".scope") part.remove_suffix(6);
      if (const std::size_t dash = part.rfind('-'); dash != std::string_view::npos) part.remove_prefix(dash + 1);
      if (is_container_id(part)) {
        found = std::string(part.substr(0, short_container_id));
        return true;
      }
    }
    return false;
  });
  return found;
}

std::string container_from_mountinfo(std::string_view mountinfo) {
  std::string found;
  each_line(mountinfo, [&](std::string_view line) {
    // mount-id parent-id major:minor root mount-point options...
    std::string_view field[5];
    for (std::string_view& f : field) {
      const std::size_t sp = line.find(' ');
      f = line.substr(0, sp);
      line = sp == std::string_view::npos ? std::string_view{} : line.substr(sp + 1);
    }
    const std::string_view root = field[3], point = field[4];
    if (point != "/etc/hostname" && point != "/etc/hosts" && point != "/etc/resolv.conf") return false;
    constexpr std::string_view dir = "containers/";
    for (std::size_t at = root.find(dir); at != std::string_view::npos; at = root.find(dir, at + 1)) {
      const std::string_view id = root.substr(at + dir.size(), 64);
      if (is_container_id(id) && root.substr(at + dir.size() + 64, 1) == "/") {
        found = std::string(id.substr(0, short_container_id));
        return true;
      }
    }
    return false;
  });
  return found;
}

}  // namespace shmalloc::proto
