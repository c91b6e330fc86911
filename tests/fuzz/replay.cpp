// The replay driver of a fuzz target built without libFuzzer:
//
//   target [inputs [seed [corpus-dir...]]]   seeds, corpus files, then
//                                            `inputs` mutations (seeded)
//   target --write-seeds DIR                 the target's seeds as files
//
// The mutations are libFuzzer's simplest (flip, set, insert, erase, repeat
// a range, splice another input), enough to keep every target exercised by
// ctest with any compiler; tools/fuzz.sh runs the real thing.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>

#include "fuzz/replay.hpp"

namespace fs = std::filesystem;
using shmalloc::fuzz::input;

namespace {

input read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return input(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void run(const input& in) { LLVMFuzzerTestOneInput(in.data(), in.size()); }

// One to four random edits of base, drawing spliced bytes from pool.
input mutate(input base, const std::vector<input>& pool, std::mt19937_64& rng) {
  auto below = [&](std::size_t n) { return n == 0 ? 0 : static_cast<std::size_t>(rng() % n); };
  const int edits = 1 + static_cast<int>(rng() % 4);
  for (int e = 0; e < edits; ++e) {
    const std::size_t at = below(base.size() + 1);
    const std::size_t len = 1 + below(std::min<std::size_t>(16, base.size() - at + 1));
    switch (rng() % 6) {
      case 0:  // flip bits of one byte
        if (at < base.size()) base[at] ^= static_cast<std::uint8_t>(1 + rng() % 255);
        break;
      case 1:  // an interesting byte
        if (at < base.size()) base[at] = std::vector<std::uint8_t>{0, 1, 0x7f, 0x80, 0xff, '\n', '"', '='}[rng() % 8];
        break;
      case 2:  // insert random bytes
        for (std::size_t i = 0; i < len; ++i) base.insert(base.begin() + static_cast<std::ptrdiff_t>(at), static_cast<std::uint8_t>(rng()));
        break;
      case 3:  // erase a range
        base.erase(base.begin() + static_cast<std::ptrdiff_t>(at),
                   base.begin() + static_cast<std::ptrdiff_t>(std::min(base.size(), at + len)));
        break;
      case 4: {  // repeat a range
        const input piece(base.begin() + static_cast<std::ptrdiff_t>(at),
                          base.begin() + static_cast<std::ptrdiff_t>(std::min(base.size(), at + len * 4)));
        base.insert(base.begin() + static_cast<std::ptrdiff_t>(at), piece.begin(), piece.end());
        break;
      }
      default: {  // splice: a piece of another input, at the end or in the middle
        const input& other = pool[below(pool.size())];
        const std::size_t from = below(other.size() + 1);
        const std::size_t n = below(other.size() - from + 1);
        const std::size_t where = rng() % 2 ? base.size() : at;
        base.insert(base.begin() + static_cast<std::ptrdiff_t>(where), other.begin() + static_cast<std::ptrdiff_t>(from),
                    other.begin() + static_cast<std::ptrdiff_t>(from + n));
      }
    }
  }
  return base;
}

}  // namespace

int main(int argc, char** argv) {
  const auto seeds = shmalloc::fuzz::fuzz_seeds();
  if (argc == 3 && std::string(argv[1]) == "--write-seeds") {
    std::printf("%zu seeds written to %s\n", shmalloc::fuzz::write_seeds(argv[2]), argv[2]);
    return 0;
  }
  const long inputs = argc > 1 ? std::atol(argv[1]) : 20000;
  std::mt19937_64 rng(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 42);
  std::vector<input> pool;
  for (const auto& s : seeds) pool.push_back(s.second);
  std::size_t files = 0;
  for (int i = 3; i < argc; ++i) {
    std::vector<fs::path> paths;
    for (const auto& e : fs::directory_iterator(argv[i]))
      if (e.is_regular_file()) paths.push_back(e.path());
    std::sort(paths.begin(), paths.end());  // the same order on every run
    for (const auto& p : paths) pool.push_back(read_file(p));
    files += paths.size();
  }
  for (const input& in : pool) run(in);
  for (long i = 0; i < inputs; ++i) run(mutate(pool[rng() % pool.size()], pool, rng));
  std::printf("%s: %zu seeds, %zu corpus files and %ld mutations replayed\n", argv[0], seeds.size(), files, inputs);
  return 0;
}
