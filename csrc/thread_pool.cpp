#include "thread_pool.h"

#include <stdexcept>
#include <string>

namespace klotski {

ThreadPool::ThreadPool(size_t num_threads) {
  if (num_threads == 0) throw std::invalid_argument("num_threads must be >= 1, got 0");
  workers_.reserve(num_threads);
  for (size_t i = 0; i < num_threads; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() { shutdown(true); }

bool ThreadPool::submit(Task task) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_) return false;
    queue_.push_back(std::move(task));
  }
  cv_.notify_one();
  return true;
}

bool ThreadPool::submit_all(std::vector<Task>& tasks) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_) return false;
    for (auto& t : tasks) queue_.push_back(std::move(t));
  }
  if (tasks.size() == 1) cv_.notify_one(); else cv_.notify_all();
  return true;
}

void ThreadPool::shutdown(bool cancel) {
  std::deque<Task> dropped;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stopping_ && workers_.empty()) return;
    stopping_ = true;
    if (cancel) dropped.swap(queue_);
  }
  cv_.notify_all();
  for (auto& t : dropped) {
    if (t.drop) t.drop();
  }
  for (auto& w : workers_) {
    if (w.joinable()) w.join();
  }
  workers_.clear();
}

void ThreadPool::worker_loop() {
  for (;;) {
    Task task;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stopping and drained
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    task.run();
  }
}

}  // namespace klotski
