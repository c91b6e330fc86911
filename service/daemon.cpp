#include "service/daemon.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <asio/experimental/as_tuple.hpp>
#include <cerrno>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <spdlog/spdlog.h>
#include <system_error>
#include <thread>

#include "metrics/process_collector.hpp"
#include "shm/crash_point.hpp"
#include "shm/memstats.hpp"
#include "shm/profile.hpp"
#include "shm/verify.hpp"

namespace shmalloc::service {

using asio::awaitable;
using asio::use_awaitable;
using stream = asio::local::stream_protocol;
using clock_type = std::chrono::steady_clock;
constexpr auto use_tuple = asio::experimental::as_tuple(asio::use_awaitable);

namespace {
constexpr auto housekeeping_tick = std::chrono::milliseconds(100);
constexpr std::uint64_t ticks_per_full_pass = 10;  // once a second
// The backstop looks at a stretch of the span table per tick, so that a
// pass takes --sweep-backstop (a minute: it is only for spans whose freer
// was killed between flagging and pushing them on the sweep queue), and at
// most 16,384 spans, about a third of a millisecond under the heap lock. A
// pass over every list at once held the lock 4 ms per 200,000 spans.
constexpr std::uint32_t backstop_max_spans_per_tick = 16384;
// Descriptors the daemon keeps besides its connections: the heap, the
// socket, epoll, signals, the spare, the metrics server's.
constexpr rlim_t fd_headroom = 64;
// After an accept error the spare descriptor could not answer: long enough
// not to burn a CPU, short enough that a freed descriptor is soon used.
constexpr auto accept_backoff = std::chrono::milliseconds(100);
constexpr auto accept_warning_interval = std::chrono::seconds(1);

// Every connection holds a descriptor, and the usual soft limit (1,024) is
// no more than the default max-connections: take what the hard limit allows.
void raise_fd_limit() {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0) return;
  if (lim.rlim_cur >= lim.rlim_max) {
    spdlog::debug("file descriptor limit {} (the hard limit)", lim.rlim_cur);
    return;
  }
  const rlim_t was = lim.rlim_cur;
  lim.rlim_cur = lim.rlim_max;
  if (setrlimit(RLIMIT_NOFILE, &lim) != 0)
    spdlog::warn("cannot raise the file descriptor limit from {} to {}: {}", was, lim.rlim_max, std::strerror(errno));
  else
    spdlog::info("file descriptor limit raised from {} to {}", was, lim.rlim_max);
}

// Past the limit, clients are refused by the accept loop (out of file
// descriptors) before max-connections is reached: say so once, up front.
void warn_if_fd_limit_low(std::uint32_t max_connections) {
  rlimit lim{};
  if (getrlimit(RLIMIT_NOFILE, &lim) != 0 || lim.rlim_cur == RLIM_INFINITY) return;
  if (max_connections + fd_headroom <= lim.rlim_cur) return;
  spdlog::warn("max-connections is {} but the file descriptor limit is {}: connections past about {} will be refused",
               max_connections, lim.rlim_cur, lim.rlim_cur > fd_headroom ? lim.rlim_cur - fd_headroom : 0);
}

int open_spare_fd() { return ::open("/dev/null", O_RDONLY | O_CLOEXEC); }

// The socket's directory, made (mode 0700) if it is missing. A path with no
// slash names a socket in the working directory: nothing to make.
error make_socket_dir(const std::string& path) {
  const std::size_t slash = path.rfind('/');
  if (slash == std::string::npos || slash == 0) return {};
  const std::string dir = path.substr(0, slash);
  if (mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
    return {errc::os_error, "cannot create socket directory " + dir + ": " + std::strerror(errno)};
  return {};
}

// Connects to the socket at path without blocking (a live daemon whose
// backlog is full must not hang this one): 0 if something answered, else
// the errno; ECONNREFUSED means no one listens.
int probe_socket(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path) return ENAMETOOLONG;
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) return errno;
  const int rc = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr);
  const int err = rc == 0 ? 0 : errno;
  ::close(fd);
  return err;
}

