# SHMALLOC_SANITIZE=address,undefined builds everything with ASan+UBSan;
# SHMALLOC_SANITIZE=thread with TSan. Applied globally so that every object
# file of ours agrees on the instrumentation.
if(SHMALLOC_SANITIZE)
  set(_san -fsanitize=${SHMALLOC_SANITIZE} -fno-omit-frame-pointer)
  if(SHMALLOC_SANITIZE MATCHES "undefined")
    list(APPEND _san -fno-sanitize-recover=undefined)
  endif()
  add_compile_options(${_san})
  add_link_options(${_san})
endif()

if(SHMALLOC_DEBUG_LEVEL STREQUAL "")
  if(CMAKE_BUILD_TYPE STREQUAL "Debug")
    set(SHMALLOC_DEBUG_LEVEL 2)
  else()
    set(SHMALLOC_DEBUG_LEVEL 0)
  endif()
endif()
add_compile_definitions(SHMALLOC_DEBUG_LEVEL=${SHMALLOC_DEBUG_LEVEL})
