// identity.hpp: where a client runs, as hello tells the daemon: its host
// and its container's short id. The checks both sides apply to what hello
// carries (valid_identity, identity_text), and the client's discovery of its
// container from /proc (container_from_cgroup, container_from_mountinfo),
// kept here, below the client, so that the fuzz and unit tests reach them
// without libshmalloc.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace shmalloc::proto {

// A host or container field fit to go in hello (and to be shown to an
// operator): at most max bytes, each printable ASCII, no space. Empty is valid.
bool valid_identity(std::string_view s, std::size_t max) noexcept;
// s made valid: cut to max bytes, every other byte replaced by '?'.
std::string identity_text(std::string_view s, std::size_t max);
// The short id (the first 12 of 64 hex digits) of the container that a
// /proc/self/cgroup names, or empty: docker's cgroup v1 paths
// (".../docker/<id>"), cgroup v2 with the systemd driver
// ("/system.slice/docker-<id>.scope"; also cri-containerd-, crio- and
// libpod- scopes) or cgroupfs ("/docker/<id>"). With a private cgroup
// namespace (docker's default on cgroup v2) the file says "0::/": empty.
std::string container_from_cgroup(std::string_view cgroup);
// The same from a /proc/self/mountinfo: the runtime bind-mounts
// /etc/hostname, /etc/hosts and /etc/resolv.conf from its directory for the
// container (".../containers/<id>/hostname" for docker,
// ".../overlay-containers/<id>/userdata/hostname" for podman), whatever the
// cgroup namespace. Only those mount points count: the host's mount table
// names every container's directory too (their /dev/shm mounts).
std::string container_from_mountinfo(std::string_view mountinfo);

}  // namespace shmalloc::proto
