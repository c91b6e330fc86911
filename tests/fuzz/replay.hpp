// replay.hpp: what each fuzz target gives the replay driver (replay.cpp),
// the main() of a target built without libFuzzer (g++, plain ctest).
//
// A target defines LLVMFuzzerTestOneInput and fuzz_seeds(): named inputs
// built with the code's own encoders. The driver runs the seeds, then every
// file of the corpus folders it is given, then seeded mutations of them all.
// `target --write-seeds DIR` writes the seeds as files (how tests/fuzz/corpus
// was made); a libFuzzer build writes them at start into the folder
// SHMALLOC_FUZZ_WRITE_SEEDS names (tools/fuzz.sh: its copy of the corpus),
// so that fuzzing starts from seeds of the code as it is, whatever changed
// in the protocol since the corpus was written.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace shmalloc::fuzz {

using input = std::vector<std::uint8_t>;
std::vector<std::pair<std::string, input>> fuzz_seeds();

inline input bytes_of(const std::string& s) { return input(s.begin(), s.end()); }
// Writes fuzz_seeds() into dir, a file each; returns how many.
std::size_t write_seeds(const std::string& dir);

}  // namespace shmalloc::fuzz
