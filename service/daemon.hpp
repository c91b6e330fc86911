// daemon.hpp: shmallocd, the one writer of mheap and mcentral.
//
// Threads. The io_context's thread accepts connections, runs housekeeping
// (sweeps, orphans, the scavenger) and handles signals. Each accepted
// connection is a session with a thread of its own (one per client process,
// plus shmallocctl's; at most max-connections, the rest are refused), which
// reads length-prefixed frames with a blocking recv and answers each with
// one send: two system calls per request, as few as a bare echo server
// makes. Sessions ran on the event loop before; that cost an epoll_wait and
// often Asio's speculative read per request, and in bench case 8 (all on
// one CPU) a refill round trip took about 1.26 times a bare echo's against
// about 1.03 now. Every change to mheap, mcentral, control statistics or
// the client registry is made under heap_mutex_, by whichever thread makes
// it, so requests are still handled one at a time and a metrics scrape sees
// one consistent heap. Besides that lock, a session's thread waits only on
// its own socket: a client that stops reading holds up only itself.
//
// Deadlines: before hello, and while a started frame is incomplete, the
// session's socket timeouts (SO_RCVTIMEO, and before hello SO_SNDTIMEO too)
// are what is left of its deadline, so a peer that stalls, or asks for
// tables without hello and never reads them, is closed on time without a
// timer. A client that has said hello may idle, and may be slow to read.
// When a connection ends for any reason its thread takes back the client's
// spans.
//
// Stopping shuts the reading side of every session's socket down: its
// thread finishes the reply it is on, leaves any requests still queued
// unanswered, sends the shutdown notice (only a session's own thread writes
// to its socket, so a notice never splits a reply), takes the spans back
// and ends. A thread still blocked after a second, sending to a client that
// does not read, has its socket shut down whole. The threads are joined
// before the heap goes. SIGHUP re-reads the config file and environment and
// applies what can change live: log level, quota, max-caches-per-client,
// scavenger delay, allowed uids and gids, max-connections.
//
// Descriptors: at start the soft RLIMIT_NOFILE is raised to the hard limit.
// If accept still fails for want of one (EMFILE, ENFILE), a spare descriptor
// held since start is given up for a moment so the waiting client can be
// accepted, told why, and closed; the accept loop never retries at once,
// which would spin while the client waited in the backlog unanswered.
//
// Metrics: prometheus-cpp serves /metrics from its own (civetweb) threads.
// A scrape samples the heap under heap_mutex_ (metrics/collector.hpp).
// Uncontended, the lock costs tens of nanoseconds against a request's
// microseconds.
#pragma once

#include <asio.hpp>
#include <atomic>
#include <condition_variable>
#include <list>
#include <memory>
#include <mutex>
#include <optional>

#include "metrics/collector.hpp"
#include "metrics/server.hpp"

#include "service/config.hpp"
#include "service/request_handler.hpp"

namespace shmalloc::service {

class daemon {
 public:
  // Creates (or adopts) the heap, takes the heap's lock and binds the socket.
  static result<std::unique_ptr<daemon>> open(const daemon_settings& settings);
  ~daemon();

  // Serves until SIGTERM or SIGINT (or stop()); then tells clients, closes
  // them, removes the socket and, unless keep_heap, the heap.
  void run();
  // From the io_context's thread (signal handlers, tests driving it).
  void stop();
  // From any thread: asks the io_context's thread to stop.
  void request_stop() { asio::post(io_, [this] { stop(); }); }

  const std::string& socket_path() const noexcept { return settings_.socket_path; }
  // The port /metrics is served on (0 when metrics are off).
  std::uint16_t metrics_port() const noexcept { return metrics_ ? metrics_->port() : 0; }

 private:
  struct session;
  explicit daemon(const daemon_settings& settings);
  error bind_socket();
  asio::awaitable<void> accept_loop();
  asio::awaitable<void> accept_failed(const std::error_code& ec);
  enum class spare_result { refused, none_pending, failed };
  spare_result refuse_with_spare();
  void warn_accept_error(const std::string& what);
  void start_session(asio::local::stream_protocol::socket socket);
  void turn_away(int fd, errc code, const std::string& why, bool unseen = false);
  void serve(session& s);
  void read_frames(session& s);
  bool fill(session& s, std::vector<std::uint8_t>& in, std::size_t want);
  bool send_reply(session& s, const std::vector<std::uint8_t>& frame);
  reply handle(session& s, const proto::frame_header& h, std::span<const std::uint8_t> payload);
  void end_session(session& s);
  std::optional<std::chrono::nanoseconds> time_left(session& s);
  void reap_sessions(bool all);
  void end_all_sessions();
  void shutdown_sessions_locked(int how);
  asio::awaitable<void> housekeeping();
  void sweep_backstop_stretch();
  void sweep_if_central(span_id id);
  bool peer_allowed(session& s);
  void finish();
  void await_hangup();
  void reload();
  error start_metrics();
  metrics::metrics_sample sample();

  daemon_settings settings_;
  asio::io_context io_{1};
  asio::local::stream_protocol::acceptor acceptor_{io_};
  asio::signal_set signals_{io_};
  asio::signal_set hangup_{io_};
  asio::steady_timer housekeeping_timer_{io_};
  asio::steady_timer accept_backoff_{io_};  // after an accept error the spare could not answer
  int spare_fd_ = -1;  // /dev/null, given up to accept a connection when out of descriptors
  std::optional<std::chrono::steady_clock::time_point> last_accept_warning_;  // io_context's thread
  std::uint64_t accept_errors_unreported_ = 0;  // since the last warning
  std::unique_ptr<segment> seg_;
  std::unique_ptr<mheap> heap_;
  std::unique_ptr<request_handler> handler_;
  std::mutex sessions_mutex_;  // guards sessions_ and every session's socket closing
  std::list<std::unique_ptr<session>> sessions_;
  std::condition_variable session_ended_;  // with sessions_mutex_
  std::atomic<bool> stopping_{false};  // set by stop(); read by session threads for the notice
  bool adopted_ = false;
  std::mutex heap_mutex_;  // see the comment at the top
  std::uint32_t backstop_cursor_ = 0;  // the next span id the backstop sweep looks at (heap_mutex_)
  metrics::control_stats control_stats_;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectors_;  // the server holds weak_ptrs
  // Last, so it is destroyed first: no scrape runs once the heap goes.
  std::unique_ptr<metrics::metrics_server> metrics_;
};

}  // namespace shmalloc::service
