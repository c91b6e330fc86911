// shmalloc.hpp: the C++ API of libshmalloc, on top of the C API.
//
//   shmalloc::heap h;                       // attach (RAII); detach at scope end
//   auto* v = h.construct<vec>("orders");  // a named object, found by other processes
//   auto* same = h.find<vec>("orders");     // in another process
//
// shmalloc::allocator<T> hands out memory of the shared heap with
// boost::interprocess::offset_ptr<T> as its pointer type, so Boost.Container
// and Boost.Interprocess containers built by one process can be read and
// extended by another, wherever each maps the heap. It is stateless: every
// instance allocates from the one heap the process is attached to.
//
// Errors: out of memory or over quota is std::bad_alloc; attach and name
// errors are std::system_error with shmalloc's error category.
#pragma once

#include <boost/interprocess/offset_ptr.hpp>
#include <cstddef>
#include <cstdint>
#include <new>
#include <string>
#include <system_error>
#include <utility>

#include "shmalloc/shmalloc.h"

namespace shmalloc {

// The error category of the negative codes the C API returns.
inline const std::error_category& client_category() noexcept {
  struct category final : std::error_category {
    const char* name() const noexcept override { return "shmalloc"; }
    std::string message(int code) const override { return shmalloc_strerror(code); }
  };
  static const category instance;
  return instance;
}

namespace detail {
inline void check(int rc, const char* what) {
  if (rc != 0) throw std::system_error(-rc, client_category(), what);
}
inline void* allocate_or_throw(std::size_t bytes, std::size_t alignment) {
  void* p = alignment > 8 ? shmalloc_alloc_aligned(bytes, alignment) : shmalloc_alloc(bytes);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
}  // namespace detail

// The attached heap. One per process at a time (the attachment is
// process-wide); detaching frees nothing that was allocated.
class heap {
 public:
  explicit heap(const char* socket_path = nullptr) { detail::check(shmalloc_attach(socket_path), "shmalloc attach"); }
  ~heap() { shmalloc_detach(); }
  heap(const heap&) = delete;
  heap& operator=(const heap&) = delete;

  void* allocate(std::size_t bytes, std::size_t alignment = alignof(std::max_align_t)) {
    return detail::allocate_or_throw(bytes, alignment);
  }
  void deallocate(void* p) noexcept { shmalloc_free(p); }
  std::uint64_t handle_of(const void* p) const noexcept { return shmalloc_handle(p); }
  void* pointer_to(std::uint64_t handle) const noexcept { return shmalloc_pointer(handle); }

  // Allocates and constructs a T, and publishes it under name; throws
  // std::system_error (exists) if the name is taken, freeing the object.
  template <class T, class... Args>
  T* construct(const char* name, Args&&... args) {
    void* p = allocate(sizeof(T), alignof(T));
    T* obj = nullptr;
    try {
      obj = new (p) T(std::forward<Args>(args)...);
      detail::check(shmalloc_publish(name, shmalloc_handle(obj)), "shmalloc publish");
    } catch (...) {
      if (obj != nullptr) obj->~T();
      shmalloc_free(p);
      throw;
    }
    return obj;
  }

  // The object published under name, or nullptr.
  template <class T>
  static T* find(const char* name) noexcept {
    std::uint64_t h = 0;
    return shmalloc_lookup(name, &h) == 0 ? static_cast<T*>(shmalloc_pointer(h)) : nullptr;
  }

  // Unpublishes name, destroys and frees its object. False if no such name.
  template <class T>
  bool destroy(const char* name) noexcept {
    T* obj = find<T>(name);
    if (obj == nullptr || shmalloc_unpublish(name) != 0) return false;
    obj->~T();
    shmalloc_free(obj);
    return true;
  }
};

template <class T>
class allocator {
 public:
  using value_type = T;
  using pointer = boost::interprocess::offset_ptr<T>;
  using const_pointer = boost::interprocess::offset_ptr<const T>;
  using void_pointer = boost::interprocess::offset_ptr<void>;
  using const_void_pointer = boost::interprocess::offset_ptr<const void>;
  using size_type = std::size_t;
  using difference_type = std::ptrdiff_t;
  using propagate_on_container_move_assignment = std::true_type;
  using is_always_equal = std::true_type;
  template <class U>
  struct rebind {
    using other = allocator<U>;
  };

  allocator() noexcept = default;
  template <class U>
  allocator(const allocator<U>&) noexcept {}  // NOLINT: converting, as the standard allocators

  pointer allocate(size_type n) {
    if (n > static_cast<size_type>(-1) / sizeof(T)) throw std::bad_alloc();
    return pointer(static_cast<T*>(detail::allocate_or_throw(n * sizeof(T), alignof(T))));
  }
  void deallocate(pointer p, size_type) noexcept { shmalloc_free(p.get()); }

  template <class U>
  bool operator==(const allocator<U>&) const noexcept {
    return true;
  }
};

}  // namespace shmalloc
