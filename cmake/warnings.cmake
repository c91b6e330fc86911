# Warnings for our own targets only (never for the packages we find).
function(shmalloc_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow
    -Wnon-virtual-dtor -Wcast-align
    -Wno-unused-parameter)
endfunction()
