// A fixed pool of native worker threads draining one FIFO of tasks. Each task has a `run` and a `drop`:
// shutdown(cancel=true) calls `drop` (never `run`) on every task still queued, so waiters are woken with
// an error instead of hanging; shutdown(cancel=false) lets the queue drain first.
#pragma once
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace klotski {

struct Task {
  std::function<void()> run;
  std::function<void()> drop;
};

class ThreadPool {
 public:
  explicit ThreadPool(size_t num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // Returns false (and leaves the task alone) once shutdown has begun.
  bool submit(Task task);
  bool submit_all(std::vector<Task>& tasks);
  // Idempotent. Joins the workers; the calling thread must not hold the GIL if tasks need it (ours don't).
  void shutdown(bool cancel);
  size_t num_threads() const { return workers_.size(); }

 private:
  void worker_loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;
  std::vector<std::thread> workers_;
  bool stopping_ = false;
};

}  // namespace klotski
