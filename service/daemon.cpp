#include "service/daemon.hpp"

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <spdlog/spdlog.h>

#include "metrics/process_collector.hpp"
#include "shm/memstats.hpp"
#include "shm/verify.hpp"

namespace shmalloc::service {

using asio::awaitable;
using asio::use_awaitable;
using namespace asio::experimental::awaitable_operators;
using stream = asio::local::stream_protocol;
using clock_type = std::chrono::steady_clock;
constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);

namespace {
constexpr auto housekeeping_tick = std::chrono::milliseconds(100);
constexpr std::uint64_t ticks_per_full_pass = 10;  // once a second
constexpr std::uint32_t flagged_sweep_max_spans = 4096;  // 32 MiB of 8 KiB spans
}  // namespace

struct daemon::session {
  explicit session(stream::socket s) : socket(std::move(s)), timer(socket.get_executor()) {}
  stream::socket socket;
  asio::steady_timer timer;
  clock_type::time_point deadline = clock_type::time_point::max();
  client_state client;
};

daemon::daemon(const daemon_settings& settings) : settings_(settings) {}

daemon::~daemon() = default;

result<std::unique_ptr<daemon>> daemon::open(const daemon_settings& settings) {
  std::unique_ptr<daemon> d(new daemon(settings));
  const std::string& name = settings.heap.name;
  if (settings.fresh && segment::exists(name)) {
    // Only if no daemon holds it: attach and try its lock first.
    auto old = segment::attach(name);
    if (old && !old.value()->try_lock_exclusive())
      return error{errc::exists, "heap '" + name + "' is served by a running daemon; --fresh refused"};
    segment::remove(name);
  }
  auto made = segment::create(settings.heap);
  if (!made && made.code() == errc::exists) {
    made = segment::attach(name);  // left by a daemon that died, or stopped with --keep-heap
    if (made) d->adopted_ = true;
  }
  if (!made) return made.err();
  d->seg_ = std::move(made.value());
  if (!d->seg_->try_lock_exclusive())
    return error{errc::exists, "heap '" + name + "' is already served by another shmallocd"};
  d->heap_ = std::make_unique<mheap>(*d->seg_);
  if (d->adopted_) {
    const verify_report r = verify_heap(*d->heap_);
    if (!r.ok()) return error{errc::corrupt, "heap '" + name + "' left by an earlier daemon fails its check: " + r.summary()};
  }
  d->handler_ = std::make_unique<request_handler>(*d->heap_, handler_settings{settings.quota_bytes});
  if (d->adopted_) d->handler_->adopt_orphans();
  if (error e = d->start_metrics(); e.code != errc::ok) {
    if (!d->adopted_ && !settings.keep_heap) segment::remove(name);
    return e;
  }
  // Signals are ours before the socket can accept anyone: a client that sees
  // the socket may already send SIGHUP or SIGTERM.
  d->signals_.add(SIGTERM);
  d->signals_.add(SIGINT);
  d->hangup_.add(SIGHUP);
  if (error e = d->bind_socket(); e.code != errc::ok) {
    if (!d->adopted_ && !settings.keep_heap) segment::remove(name);
    return e;
  }
  return d;
}

error daemon::start_metrics() {
  if (settings_.metrics == "off") return {};
  auto heap = std::make_shared<metrics::heap_collector>([this] { return sample(); },
                                                        metrics::build_info{SHMALLOC_VERSION, metrics::build_revision()});
  auto process = std::make_shared<metrics::process_collector>();
  auto server = metrics::metrics_server::start(settings_.metrics, {heap, process});
  if (!server) return server.err();
  metrics_ = std::move(server.value());
  collectors_ = {heap, process};
  handler_->set_metrics_port(metrics_->port());
  return {};
}

// On a civetweb thread, at each scrape.
metrics::metrics_sample daemon::sample() {
  metrics::metrics_sample s;
  s.shm_avail_bytes = metrics::filesystem_avail_bytes("/dev/shm");
  std::lock_guard lock(heap_mutex_);
  if (!heap_) return s;
  s.census = read_census(*heap_);
  s.clients = handler_->clients();
  s.control = control_stats_;
  s.valid = true;
  return s;
}

