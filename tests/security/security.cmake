# Issue 14, security: peers under other uids (as root; skipped, and said so,
# otherwise) and bad input on the C API, each in a forked child.
shmalloc_test(security_tests security
  ${CMAKE_CURRENT_LIST_DIR}/peer_test.cpp
  ${CMAKE_CURRENT_LIST_DIR}/protocol_test.cpp
  ${CMAKE_CURRENT_LIST_DIR}/bad_input_test.cpp
  ${CMAKE_CURRENT_LIST_DIR}/security_support.cpp)
target_link_libraries(security_tests PRIVATE shmalloc::client)
add_dependencies(security_tests shmallocd)