// Only a socket that no one answers on (left by a daemon that died) is
// removed. Anything else at the path is someone's: a live socket (another
// daemon's), a regular file, a link, a directory. Refused, and left as it is.
error clear_stale_socket(const std::string& path) {
  struct stat st {};
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return {};
    return {errc::os_error, "cannot look at the socket path " + path + ": " + std::strerror(errno)};
  }
  if (!S_ISSOCK(st.st_mode))
    return {errc::exists, path + " exists and is not a socket; not replacing it (remove it, or choose another --socket)"};
  const int answered = probe_socket(path);
  if (answered == 0 || answered == EAGAIN)  // EAGAIN: a listener with a full backlog
    return {errc::exists, "a process (another shmallocd?) is listening on " + path + "; not replacing its socket"};
  if (answered != ECONNREFUSED)
    return {errc::os_error, "cannot tell whether anyone listens on " + path + ": " + std::strerror(answered)};
  if (::unlink(path.c_str()) != 0 && errno != ENOENT)
    return {errc::os_error, "cannot remove the stale socket " + path + ": " + std::strerror(errno)};
  spdlog::info("removed the stale socket {} (no one listened on it)", path);
  return {};
}

// A refusal is one small frame, sent without blocking; the caller closes.
void send_refusal(int fd, errc code, const std::string& why) {
  const auto frame = proto::make_reply(proto::msg::welcome, 0, code, why);
  ::send(fd, frame.data(), frame.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
}
}  // namespace

struct daemon::session {
  explicit session(int f) : fd(f) {}
  ~session() {
    if (fd >= 0) ::close(fd);
  }
  session(const session&) = delete;
  session& operator=(const session&) = delete;
  int fd;  // blocking; closed under sessions_mutex_, so stop() never shuts down a reused fd
  std::thread thread;
  bool closed = false;  // under sessions_mutex_: the socket is closed and the thread is ending
  clock_type::time_point deadline = clock_type::time_point::max();
  std::chrono::nanoseconds recv_timeout{0};  // what SO_RCVTIMEO is set to; 0: none
  std::chrono::nanoseconds send_timeout{0};  // what SO_SNDTIMEO is set to; 0: none
  std::chrono::nanoseconds frame_timeout{0};
  client_state client;
};

daemon::daemon(const daemon_settings& settings) : settings_(settings) {}

// Normally run() has ended every session. If it threw, the threads still
// run: end them here, before the heap they use goes with the members.
daemon::~daemon() {
  {
    std::lock_guard lock(sessions_mutex_);
    shutdown_sessions_locked(SHUT_RDWR);
  }
  reap_sessions(true);
  if (spare_fd_ >= 0) ::close(spare_fd_);
}

result<std::unique_ptr<daemon>> daemon::open(const daemon_settings& settings) {
  raise_fd_limit();
  warn_if_fd_limit_low(settings.max_connections);
  std::unique_ptr<daemon> d(new daemon(settings));
  d->spare_fd_ = open_spare_fd();  // before the connections can take every descriptor
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
    // The earlier daemon may have died in the middle of a change: derive
    // its structures from the span table again, then check.
    if (const std::uint32_t dropped = d->heap_->rebuild())
      spdlog::warn("heap '{}': {} span(s) half carved or half freed by the earlier daemon were dropped", name, dropped);
    const verify_report r = verify_heap(*d->heap_);
    if (!r.ok()) return error{errc::corrupt, "heap '" + name + "' left by an earlier daemon fails its check: " + r.summary()};
  }
  d->handler_ = std::make_unique<request_handler>(*d->heap_, handler_settings{settings.quota_bytes, settings.max_caches_per_client});
  SHMALLOC_CRASH_POINT("daemon.adopt");
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
  s.caches = read_caches(heap_->seg());  // the roots that find them change under this lock
  s.clients = handler_->clients();
  for (const proto::leak_row& r : handler_->top_live_clients(metrics::max_client_series))
    s.top_clients.push_back({r.id, r.pid, r.name, r.live_bytes});
  s.control = control_stats_;
  s.valid = true;
  return s;
}

