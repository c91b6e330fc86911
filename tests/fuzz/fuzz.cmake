# The frame decoder and request handler fuzz target: a libFuzzer binary with
# clang and -DSHMALLOC_FUZZ=ON, otherwise a seeded replay that CI runs.
option(SHMALLOC_FUZZ "Build tests/fuzz as libFuzzer targets (clang)" OFF)
add_executable(frame_fuzz ${CMAKE_CURRENT_LIST_DIR}/frame_fuzz.cpp)
target_link_libraries(frame_fuzz PRIVATE shmalloc::service_core)
target_include_directories(frame_fuzz PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
if(SHMALLOC_FUZZ)
  target_compile_definitions(frame_fuzz PRIVATE SHMALLOC_LIBFUZZER)
  target_compile_options(frame_fuzz PRIVATE -fsanitize=fuzzer)
  target_link_options(frame_fuzz PRIVATE -fsanitize=fuzzer)
else()
  add_test(NAME frame_fuzz_replay COMMAND frame_fuzz 20000 42)
  set_tests_properties(frame_fuzz_replay PROPERTIES LABELS unit TIMEOUT 300)
endif()
