#!/usr/bin/env python3
"""Writes the build context of docker/Dockerfile to stdout as a tar stream,
leaving out what docker/Dockerfile.dockerignore leaves out.

BuildKit reads Dockerfile.dockerignore by itself; the classic builder (and
so docker-compose 1.29 without COMPOSE_DOCKER_CLI_BUILD, and any Docker CLI
without buildx) does not, and would send every build folder of the tree. A
context given on stdin is the same for both builders:

    python3 docker/build-context.py | docker build -f docker/Dockerfile -t shmalloc:local -

Usage: build-context.py [--list] [--rev REV] [TOP [IGNORE_FILE]]
  TOP          the context's top folder (default: the repository's top folder)
  IGNORE_FILE  default: TOP/docker/Dockerfile.dockerignore
  --list       print the paths that would be sent instead of the tar stream
  --rev REV    the files of git revision REV (git archive), not the working
               tree, and its ignore file; .git is not sent, so build with
               --build-arg SHMALLOC_REVISION=$(git describe --always REV)

The patterns follow Docker's .dockerignore rules: relative to TOP, '*' and
'?' do not cross '/', '**' matches any number of folders, a pattern that
matches a folder leaves out everything under it, '!' takes a path back in,
and the last pattern that matches a path decides. docker/Dockerfile itself is
always sent, as the Docker CLI does for a folder context: a context read from
stdin must hold its Dockerfile.
"""
import io
import os
import re
import subprocess
import sys
import tarfile


def pattern_regex(pattern):
    """Docker's pattern (moby/patternmatcher) as an anchored regex."""
    out, i, n = "", 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):  # '**/' : zero or more folders
                    i += 1
                    out += "(?:.*/)?"
                else:
                    out += ".*"
                continue
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.find("]", i + 1)
            if j < 0:
                out += re.escape(c)
            else:
                body = pattern[i + 1:j]
                if body.startswith("^") or body.startswith("!"):
                    body = "^" + body[1:]
                out += "[" + body + "]"
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def read_rules(lines):
    rules = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        if keep:
            line = line[1:].strip()
        line = os.path.normpath(line).lstrip("/")
        if line in ("", "."):
            continue
        rules.append((keep, line, pattern_regex(line)))
    return rules


def excluded(rel, rules):
    """Whether rel (a '/'-separated path under TOP) is left out: the last
    rule matching it or one of its parent folders decides."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[:k]) for k in range(1, len(parts) + 1)]
    out = False
    for keep, _, rx in rules:
        if any(rx.match(p) for p in prefixes):
            out = not keep
    return out


def may_take_back(rel_dir, rules):
    """Whether a '!' rule could take back something under rel_dir."""
    return any(keep and (text.startswith(rel_dir + "/") or "*" in text or "?" in text or "[" in text)
               for keep, text, _ in rules)


def context_paths(top, rules):
    for root, dirs, files in os.walk(top):
        rel_root = os.path.relpath(root, top)
        rel_root = "" if rel_root == "." else rel_root
        kept_dirs = []
        for d in sorted(dirs):
            rel = f"{rel_root}/{d}" if rel_root else d
            if not excluded(rel, rules):
                yield rel
                kept_dirs.append(d)
            elif may_take_back(rel, rules) and not os.path.islink(os.path.join(root, d)):
                kept_dirs.append(d)  # walked for what a '!' rule takes back
        dirs[:] = kept_dirs
        for f in sorted(files):
            rel = f"{rel_root}/{f}" if rel_root else f
            if not excluded(rel, rules):
                yield rel


DOCKERFILE = "docker/Dockerfile"


def from_revision(top, rev, ignore, listing):
    """The context from `git archive rev`, filtered by the same rules."""
    git = ["git", "-C", top]
    if ignore is None:
        text = subprocess.run(git + ["show", f"{rev}:docker/Dockerfile.dockerignore"], check=True,
                              capture_output=True, text=True).stdout
    else:
        with open(ignore) as f:
            text = f.read()
    rules = read_rules(text.splitlines())
    archive = subprocess.run(git + ["archive", "--format=tar", rev], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as src:
        members = [m for m in src.getmembers()
                   if m.name.rstrip("/") == DOCKERFILE or not excluded(m.name.rstrip("/"), rules)]
        if listing:
            for m in members:
                print(m.name.rstrip("/"))
            return 0
        with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for m in members:
                m.pax_headers = {}
                tar.addfile(m, src.extractfile(m) if m.isreg() else None)
    return 0


# GNU format with whole-second times: no pax header in front, which the
# Docker CLI does not recognise as the start of a tar stream (it then takes
# stdin for a Dockerfile: "ambiguous Dockerfile source").


def main(argv):
    listing = "--list" in argv
    args = [a for a in argv if a != "--list"]
    rev = None
    if "--rev" in args:
        at = args.index("--rev")
        rev = args[at + 1]
        del args[at:at + 2]
    top = os.path.abspath(args[0] if args else os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    ignore = args[1] if len(args) > 1 else None
    if rev is not None:
        return from_revision(top, rev, ignore, listing)
    with open(ignore or os.path.join(top, "docker", "Dockerfile.dockerignore")) as f:
        rules = read_rules(f.read().splitlines())
    paths, seen = [], set()
    for rel in list(context_paths(top, rules)) + [DOCKERFILE]:
        parts = rel.split("/")  # a folder left out but for what '!' takes back is sent too
        for k in range(1, len(parts)):
            parent = "/".join(parts[:k])
            if parent not in seen:
                seen.add(parent)
                paths.append(parent)
        if rel not in seen:
            seen.add(rel)
            paths.append(rel)
    if listing:
        for p in paths:
            print(p)
        return 0
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.GNU_FORMAT) as tar:
        for rel in paths:
            info = tar.gettarinfo(os.path.join(top, rel), arcname=rel)
            info.mtime = int(info.mtime)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if info.isreg():
                with open(os.path.join(top, rel), "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BrokenPipeError:  # the reader (docker build) gave up; it says why
        sys.stderr.close()
        sys.exit(1)
