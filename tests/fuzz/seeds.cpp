// Writing a target's seeds as files: `target --write-seeds DIR` (replay
// build) and, in a libFuzzer build, SHMALLOC_FUZZ_WRITE_SEEDS=DIR at start.
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "fuzz/replay.hpp"

namespace shmalloc::fuzz {

std::size_t write_seeds(const std::string& dir) {
  const auto seeds = fuzz_seeds();
  std::filesystem::create_directories(dir);
  for (const auto& [name, in] : seeds) {
    std::ofstream f(std::filesystem::path(dir) / name, std::ios::binary);
    f.write(reinterpret_cast<const char*>(in.data()), static_cast<std::streamsize>(in.size()));
  }
  return seeds.size();
}

}  // namespace shmalloc::fuzz

#ifdef SHMALLOC_LIBFUZZER
// libFuzzer calls this once before it reads the corpus folders.
extern "C" int LLVMFuzzerInitialize(int*, char***) {
  if (const char* dir = std::getenv("SHMALLOC_FUZZ_WRITE_SEEDS"); dir && *dir) shmalloc::fuzz::write_seeds(dir);
  return 0;
}
#endif
