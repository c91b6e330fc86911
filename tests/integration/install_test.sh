#!/usr/bin/env bash
# Installs the build into a temp prefix and builds two tiny programs against
# the installed libshmalloc: a C99 one with pkg-config, a C++ one with
# find_package(shmalloc), each linked shared and static, and a C++ one on the
# shared cache (shmalloc::cache). All attach to a socket nobody serves and
# must get the library's "daemon unavailable" error: proof that they linked
# and ran it.
set -euo pipefail
build=$1
work=$(mktemp -d /tmp/shmalloc-install-XXXXXX)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix
cmake --install "$build" --prefix "$prefix" >/dev/null
libdir=$(dirname "$(find "$prefix" -name libshmalloc.so -print -quit)")
[ -f "$libdir/libshmalloc.a" ] || { echo "no static library installed"; exit 1; }

cat > "$work/hello.c" <<'C'
#include <shmalloc/shmalloc.h>
#include <stdio.h>
#include <string.h>
int main(void) {
  int rc = shmalloc_attach("/nonexistent/shmallocd.sock");
  printf("%s\n", shmalloc_strerror(rc));
  return rc < 0 && strcmp(shmalloc_strerror(rc), "daemon unavailable") == 0 ? 0 : 1;
}
C
export PKG_CONFIG_PATH=$libdir/pkgconfig
cc -std=c99 -Wall -Werror "$work/hello.c" $(pkg-config --cflags --libs shmalloc) -o "$work/hello_shared"
LD_LIBRARY_PATH=$libdir "$work/hello_shared"
cc -std=c99 "$work/hello.c" $(pkg-config --cflags shmalloc) "$libdir/libshmalloc.a" \
  $(pkg-config --static --libs-only-l shmalloc | sed -E 's/-lshmalloc(_cache)?( |$)/ /g') -o "$work/hello_static"
"$work/hello_static"

mkdir -p "$work/proj"
cat > "$work/proj/CMakeLists.txt" <<'CM'
cmake_minimum_required(VERSION 3.25)
project(uses_shmalloc CXX)
find_package(shmalloc REQUIRED)
add_executable(uses_shared main.cpp)
target_link_libraries(uses_shared shmalloc::client)
add_executable(uses_static main.cpp)
target_link_libraries(uses_static shmalloc::client_static)
add_executable(uses_cache cache.cpp)
target_link_libraries(uses_cache shmalloc::cache)
CM
cat > "$work/proj/cache.cpp" <<'CPP'
#include <shmalloc/cache.hpp>
#include <cstdio>
#include <cstdlib>
#include <cstring>
int main() {
  setenv("SHMALLOC_SOCKET", "/nonexistent/shmallocd.sock", 1);
  shmalloc_cache* c = nullptr;
  const int rc = shmalloc_cache_open("installed", 1 << 20, &c);
  std::printf("%s\n", shmalloc_strerror(rc));
  return rc < 0 && std::strcmp(shmalloc_strerror(rc), "daemon unavailable") == 0 ? 0 : 1;
}
CPP
cat > "$work/proj/main.cpp" <<'CPP'
#include <shmalloc/shmalloc.h>
#include <cstdio>
#include <cstring>
int main() {
  const int rc = shmalloc_attach("/nonexistent/shmallocd.sock");
  std::printf("%s\n", shmalloc_strerror(rc));
  return rc < 0 && std::strcmp(shmalloc_strerror(rc), "daemon unavailable") == 0 ? 0 : 1;
}
CPP
cmake -S "$work/proj" -B "$work/proj/build" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$work/proj/build" >/dev/null
LD_LIBRARY_PATH=$libdir "$work/proj/build/uses_shared"
"$work/proj/build/uses_static"
LD_LIBRARY_PATH=$libdir "$work/proj/build/uses_cache"
# The C++ cache header says what it needs, where g++ 12's default standard
# would only say that std::span is unknown.
if echo '#include <shmalloc/cache.hpp>' | c++ -std=c++17 -fsyntax-only -I"$prefix/include" -x c++ - 2>"$work/cxx17.txt"; then
  echo "install_test: shmalloc/cache.hpp compiled as C++17"; exit 1
fi
grep -q 'shmalloc/cache.hpp needs C++20' "$work/cxx17.txt" || { cat "$work/cxx17.txt"; exit 1; }
echo "install_test: 5 programs built against the installed package and ran; cache.hpp refuses C++17 by name"