error daemon::bind_socket() {
  const std::string& path = settings_.socket_path;
  if (error e = make_socket_dir(path); e.code != errc::ok) return e;
  if (error e = clear_stale_socket(path); e.code != errc::ok) return e;
  std::error_code ec;
  acceptor_.open(stream(), ec);
  if (!ec) acceptor_.bind(stream::endpoint(path), ec);
  if (ec) return {errc::os_error, "cannot bind " + path + ": " + ec.message()};
  // The mode before listen: until then no one can connect, so no peer ever
  // connects through the mode the umask gave the file at bind (under umask
  // 0, anyone's).
  if (chmod(path.c_str(), settings_.socket_mode) != 0)
    return {errc::os_error, "cannot set the mode of " + path + ": " + std::strerror(errno)};
  acceptor_.listen(asio::socket_base::max_listen_connections, ec);
  if (!ec) acceptor_.native_non_blocking(true, ec);  // refuse_with_spare's accept must not block
  if (ec) return {errc::os_error, "cannot listen on " + path + ": " + ec.message()};
  return {};
}

bool daemon::peer_allowed(session& s) {
  ucred cred{};
  socklen_t len = sizeof cred;
  if (getsockopt(s.fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return false;
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
    if (stopping_ || ec == asio::error::operation_aborted) co_return;
    reap_sessions(false);
    if (!ec) start_session(std::move(sock));
    else co_await accept_failed(ec);
  }
}

// Asio's next accept tries again at once, and out of descriptors it fails
// at once, whether or not a client waits: never return without having
// taken a connection or waited.
awaitable<void> daemon::accept_failed(const std::error_code& ec) {
  // Asio's own category does not compare equal to std::errc: name the errnos.
  const bool out_of_fds = ec == asio::error::no_descriptors ||  // EMFILE
                          ec == std::error_code(ENFILE, asio::error::get_system_category());
  if (out_of_fds) {
    const spare_result r = refuse_with_spare();
    if (r == spare_result::refused) co_return;  // that client was answered; the next may wait already
    if (r == spare_result::none_pending) {  // the failure was speculative: wait for a client
      auto [e] = co_await acceptor_.async_wait(stream::acceptor::wait_read, use_tuple);
      if (!e || e == asio::error::operation_aborted) co_return;
    }
  }
  warn_accept_error("accept failed: " + ec.message());
  accept_backoff_.expires_after(accept_backoff);
  co_await accept_backoff_.async_wait(use_tuple);  // cancelled by stop()
}

// The classic trick: the spare descriptor is given up for a moment so the
// waiting client can be accepted and told why, instead of hanging in the
// backlog until someone else disconnects.
daemon::spare_result daemon::refuse_with_spare() {
  if (spare_fd_ < 0) spare_fd_ = open_spare_fd();  // lost to a race the last time
  if (spare_fd_ < 0) return spare_result::failed;
  ::close(spare_fd_);
  const int fd = ::accept4(acceptor_.native_handle(), nullptr, nullptr, SOCK_CLOEXEC);
  const int accept_errno = errno;
  if (fd >= 0) {
    turn_away(fd, errc::unavailable, "shmallocd is out of file descriptors", /*unseen=*/true);
    ::close(fd);
  }
  spare_fd_ = open_spare_fd();  // the number just freed, unless another thread took it: then the next call retries
  if (fd >= 0) {
    warn_accept_error("out of file descriptors: refusing new connections");
    return spare_result::refused;
  }
  return accept_errno == EAGAIN || accept_errno == EWOULDBLOCK ? spare_result::none_pending : spare_result::failed;
}

// At most one warning a second: a client retrying in a loop must not flood the log.
void daemon::warn_accept_error(const std::string& what) {
  ++accept_errors_unreported_;
  const auto now = clock_type::now();
  if (last_accept_warning_ && now - *last_accept_warning_ < accept_warning_interval) return;
  spdlog::warn("{} ({} time(s) since the last such warning)", what, accept_errors_unreported_);
  last_accept_warning_ = now;
  accept_errors_unreported_ = 0;
}

// Refused for want of room: over max-connections, no thread, no descriptor.
// unseen: accepted here, not counted as a connection yet (one lock for both).
void daemon::turn_away(int fd, errc code, const std::string& why, bool unseen) {
  {
    std::lock_guard lock(heap_mutex_);
    if (unseen) ++control_stats_.connections;
    ++control_stats_.connections_refused;
  }
  send_refusal(fd, code, why);
}

// On the io_context's thread: checks the peer, then gives the connection a
// thread. A refusal is one small frame, sent without blocking.
//
// The socket leaves Asio's reactor: registered there, every request and
// every reply read by the client would wake this thread's epoll_wait for
// nothing (edge-triggered events nobody waits on), a context switch per
// event on the session's path.
void daemon::start_session(stream::socket socket) {
  std::error_code released;
  const int fd = socket.release(released);
  if (released) return;
  auto owned = std::make_unique<session>(fd);
  session& s = *owned;
  {
    std::lock_guard lock(heap_mutex_);
    ++control_stats_.connections;
  }
  if (const int flags = fcntl(fd, F_GETFL); flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    spdlog::error("cannot make a connection's socket blocking: {}", std::strerror(errno));
    turn_away(fd, errc::os_error, "shmallocd cannot serve this connection");
    return;
  }
  if (!peer_allowed(s)) {
    {
      std::lock_guard lock(heap_mutex_);
      ++control_stats_.peers_refused;
    }
    spdlog::warn("refused connection from pid {} uid {}: not an allowed uid or gid", s.client.pid, s.client.uid);
    send_refusal(fd, errc::permission_denied, "uid " + std::to_string(s.client.uid) + " may not use this heap");
    return;  // the socket closes with the session
  }
  s.deadline = clock_type::now() + std::chrono::nanoseconds(settings_.hello_timeout_ns);
  s.frame_timeout = std::chrono::nanoseconds(settings_.frame_timeout_ns);
  std::lock_guard lock(sessions_mutex_);
  const auto open = std::count_if(sessions_.begin(), sessions_.end(), [](const auto& o) { return !o->closed; });
  if (open >= settings_.max_connections) {
    spdlog::warn("refused connection from pid {}: {} connections open (max-connections)", s.client.pid, open);
    turn_away(fd, errc::unavailable, "shmallocd serves at most " + std::to_string(settings_.max_connections) +
                                         " connections (max-connections)");
    return;
  }
  try {
    s.thread = std::thread([this, &s] { serve(s); });
  } catch (const std::system_error& e) {  // out of threads: this client is refused, the others go on
    spdlog::error("cannot start a thread for pid {}: {}", s.client.pid, e.what());
    turn_away(fd, errc::unavailable, std::string("shmallocd cannot start a session thread: ") + e.what());
    return;
  }
  sessions_.push_back(std::move(owned));
}

// On the session's thread, from connection to disconnection.
void daemon::serve(session& s) {
  read_frames(s);
  if (stopping_) {  // stop() shut the reading side down: say why before closing
    const auto notice = proto::make_reply(proto::msg::shutdown, 0, errc::unavailable, "shmallocd is stopping");
    ::send(s.fd, notice.data(), notice.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
  }
  // Once stopping, a client may still run, allocating from its spans
  // without asking: they stay its own. With --keep-heap it reattaches them
  // to the next daemon; without, the heap's name goes but the client's
  // mapping stays until it detaches (taken back, its next free into one
  // would abort as if it were the caller's fault).
  const bool keep = stopping_;
  const bool registered = s.client.id != 0;  // observers and probes change nothing to check
  if (registered)
    spdlog::info("{} disconnected; {} spans {}", describe(s.client), s.client.spans.size(),
                 !keep                  ? "taken back"
                 : settings_.keep_heap ? "left to it in the kept heap"
                                       : "left to it until it detaches");
  {
    std::lock_guard lock(heap_mutex_);
    SHMALLOC_CRASH_POINT("daemon.session_end");
    if (keep)
      handler_->leave(s.client);
    else
      handler_->disconnect(s.client);
#if SHMALLOC_DEBUG_LEVEL >= 1
    // O(pages) under the heap lock: seconds for a 1 TiB heap in a debug
    // build, which a probe's disconnect must not make the next hello wait.
    if (registered) {
      const verify_report r = verify_heap(*heap_);
      SHMALLOC_CHECK(r.ok(), r.summary().c_str());
    }
#endif
  }
  end_session(s);
}

void daemon::end_session(session& s) {
  std::lock_guard lock(sessions_mutex_);
  ::close(s.fd);
  s.fd = -1;
  s.closed = true;  // reap_sessions joins the thread and frees the session
  session_ended_.notify_all();
}

// On the io_context's thread: joins the threads of ended sessions (all of
// them, once stopping: their sockets are shut down, so they end).
void daemon::reap_sessions(bool all) {
  std::list<std::unique_ptr<session>> ended;
  {
    std::lock_guard lock(sessions_mutex_);
    for (auto it = sessions_.begin(); it != sessions_.end();) {
      auto next = std::next(it);
      if (all || (*it)->closed) ended.splice(ended.end(), sessions_, it);
      it = next;
    }
  }
  for (auto& s : ended) s->thread.join();
}

// Sets a socket timeout (SO_RCVTIMEO or SO_SNDTIMEO) to want (0: none),
// with a system call only when it changes: never for a client that has said
// hello and sends whole frames; before hello, or with a frame left
// incomplete, once per recv or send, as what is left of the deadline shrinks.
static bool set_timeout(int fd, int option, std::chrono::nanoseconds& current, std::chrono::nanoseconds want) {
  if (want == current) return true;
  const auto us = std::chrono::duration_cast<std::chrono::microseconds>(want).count();
  timeval tv{static_cast<time_t>(us / 1'000'000), static_cast<suseconds_t>(us % 1'000'000)};
  if (setsockopt(fd, SOL_SOCKET, option, &tv, sizeof tv) != 0) return false;
  current = want;
  return true;
}

// What is left of the session's deadline, rounded up to a microsecond (0:
// no deadline); nullopt, counted as a deadline close, once it has passed.
std::optional<std::chrono::nanoseconds> daemon::time_left(session& s) {
  if (s.deadline == clock_type::time_point::max()) return std::chrono::nanoseconds{0};
  const auto left = std::chrono::ceil<std::chrono::microseconds>(s.deadline - clock_type::now());
  if (left.count() > 0) return left;
  std::lock_guard lock(heap_mutex_);
  ++control_stats_.deadline_closes;
  return std::nullopt;
}

// Reads until in holds at least want bytes, taking whatever has arrived (one
// read usually brings a whole frame). Bytes of a started frame must all come
// within the frame timeout. False when the connection ends or a deadline
// passes.
bool daemon::fill(session& s, std::vector<std::uint8_t>& in, std::size_t want) {
  const int fd = s.fd;
  while (in.size() < want) {
    if (!in.empty())  // a frame (or its header) has started: it must finish in time
      s.deadline = std::min(s.deadline, clock_type::now() + s.frame_timeout);
    const auto timeout = time_left(s);
    if (!timeout || !set_timeout(fd, SO_RCVTIMEO, s.recv_timeout, *timeout)) return false;
    const std::size_t had = in.size();
    in.resize(had + std::max<std::size_t>(want - had, 4096));
    const ssize_t n = ::recv(fd, in.data() + had, in.size() - had, 0);
    in.resize(had + static_cast<std::size_t>(std::max<ssize_t>(n, 0)));
    if (n == 0) return false;  // the peer closed, or stop() shut the socket down
    if (n < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) return false;
    // EAGAIN: the timeout ran out, and the loop's deadline check closes.
  }
  return true;
}

void daemon::read_frames(session& s) {
  std::vector<std::uint8_t> in;  // bytes read and not yet handled
  for (;;) {
    if (!fill(s, in, proto::header_bytes)) return;
    const proto::frame_header h = proto::decode_header(in.data());
    if (std::string why = proto::check_header(h); !why.empty()) {
      {
        std::lock_guard lock(heap_mutex_);
        control_stats_.record_refused(h.type, errc::protocol_error);
      }
      send_reply(s, proto::make_reply(proto::msg::ok, h.request_id, errc::protocol_error, why));
      return;  // the framing is broken: nothing after this can be trusted
    }
    const std::size_t frame_bytes = proto::header_bytes + h.length;
    if (!fill(s, in, frame_bytes)) return;
    reply r = handle(s, h, std::span<const std::uint8_t>(in).subspan(proto::header_bytes, h.length));
    in.erase(in.begin(), in.begin() + static_cast<std::ptrdiff_t>(frame_bytes));
    // A client that has said hello may idle; one that has not keeps its deadline.
    s.deadline = s.client.id == 0 ? s.deadline : clock_type::time_point::max();
    // Once stopping, the requests still queued go unanswered: stop() shut
    // the reading side down, and serve() sends the notice next.
    if (!send_reply(s, r.frame) || r.close || stopping_) return;
  }
}

// One blocking send, which takes a small reply whole. A client that has said
// hello and stops reading blocks only this session's thread, until it reads
// again or the daemon stops; one that has not said hello (it may ask for
// stats and tables) must read its replies within its hello deadline.
bool daemon::send_reply(session& s, const std::vector<std::uint8_t>& frame) {
  for (std::size_t at = 0; at < frame.size();) {
    const auto timeout = time_left(s);
    if (!timeout || !set_timeout(s.fd, SO_SNDTIMEO, s.send_timeout, *timeout)) return false;
    const ssize_t n = ::send(s.fd, frame.data() + at, frame.size() - at, MSG_NOSIGNAL);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;  // time_left decides
    if (n <= 0) return false;
    at += static_cast<std::size_t>(n);
  }
  return true;
}

reply daemon::handle(session& s, const proto::frame_header& h, std::span<const std::uint8_t> payload) {
  const auto start = clock_type::now();
  const bool registered = s.client.id != 0;
  reply r;
  {
    std::lock_guard lock(heap_mutex_);
    SHMALLOC_CRASH_POINT("daemon.request");
    r = handler_->handle(s.client, h, payload);
    SHMALLOC_CRASH_POINT("daemon.handled");
    const auto status = static_cast<errc>(proto::decode_header(r.frame.data()).status);
    control_stats_.record(h.type, status, std::chrono::duration<double>(clock_type::now() - start).count(),
                          r.shortfall);
  }
  if (!registered && s.client.id != 0) spdlog::info("{} connected", describe(s.client));  // its hello
  return r;
}

// Every tick, sweeps the spans remote freers pushed on the sweep queue
// (remote frees into spans the daemon holds come back within a tick, at a
// cost of the spans freed into, whatever the heap's size), and the next
// stretch of span ids (the backstop, for a freer killed mid-push); once a
// second, the slower work: orphans whose grace ran out, and the scavenger.
awaitable<void> daemon::housekeeping() {
  for (std::uint64_t tick = 1; !stopping_; ++tick) {
    housekeeping_timer_.expires_after(housekeeping_tick);
    auto [ec] = co_await housekeeping_timer_.async_wait(use_tuple);
    if (ec || stopping_) co_return;
    reap_sessions(false);
    std::lock_guard lock(heap_mutex_);
    const bool full = tick % ticks_per_full_pass == 0;
    SHMALLOC_CRASH_POINT("daemon.sweep_queue");
    drain_sweep_queue(heap_->view(), heap_->state().span_pool.high_water, [&](span_id id) { sweep_if_central(id); });
    sweep_backstop_stretch();
    if (!full) continue;
    handler_->sample_held(heap_->now(), false);  // leaks' growth windows, whatever the requests
    profile_sweep(heap_->view());  // samples whose client was killed while it filled them
    SHMALLOC_CRASH_POINT("daemon.expire");
    if (std::size_t n = handler_->expire_orphans(settings_.reattach_grace_ns))
      spdlog::info("{} client(s) of the previous daemon did not reattach; their spans were taken back", n);
    if (std::uint64_t released = heap_->scavenge(settings_.scavenge_delay_ns))
      spdlog::debug("scavenger returned {} bytes to the OS", released);
  }
}

// REQUIRES: heap_mutex_ held. The backstop's next stretch of span ids,
// wrapping at the table's high water.
void daemon::sweep_backstop_stretch() {
  const std::uint32_t high_water = heap_->state().span_pool.high_water;
  const std::uint64_t ticks_per_pass =
      std::max<std::uint64_t>(1, settings_.sweep_backstop_ns / std::chrono::nanoseconds(housekeeping_tick).count());
  const auto stretch = static_cast<std::uint32_t>(
      std::clamp<std::uint64_t>(high_water / ticks_per_pass, std::min(high_water, 1u), backstop_max_spans_per_tick));
  for (std::uint32_t n = 0; n < stretch; ++n) {
    if (backstop_cursor_ >= high_water) backstop_cursor_ = 0;
    sweep_if_central(span_id{backstop_cursor_++});
  }
}

// REQUIRES: heap_mutex_ held. Folds a span's pending remote frees if the
// daemon holds it (state and class are the daemon's own writes; a client
// holding the span folds them itself).
void daemon::sweep_if_central(span_id id) {
  const mspan& s = heap_->span(id);
  if (s.state.load(std::memory_order_relaxed) == mspan_state::central)
    heap_->central(span_class{s.span_class}).sweep_span(id);
}

void daemon::stop() {
  if (stopping_) return;
  stopping_ = true;
  std::error_code ec;
  acceptor_.close(ec);
  signals_.cancel(ec);
  hangup_.cancel(ec);
  housekeeping_timer_.cancel();
  accept_backoff_.cancel();
  // Each session's thread wakes from its recv, sends the notice, reclaims
  // and closes; run() waits for them (end_all_sessions).
  std::lock_guard lock(sessions_mutex_);
  shutdown_sessions_locked(SHUT_RD);
}

// REQUIRES: sessions_mutex_ held, so that no fd shut down here has been
// closed (and reused) by its session. how: SHUT_RD wakes a thread in recv;
// SHUT_RDWR also one blocked in send.
void daemon::shutdown_sessions_locked(int how) {
  for (const auto& s : sessions_)
    if (!s->closed) ::shutdown(s->fd, how);
}

// After stop(): waits a moment for every session to end on its own, then
// shuts down whole the sockets of sessions still blocked sending to a
// client that does not read (their send fails), and joins every thread.
void daemon::end_all_sessions() {
  constexpr auto grace = std::chrono::seconds(1);
  {
    std::unique_lock lock(sessions_mutex_);
    session_ended_.wait_for(lock, grace, [this] {
      return std::all_of(sessions_.begin(), sessions_.end(), [](const auto& s) { return s->closed; });
    });
    shutdown_sessions_locked(SHUT_RDWR);  // those still open are stuck sending
  }
  reap_sessions(true);
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
  settings_.max_caches_per_client = next->max_caches_per_client;
  settings_.scavenge_delay_ns = next->scavenge_delay_ns;
  settings_.reattach_grace_ns = next->reattach_grace_ns;
  settings_.sweep_backstop_ns = next->sweep_backstop_ns;
  settings_.allow_uids = next->allow_uids;
  settings_.allow_gids = next->allow_gids;
  if (next->max_connections != settings_.max_connections) warn_if_fd_limit_low(next->max_connections);
  settings_.max_connections = next->max_connections;
  spdlog::set_level(spdlog::level::from_str(settings_.log_level));
  {
    std::lock_guard lock(heap_mutex_);
    handler_->set_settings(handler_settings{settings_.quota_bytes, settings_.max_caches_per_client});
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
  end_all_sessions();  // before the heap goes: each thread takes its client's spans back
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
