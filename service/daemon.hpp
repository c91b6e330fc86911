// daemon.hpp: shmallocd, the one writer of mheap and mcentral.
//
// One thread runs the io_context and is the heap's only writer (Asio's
// single-threaded server shape); the one lock, heap_mutex_, only keeps the
// metrics scrape (below) from reading while that thread writes. Each connection is a
// session: a coroutine reading length-prefixed frames, raced against a
// watchdog that closes the socket when its deadline passes (before hello,
// and while a started frame is incomplete), so a stalled peer cannot hold
// resources. When a connection ends for any reason the request handler takes
// back the client's spans. SIGHUP re-reads the config file and environment
// and applies what can change live: log level, quota, scavenger delay.
//
// Metrics: prometheus-cpp serves /metrics from its own (civetweb) threads.
// A scrape samples the heap under heap_mutex_, which the daemon's thread
// holds whenever it changes mheap, mcentral or the client registry, so each
// scrape sees one consistent heap (metrics/collector.hpp). Uncontended, the
// lock costs tens of nanoseconds against a request's microseconds.
#pragma once

#include <asio.hpp>
#include <memory>
#include <mutex>
#include <set>

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
  // From the daemon's own thread (signal handlers, tests driving it).
  void stop();
  // From any thread: asks the daemon's thread to stop.
  void request_stop() { asio::post(io_, [this] { stop(); }); }

  const std::string& socket_path() const noexcept { return settings_.socket_path; }
  request_handler& handler() noexcept { return *handler_; }
  // The port /metrics is served on (0 when metrics are off).
  std::uint16_t metrics_port() const noexcept { return metrics_ ? metrics_->port() : 0; }

 private:
  struct session;
  explicit daemon(const daemon_settings& settings);
  error bind_socket();
  asio::awaitable<void> accept_loop();
  asio::awaitable<void> serve(std::shared_ptr<session> s);
  asio::awaitable<void> read_frames(std::shared_ptr<session> s);
  asio::awaitable<void> watchdog(std::shared_ptr<session> s);
  asio::awaitable<bool> fill(session& s, std::vector<std::uint8_t>& in, std::size_t want);
  asio::awaitable<std::error_code> send_reply(session& s, const std::vector<std::uint8_t>& frame);
  reply handle(session& s, const proto::frame_header& h, std::span<const std::uint8_t> payload);
  std::chrono::steady_clock::duration watchdog_period() const;
  asio::awaitable<void> housekeeping();
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
  std::unique_ptr<segment> seg_;
  std::unique_ptr<mheap> heap_;
  std::unique_ptr<request_handler> handler_;
  std::set<std::shared_ptr<session>> sessions_;
  bool stopping_ = false;
  bool adopted_ = false;
  std::mutex heap_mutex_;  // see the comment at the top
  metrics::control_stats control_stats_;
  std::vector<std::shared_ptr<prometheus::Collectable>> collectors_;  // the server holds weak_ptrs
  // Last, so it is destroyed first: no scrape runs once the heap goes.
  std::unique_ptr<metrics::metrics_server> metrics_;
};

}  // namespace shmalloc::service
