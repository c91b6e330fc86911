# Fuzz targets (tests/fuzz/README.md): frame_fuzz (frames into a live
# request handler), decode_fuzz (the protocol's decoders alone) and
# config_fuzz (shmallocd's TOML config file). With clang and
# -DSHMALLOC_FUZZ=ON each is a libFuzzer binary (tools/fuzz.sh runs them);
# otherwise each has a replay driver (replay.cpp) that ctest runs over the
# seed corpus and seeded mutations of it (label fuzz).
option(SHMALLOC_FUZZ "Build tests/fuzz as libFuzzer targets (clang)" OFF)
if(SHMALLOC_FUZZ)
  # libFuzzer's coverage counters in the code under test too, not only in
  # the targets' own files.
  foreach(lib shmalloc_shm_objects shmalloc_proto_objects shmalloc_cache_census shmalloc_service_core)
    target_compile_options(${lib} PRIVATE -fsanitize=fuzzer-no-link)
  endforeach()
  # But not the comparisons of the heap checker, which frame_fuzz runs after
  # every input: it is the oracle, and tracing its loops took half the time.
  set_source_files_properties(${PROJECT_SOURCE_DIR}/shm/verify.cpp DIRECTORY ${PROJECT_SOURCE_DIR}/shm
    PROPERTIES COMPILE_OPTIONS -fno-sanitize-coverage=trace-cmp)
endif()

function(shmalloc_fuzz_target name)
  if(SHMALLOC_FUZZ)
    add_executable(${name} ${CMAKE_CURRENT_LIST_DIR}/${name}.cpp ${CMAKE_CURRENT_LIST_DIR}/seeds.cpp)
    target_compile_definitions(${name} PRIVATE SHMALLOC_LIBFUZZER)
    target_compile_options(${name} PRIVATE -fsanitize=fuzzer)
    target_link_options(${name} PRIVATE -fsanitize=fuzzer)
  else()
    add_executable(${name} ${CMAKE_CURRENT_LIST_DIR}/${name}.cpp ${CMAKE_CURRENT_LIST_DIR}/replay.cpp
      ${CMAKE_CURRENT_LIST_DIR}/seeds.cpp)
    add_test(NAME ${name}_replay COMMAND ${name} 20000 42 ${CMAKE_CURRENT_LIST_DIR}/corpus/${name})
    set_tests_properties(${name}_replay PROPERTIES LABELS fuzz TIMEOUT 300)
  endif()
  target_link_libraries(${name} PRIVATE shmalloc::service_core)
  target_include_directories(${name} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR})
  shmalloc_warnings(${name})
endfunction()

shmalloc_fuzz_target(frame_fuzz)
shmalloc_fuzz_target(decode_fuzz)
shmalloc_fuzz_target(config_fuzz)
