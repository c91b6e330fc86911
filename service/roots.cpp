// roots.cpp: request_handler's named roots (publish, lookup, unpublish):
// a table of up to max_roots (name, handle) entries in the segment, by
// which processes find each other's objects.
#include "service/request_handler.hpp"

#include <cstring>

#include "shm/segment.hpp"

namespace shmalloc::service {

root_entry* request_handler::find_root(const std::string& name) const noexcept {
  auto* roots = heap_->seg().at<root_entry>(heap_->seg().regions().roots.offset);
  for (std::uint32_t i = 0; i < max_roots; ++i)
    if (roots[i].handle != 0 && name == roots[i].name) return &roots[i];
  return nullptr;
}

reply request_handler::on_publish(client_state&, const request& req) {
  auto m = proto::decode_publish(req.body);
  if (!m) return req.fail(errc::invalid_argument, "malformed publish (a name of 1 to 63 printable characters and a handle)");
  object_ref ref;
  if (m->handle >= heap_->seg().size() || heap_->view().object_at(m->handle, &ref) != errc::ok ||
      !is_allocated(heap_->span(ref.span), ref.index))
    return req.fail(errc::bad_handle, "handle " + std::to_string(m->handle) + " is not an allocated object");
  if (find_root(m->name) != nullptr) return req.fail(errc::exists, "root '" + m->name + "' already exists");
  auto* roots = heap_->seg().at<root_entry>(heap_->seg().regions().roots.offset);
  for (std::uint32_t i = 0; i < max_roots; ++i) {
    if (roots[i].handle != 0) continue;
    std::memset(roots[i].name, 0, sizeof roots[i].name);
    std::memcpy(roots[i].name, m->name.data(), m->name.size());
    roots[i].handle = m->handle;
    return req.ok();
  }
  return req.fail(errc::no_memory, "all " + std::to_string(max_roots) + " named roots are in use");
}

reply request_handler::on_lookup(client_state&, const request& req) {
  auto name = proto::decode_name(req.body);
  if (!name) return req.fail(errc::invalid_argument, "malformed root name");
  const root_entry* r = find_root(*name);
  if (r == nullptr) return req.fail(errc::not_found, "no root named '" + *name + "'");
  return req.ok(proto::encode_root(r->handle));
}

reply request_handler::on_unpublish(client_state&, const request& req) {
  auto name = proto::decode_name(req.body);
  if (!name) return req.fail(errc::invalid_argument, "malformed root name");
  root_entry* r = find_root(*name);
  if (r == nullptr) return req.fail(errc::not_found, "no root named '" + *name + "'");
  r->handle = 0;
  return req.ok();
}

}  // namespace shmalloc::service
