# Issue 14, crash points (label crash): a client, then the daemon, killed by
# SIGKILL at counted points of their slow paths (shm/crash_point.hpp), and
# the heap checked after each kill. The points are compiled only into the
# variants built here, from the same sources as the production targets:
#   shmalloc_shm_crash_objects  shm/ with SHMALLOC_CRASH_POINTS
#   shmalloc_client_crash       libshmalloc (static) over them
#   shmallocd_crash             the daemon over them
#   shmalloc_cache_crash        the shared cache (cache/) over the client
# libshmalloc and shmallocd themselves never change. Not in sanitizer builds.
if(NOT SHMALLOC_SANITIZE)
  function(shmalloc_sources_of target out)
    get_target_property(srcs ${target} SOURCES)
    get_target_property(dir ${target} SOURCE_DIR)
    set(full "")
    foreach(s IN LISTS srcs)
      cmake_path(ABSOLUTE_PATH s BASE_DIRECTORY ${dir} OUTPUT_VARIABLE abs)
      list(APPEND full ${abs})
    endforeach()
    set(${out} ${full} PARENT_SCOPE)
  endfunction()

  shmalloc_sources_of(shmalloc_shm_objects shm_sources)
  add_library(shmalloc_shm_crash_objects OBJECT ${shm_sources})
  target_include_directories(shmalloc_shm_crash_objects PUBLIC ${PROJECT_SOURCE_DIR})
  target_link_libraries(shmalloc_shm_crash_objects PUBLIC Boost::headers Threads::Threads rt)
  target_compile_definitions(shmalloc_shm_crash_objects PUBLIC SHMALLOC_CRASH_POINTS)
  set_target_properties(shmalloc_shm_crash_objects PROPERTIES POSITION_INDEPENDENT_CODE ON)
  shmalloc_warnings(shmalloc_shm_crash_objects)

  shmalloc_sources_of(shmalloc_client_static client_sources)
  add_library(shmalloc_client_crash STATIC ${client_sources})
  target_include_directories(shmalloc_client_crash PUBLIC ${PROJECT_SOURCE_DIR}/client/include)
  target_link_libraries(shmalloc_client_crash PRIVATE shmalloc_shm_crash_objects shmalloc_errc_objects shmalloc_proto_objects PUBLIC pthread rt stdc++)
  target_compile_definitions(shmalloc_client_crash PRIVATE SHMALLOC_CRASH_POINTS)
  shmalloc_warnings(shmalloc_client_crash)

  # request_handler.cpp, daemon.cpp and main.cpp again, with the points; the
  # rest (config, metrics, cache census) from the production archives, whose
  # request_handler.o, daemon.o and shm objects the linker never pulls: these
  # objects come first and define every symbol in them.
  add_executable(shmallocd_crash ${PROJECT_SOURCE_DIR}/service/request_handler.cpp
    ${PROJECT_SOURCE_DIR}/service/daemon.cpp ${PROJECT_SOURCE_DIR}/service/main.cpp
    $<TARGET_OBJECTS:shmalloc_shm_crash_objects>)
  target_compile_definitions(shmallocd_crash PRIVATE SHMALLOC_CRASH_POINTS)
  target_include_directories(shmallocd_crash PRIVATE ${XXHASH_INCLUDE_DIR})
  target_link_libraries(shmallocd_crash PRIVATE shmalloc::service)
  shmalloc_warnings(shmallocd_crash)

  # The shared cache over it, with the points of its put and erase paths.
  add_library(shmalloc_cache_crash STATIC ${PROJECT_SOURCE_DIR}/cache/cache.cpp)
  target_include_directories(shmalloc_cache_crash PUBLIC ${PROJECT_SOURCE_DIR}/cache/include)
  target_include_directories(shmalloc_cache_crash PRIVATE ${PROJECT_SOURCE_DIR} ${XXHASH_INCLUDE_DIR})
  target_link_libraries(shmalloc_cache_crash PUBLIC shmalloc_client_crash pthread)
  target_compile_definitions(shmalloc_cache_crash PRIVATE SHMALLOC_CRASH_POINTS)
  shmalloc_warnings(shmalloc_cache_crash)

  # The client's workload (crash points in it) and the daemon campaign's
  # client (the production library).
  add_executable(crash_workload ${CMAKE_CURRENT_LIST_DIR}/crash_workload.cpp)
  target_link_libraries(crash_workload PRIVATE shmalloc_cache_crash shmalloc_client_crash)
  target_include_directories(crash_workload PRIVATE ${PROJECT_SOURCE_DIR})
  shmalloc_warnings(crash_workload)

  shmalloc_test(crash_tests crash ${CMAKE_CURRENT_LIST_DIR}/client_crash_test.cpp
    ${CMAKE_CURRENT_LIST_DIR}/daemon_crash_test.cpp ${CMAKE_CURRENT_LIST_DIR}/crash_support.cpp)
  target_link_libraries(crash_tests PRIVATE shmalloc::client)
  target_compile_definitions(crash_tests PRIVATE SHMALLOC_CRASH_WORKLOAD_PATH="$<TARGET_FILE:crash_workload>"
    SHMALLOC_CRASH_DAEMON_PATH="$<TARGET_FILE:shmallocd_crash>")
  add_dependencies(crash_tests shmallocd shmallocd_crash crash_workload)
endif()