error daemon::bind_socket() {
  const std::string& path = settings_.socket_path;
  const std::string dir = path.substr(0, path.rfind('/'));
  if (!dir.empty() && mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
    return {errc::os_error, "cannot create socket directory " + dir + ": " + std::strerror(errno)};
  std::error_code ec;
  // A socket file nobody answers on was left by a daemon that died: replace
  // it. One that answers belongs to a live daemon: refuse.
  if (access(path.c_str(), F_OK) == 0) {
    stream::socket probe(io_);
    probe.connect(stream::endpoint(path), ec);
    if (!ec) return {errc::exists, "another shmallocd is listening on " + path};
    ::unlink(path.c_str());
  }
  acceptor_.open(stream(), ec);
  if (!ec) acceptor_.bind(stream::endpoint(path), ec);
  if (!ec) acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (ec) return {errc::os_error, "cannot listen on " + path + ": " + ec.message()};
  if (chmod(path.c_str(), settings_.socket_mode) != 0)
    return {errc::os_error, "cannot set the mode of " + path + ": " + std::strerror(errno)};
  return {};
}

bool daemon::peer_allowed(session& s) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(s.socket.native_handle(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return false;
  s.client.pid = cred.pid;
  s.client.uid = cred.uid;
  if (cred.uid == 0 || cred.uid == geteuid()) return true;
  for (uid_t u : settings_.allow_uids)
    if (u == cred.uid) return true;
  for (gid_t g : settings_.allow_gids)
    if (g == cred.gid) return true;
  return false;
}

awaitable<void> daemon::accept_loop() {
  while (!stopping_) {
    auto [ec, sock] = co_await acceptor_.async_accept(use_tuple);
    if (ec) {
      if (stopping_ || ec == asio::error::operation_aborted) co_return;
      continue;
    }
    auto s = std::make_shared<session>(std::move(sock));
    sessions_.insert(s);
    asio::co_spawn(io_, serve(s), asio::detached);
  }
}

awaitable<void> daemon::serve(std::shared_ptr<session> s) {
  {
    std::lock_guard lock(heap_mutex_);
    ++control_stats_.connections;
  }
  if (!peer_allowed(*s)) {
    {
      std::lock_guard lock(heap_mutex_);
      ++control_stats_.peers_refused;
    }
    spdlog::warn("refused connection from pid {} uid {}: not an allowed uid or gid", s->client.pid, s->client.uid);
    auto frame = proto::make_reply(proto::msg::welcome, 0, errc::permission_denied,
                                   "uid " + std::to_string(s->client.uid) + " may not use this heap");
    std::error_code ec;
    asio::write(s->socket, asio::buffer(frame), ec);
  } else {
    s->deadline = clock_type::now() + std::chrono::nanoseconds(settings_.hello_timeout_ns);
    std::error_code ec;
    s->socket.non_blocking(true, ec);  // for send_reply; the async reads do not care
    const auto ended = co_await (read_frames(s) || watchdog(s));
    if (ended.index() == 1) {  // the watchdog: a deadline passed
      std::lock_guard lock(heap_mutex_);
      ++control_stats_.deadline_closes;
    }
  }
  if (s->client.id != 0)
    spdlog::info("client {} (pid {}, {}) disconnected; {} spans taken back", s->client.id, s->client.pid,
                 s->client.name, s->client.spans.size());
  {
    std::lock_guard lock(heap_mutex_);
    handler_->disconnect(s->client);
#if SHMALLOC_DEBUG_LEVEL >= 1
    const verify_report r = verify_heap(*heap_);
    SHMALLOC_CHECK(r.ok(), r.summary().c_str());
#endif
  }
  std::error_code ec;
  s->socket.close(ec);
  sessions_.erase(s);
}

// Deadlines are checked on a period rather than by re-arming the timer for
// every frame: a request then costs no timer syscalls, and a deadline is
// enforced within a quarter of the shorter timeout.
clock_type::duration daemon::watchdog_period() const {
  const auto shorter = std::chrono::nanoseconds(std::min(settings_.hello_timeout_ns, settings_.frame_timeout_ns));
  return std::clamp<clock_type::duration>(shorter / 4, std::chrono::milliseconds(10), std::chrono::seconds(1));
}

awaitable<void> daemon::watchdog(std::shared_ptr<session> s) {
  const auto period = watchdog_period();
  while (s->deadline > clock_type::now()) {  // returning ends the session: the reader is cancelled
    s->timer.expires_after(period);
    co_await s->timer.async_wait(use_tuple);
  }
}

// Reads until in holds at least want bytes, taking whatever has arrived (one
// read usually brings a whole frame). Bytes of a started frame must all come
// within the frame timeout. False when the connection ends.
awaitable<bool> daemon::fill(session& s, std::vector<std::uint8_t>& in, std::size_t want) {
  while (in.size() < want) {
    if (!in.empty())  // a frame (or its header) has started: it must finish in time
      s.deadline = std::min(s.deadline, clock_type::now() + std::chrono::nanoseconds(settings_.frame_timeout_ns));
    const std::size_t had = in.size();
    in.resize(had + std::max<std::size_t>(want - had, 4096));
    auto [ec, n] = co_await s.socket.async_read_some(asio::buffer(in.data() + had, in.size() - had), use_tuple);
    in.resize(had + n);
    if (ec) co_return false;
  }
  co_return true;
}

awaitable<void> daemon::read_frames(std::shared_ptr<session> s) {
  std::vector<std::uint8_t> in;  // bytes read and not yet handled
  for (;;) {
    if (!co_await fill(*s, in, proto::header_bytes)) co_return;
    const proto::frame_header h = proto::decode_header(in.data());
    if (std::string why = proto::check_header(h); !why.empty()) {
      {
        std::lock_guard lock(heap_mutex_);
        control_stats_.record_refused(h.type, errc::protocol_error);
      }
      auto frame = proto::make_reply(proto::msg::ok, h.request_id, errc::protocol_error, why);
      co_await send_reply(*s, frame);
      co_return;  // the framing is broken: nothing after this can be trusted
    }
    const std::size_t frame_bytes = proto::header_bytes + h.length;
    if (!co_await fill(*s, in, frame_bytes)) co_return;
    reply r = handle(*s, h, std::span<const std::uint8_t>(in).subspan(proto::header_bytes, h.length));
    in.erase(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(frame_bytes));
    // A client that has said hello may idle; one that has not keeps its deadline.
    s->deadline = s->client.id == 0 ? s->deadline : clock_type::time_point::max();
    if (const std::error_code ec = co_await send_reply(*s, r.frame); ec || r.close) co_return;
  }
}

// Replies are small, so the socket (non-blocking since the session began)
// almost always takes one whole: the reply then costs one send and no trip
// through the reactor, where async_write would post its completion and cost
// the loop another epoll_wait per request. What it does not take goes by
// async_write, so a client that stops reading blocks only itself.
awaitable<std::error_code> daemon::send_reply(session& s, const std::vector<std::uint8_t>& frame) {
  std::error_code ec;
  std::size_t sent = s.socket.write_some(asio::buffer(frame), ec);
  if (ec == asio::error::would_block || ec == asio::error::try_again) {
    ec.clear();
    sent = 0;
  }
  if (ec || sent == frame.size()) co_return ec;
  auto [rest_ec, n] = co_await asio::async_write(s.socket, asio::buffer(frame.data() + sent, frame.size() - sent), use_tuple);
  co_return rest_ec;
}

reply daemon::handle(session& s, const proto::frame_header& h, std::span<const std::uint8_t> payload) {
  const auto start = clock_type::now();
  std::lock_guard lock(heap_mutex_);
  reply r = handler_->handle(s.client, h, payload);
  const auto status = static_cast<errc>(proto::decode_header(r.frame.data()).status);
  control_stats_.record(h.type, status, std::chrono::duration<double>(clock_type::now() - start).count(),
                        r.shortfall);
  return r;
}

// Every tick, sweeps the span classes whose sweep_wanted flag a freer set
// (remote frees into spans the daemon holds come back within a tick); once a
// second, the slower work: a sweep of every span with pending remote frees
// (the backstop for a flag set while the daemon cleared it), orphans whose
// grace ran out, and the scavenger.
awaitable<void> daemon::housekeeping() {
  for (std::uint64_t tick = 1; !stopping_; ++tick) {
    housekeeping_timer_.expires_after(housekeeping_tick);
    auto [ec] = co_await housekeeping_timer_.async_wait(use_tuple);
    if (ec || stopping_) co_return;
    std::lock_guard lock(heap_mutex_);
    const bool full = tick % ticks_per_full_pass == 0;
    for (std::uint32_t c = 2; c < num_span_classes; ++c) {
      auto& flag = heap_->state().sweep_wanted[c];
      const bool wanted = flag.load(std::memory_order_relaxed) != 0 && flag.exchange(0, std::memory_order_acquire) != 0;
      mcentral central = heap_->central(span_class{static_cast<std::uint8_t>(c)});
      // A sweep walks the class's lists: on a tick, only short ones, so a
      // steady stream of remote frees into a huge class costs one walk a
      // second, as before the flags, not ten.
      const bool short_lists = central.state().partial_count + central.state().full_count <= flagged_sweep_max_spans;
      if ((wanted && short_lists) || full) central.sweep(~0u);
    }
    if (!full) continue;
    if (std::size_t n = handler_->expire_orphans(settings_.reattach_grace_ns))
      spdlog::info("{} client(s) of the previous daemon did not reattach; their spans were taken back", n);
    if (std::uint64_t released = heap_->scavenge(settings_.scavenge_delay_ns))
      spdlog::debug("scavenger returned {} bytes to the OS", released);
  }
}

void daemon::stop() {
  if (stopping_) return;
  stopping_ = true;
  std::error_code ec;
  acceptor_.close(ec);
  signals_.cancel(ec);
  hangup_.cancel(ec);
  housekeeping_timer_.cancel();
  const auto notice = proto::make_reply(proto::msg::shutdown, 0, errc::unavailable, "shmallocd is stopping");
  for (const auto& s : sessions_) {
    ::send(s->socket.native_handle(), notice.data(), notice.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    s->socket.close(ec);  // the session's coroutine ends and reclaims
  }
}

void daemon::await_hangup() {
  hangup_.async_wait([this](const std::error_code& ec, int) {
    if (ec || stopping_) return;
    reload();
    await_hangup();
  });
}

void daemon::reload() {
  std::string why;
  auto next = load_layers(settings_, &why);
  if (!next) {
    spdlog::error("SIGHUP: reload failed, keeping the current settings: {}", why);
    return;
  }
  // Structural settings need a restart: report them and keep running.
  auto restart_needed = [](const char* what, bool changed) {
    if (changed) spdlog::warn("SIGHUP: {} changed; it takes effect at the next start", what);
  };
  restart_needed("heap", next->heap.name != settings_.heap.name);
  restart_needed("capacity", next->heap.capacity != settings_.heap.capacity);
  restart_needed("heap-mode", next->heap.mode != settings_.heap.mode);
  restart_needed("socket", next->socket_path != settings_.socket_path);
  restart_needed("socket-mode", next->socket_mode != settings_.socket_mode);
  restart_needed("metrics", next->metrics != settings_.metrics);
  settings_.log_level = next->log_level;
  settings_.quota_bytes = next->quota_bytes;
  settings_.scavenge_delay_ns = next->scavenge_delay_ns;
  settings_.reattach_grace_ns = next->reattach_grace_ns;
  settings_.allow_uids = next->allow_uids;
  settings_.allow_gids = next->allow_gids;
  spdlog::set_level(spdlog::level::from_str(settings_.log_level));
  {
    std::lock_guard lock(heap_mutex_);
    handler_->set_settings(handler_settings{settings_.quota_bytes});
  }
  spdlog::info("SIGHUP: reloaded (log level {}, quota {} bytes, scavenge delay {} ns)", settings_.log_level,
               settings_.quota_bytes, settings_.scavenge_delay_ns);
}

void daemon::run() {
  await_hangup();
  signals_.async_wait([this](const std::error_code& ec, int sig) {
    if (ec) return;
    spdlog::info("signal {}: stopping", sig);
    stop();
  });
  spdlog::info("shmallocd serving heap '{}' ({} bytes{}) on {}", settings_.heap.name, seg_->header().capacity,
               adopted_ ? ", adopted" : "", settings_.socket_path);
  if (handler_->orphan_groups() != 0)
    spdlog::info("{} client(s) of the previous daemon may reattach within {} s", handler_->orphan_groups(),
                 settings_.reattach_grace_ns / 1'000'000'000ULL);
  asio::co_spawn(io_, accept_loop(), asio::detached);
  asio::co_spawn(io_, housekeeping(), asio::detached);
  io_.run();
  finish();
}

void daemon::finish() {
  metrics_.reset();  // joins the HTTP threads: no scrape reads the heap after this
  ::unlink(settings_.socket_path.c_str());
  std::lock_guard lock(heap_mutex_);
  handler_.reset();
  heap_.reset();
  seg_.reset();
  if (!settings_.keep_heap) segment::remove(settings_.heap.name);
  spdlog::info("shmallocd stopped{}", settings_.keep_heap ? "; heap kept" : "");
}

}  // namespace shmalloc::service
