// security_support.hpp: what the security tests share: forked children that
// run as another uid, or that are meant to die, and what they wrote.
#pragma once

#include <sys/types.h>

#include <csignal>
#include <functional>
#include <optional>
#include <string>

namespace shmalloc::test {

// True when the test runs as root. Otherwise says, through doctest, that the
// test named `what` is skipped and why, and returns false: the caller returns
// (a skipped test is said to be skipped, never passed).
bool root_or_skip(const char* what);

// A uid no account uses (no /etc/passwd entry): a high range plus the pid,
// so that tests running in parallel take different ones. Its gid is the
// same number.
uid_t unused_uid();

// How a forked child ended, and everything it wrote to stderr.
struct child_end {
  int exit_code = -1;  // fn's result, if the child exited
  int signal = 0;      // the signal that killed it, if one did
  std::string err;
  bool aborted() const noexcept { return signal == SIGABRT; }
};

// Where a child runs and as whom: as_uid drops to that uid, its gid the
// same number unless as_gid says otherwise (setresgid, then setresuid, with
// no supplementary groups; exit 125 if that fails).
struct child_identity {
  std::optional<uid_t> as_uid;
  std::optional<gid_t> as_gid;
};

inline child_identity as_user(uid_t uid, std::optional<gid_t> gid = std::nullopt) { return {uid, gid}; }

// Runs fn in a forked child (run_in_child, tests/support) as who, with its
// stderr captured and SIGABRT left to kill it (not doctest's handler); the
// child exits with fn's result, which must be below 128. Waits for the child
// to end, whatever the time.
child_end run_child(const std::function<int()>& fn, const child_identity& who = {});

}  // namespace shmalloc::test
