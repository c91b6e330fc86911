#include "security/security_support.hpp"

#include <doctest/doctest.h>

#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <cstdio>
#include <string>

#include "support/test_heap.hpp"

namespace shmalloc::test {

bool root_or_skip(const char* what) {
  if (geteuid() == 0) return true;
  MESSAGE("SKIPPED: \"" << std::string(what) << "\" needs root, to run peers under another uid; run as root to test it");
  return false;
}

uid_t unused_uid() {
  auto uid = static_cast<uid_t>(2'000'000'000u + static_cast<unsigned>(getpid()) % 100'000'000u);
  while (getpwuid(uid) != nullptr || getgrgid(uid) != nullptr) ++uid;
  return uid;
}

namespace {
// In the child: drops to who's uid and gid; false if it cannot.
bool become(const child_identity& who) {
  if (!who.as_uid) return true;
  const gid_t gid = who.as_gid.value_or(static_cast<gid_t>(*who.as_uid));
  return setgroups(0, nullptr) == 0 && setresgid(gid, gid, gid) == 0 &&
         setresuid(*who.as_uid, *who.as_uid, *who.as_uid) == 0;
}
}  // namespace

// stderr goes to a file, read once the child has ended: a pipe the parent
// did not drain could fill and stop a child that writes much (a sanitizer's
// report).
child_end run_child(const std::function<int()>& fn, const child_identity& who) {
  char path[] = "/tmp/shmalloc-test-stderr-XXXXXX";
  const int err_fd = mkstemp(path);
  REQUIRE(err_fd >= 0);
  unlink(path);
  const int status = run_in_child([&] {
    signal(SIGABRT, SIG_DFL);  // die as the library means to, not through doctest's handler
    dup2(err_fd, STDERR_FILENO);
    return become(who) ? fn() : 125;
  });
  child_end end;
  // run_in_child gives 128 + the signal for a child a signal killed.
  if (status > 128) end.signal = status - 128;
  else end.exit_code = status;
  char buf[4096];
  lseek(err_fd, 0, SEEK_SET);
  for (ssize_t n; (n = read(err_fd, buf, sizeof buf)) > 0;) end.err.append(buf, static_cast<std::size_t>(n));
  close(err_fd);
  return end;
}

}  // namespace shmalloc::test
