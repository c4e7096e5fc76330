#include "read_engine.h"

#include <algorithm>
#include <stdexcept>

#include "thread_pool.h"
#include "uring_engine.h"

namespace klotski {

// AUTO's choice where io_uring works, set from bench/results/disk_read_cpu.md ("Engines"): on the machine
// measured so far io_uring was not faster in GB/s than the thread pool at any request size or depth (it used
// less CPU per request at depth >= 4), so AUTO stays on the thread pool until a machine shows otherwise.
constexpr bool kAutoPrefersUring = false;

EngineKind parse_engine(const std::string& s) {
  std::string u = s;
  std::transform(u.begin(), u.end(), u.begin(), [](unsigned char c) { return std::tolower(c); });
  if (u == "auto") return EngineKind::Auto;
  if (u == "uring" || u == "io_uring") return EngineKind::Uring;
  if (u == "threads") return EngineKind::Threads;
  throw std::invalid_argument("io engine must be auto, uring or threads, got '" + s + "'");
}

namespace {

class ThreadEngine : public ReadEngine {
 public:
  explicit ThreadEngine(size_t num_threads) : pool_(num_threads) {}

  bool submit(std::vector<ReadPiece>& pieces) override {
    std::vector<Task> tasks;
    tasks.reserve(pieces.size());
    for (auto& piece : pieces) {
      auto p = std::make_shared<ReadPiece>(piece);
      Task task;
      task.run = [p] {
        if (p->ticket->cancelled()) {
          p->ticket->finish_piece(p->cancelled());
          return;
        }
        try {
          p->direct = p->direct && p->file->direct.load();
          read_piece_blocking(*p);
          p->ticket->finish_piece(nullptr);
        } catch (...) {
          p->ticket->finish_piece(std::current_exception());
        }
      };
      task.drop = [p] {
        p->ticket->cancel();
        p->ticket->finish_piece(p->dropped());
      };
      tasks.push_back(std::move(task));
    }
    return pool_.submit_all(tasks);
  }
  void shutdown(bool cancel) override { pool_.shutdown(cancel); }
  std::string name() const override { return "threads"; }
  size_t num_threads() const override { return threads_; }
  size_t queue_depth() const override { return threads_; }

 private:
  ThreadPool pool_;
  size_t threads_ = pool_.num_threads();
};

}  // namespace

std::unique_ptr<ReadEngine> make_thread_engine(size_t num_threads) {
  return std::make_unique<ThreadEngine>(num_threads);
}

std::unique_ptr<ReadEngine> make_engine(EngineKind kind, size_t num_threads, size_t queue_depth, std::string* note) {
  if (kind == EngineKind::Threads) {
    *note = "requested";
    return make_thread_engine(num_threads);
  }
  if (kind == EngineKind::Uring) {
    *note = "requested";
    return make_uring_engine(queue_depth);  // throws where io_uring is unavailable
  }
  if (!kAutoPrefersUring) {
    UringSupport s = probe_io_uring();
    *note = std::string("auto: the thread pool (measured as fast as io_uring; io_uring ") +
            (s.available ? "available" : "unavailable: " + s.reason) + ")";
    return make_thread_engine(num_threads);
  }
  try {
    *note = "auto: io_uring available";
    return make_uring_engine(queue_depth);
  } catch (const std::exception& e) {
    *note = std::string("auto: ") + e.what() + "; using the thread pool";
    return make_thread_engine(num_threads);
  }
}

}  // namespace klotski
