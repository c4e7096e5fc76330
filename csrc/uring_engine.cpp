#include "uring_engine.h"

#if __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

// Syscall numbers and setup flags are stable kernel ABI; older headers may lack the newer ones.
#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#define __NR_io_uring_enter 426
#define __NR_io_uring_register 427
#endif
#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8)
#endif
#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif

namespace klotski {

namespace {

int sys_io_uring_setup(unsigned entries, io_uring_params* p) {
  return static_cast<int>(::syscall(__NR_io_uring_setup, entries, p));
}
int sys_io_uring_enter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return static_cast<int>(::syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, nullptr, 0));
}
int sys_io_uring_register(int fd, unsigned opcode, void* arg, unsigned nr_args) {
  return static_cast<int>(::syscall(__NR_io_uring_register, fd, opcode, arg, nr_args));
}

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

template <class T>
T load_acquire(const T* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
template <class T>
void store_release(T* p, T v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// One io_uring instance and its mapped submission/completion rings. Used by a single thread.
class Ring {
 public:
  // Throws std::runtime_error("io_uring unavailable: ...") naming the failing step.
  Ring(unsigned entries, unsigned flags) {
    io_uring_params p;
    std::memset(&p, 0, sizeof p);
    p.flags = flags;
    fd_ = sys_io_uring_setup(entries, &p);
    if (fd_ < 0) {
      last_errno_ = errno;
      throw std::runtime_error("io_uring unavailable: io_uring_setup failed: " + errno_text(errno));
    }
    sq_len_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    cq_len_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    const bool single = p.features & IORING_FEAT_SINGLE_MMAP;
    if (single) sq_len_ = cq_len_ = std::max(sq_len_, cq_len_);
    sq_map_ = map(sq_len_, IORING_OFF_SQ_RING);
    cq_map_ = single ? sq_map_ : map(cq_len_, IORING_OFF_CQ_RING);
    sqes_len_ = p.sq_entries * sizeof(io_uring_sqe);
    sqes_ = static_cast<io_uring_sqe*>(map(sqes_len_, IORING_OFF_SQES));
    auto* sq = static_cast<char*>(sq_map_);
    sq_head_ = reinterpret_cast<unsigned*>(sq + p.sq_off.head);
    sq_tail_ = reinterpret_cast<unsigned*>(sq + p.sq_off.tail);
    sq_mask_ = *reinterpret_cast<unsigned*>(sq + p.sq_off.ring_mask);
    sq_array_ = reinterpret_cast<unsigned*>(sq + p.sq_off.array);
    auto* cq = static_cast<char*>(cq_map_);
    cq_head_ = reinterpret_cast<unsigned*>(cq + p.cq_off.head);
    cq_tail_ = reinterpret_cast<unsigned*>(cq + p.cq_off.tail);
    cq_mask_ = *reinterpret_cast<unsigned*>(cq + p.cq_off.ring_mask);
    cqes_ = reinterpret_cast<io_uring_cqe*>(cq + p.cq_off.cqes);
    sq_entries_ = p.sq_entries;
    tail_ = *sq_tail_;
  }
  ~Ring() { release(); }
  Ring(const Ring&) = delete;
  Ring& operator=(const Ring&) = delete;

  // A zeroed SQE at the tail (published by submit_and_wait), or nullptr when the SQ is full.
  io_uring_sqe* next_sqe() {
    if (tail_ - load_acquire(sq_head_) >= sq_entries_) return nullptr;
    const unsigned idx = tail_ & sq_mask_;
    sq_array_[idx] = idx;
    io_uring_sqe* s = &sqes_[idx];
    std::memset(s, 0, sizeof *s);
    ++tail_;
    return s;
  }
  // Submits every queued SQE and waits for wait_nr completions. Returns >= 0 or -errno.
  int submit_and_wait(unsigned wait_nr) {
    store_release(sq_tail_, tail_);
    const unsigned n = tail_ - load_acquire(sq_head_);
    int r = sys_io_uring_enter(fd_, n, wait_nr, wait_nr ? IORING_ENTER_GETEVENTS : 0);
    return r < 0 ? -errno : r;
  }
  // Takes back SQEs the kernel did not consume (after a failed submit); f(user_data) for each.
  template <class F>
  void drop_unsubmitted(F f) {
    const unsigned head = load_acquire(sq_head_);
    for (unsigned i = head; i != tail_; ++i) f(sqes_[sq_array_[i & sq_mask_]].user_data);
    tail_ = head;
    store_release(sq_tail_, tail_);
  }
  // f(user_data, res) for every completion posted so far.
  template <class F>
  void reap(F f) {
    unsigned head = *cq_head_;
    const unsigned tail = load_acquire(cq_tail_);
    for (; head != tail; ++head) {
      const io_uring_cqe& c = cqes_[head & cq_mask_];
      f(c.user_data, c.res);
    }
    store_release(cq_head_, head);
  }
  int fd() const { return fd_; }
  int last_errno() const { return last_errno_; }

 private:
  void* map(size_t len, off_t what) {
    void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, what);
    if (p == MAP_FAILED) {
      int err = errno;
      release();
      throw std::runtime_error("io_uring unavailable: mmap of the rings failed: " + errno_text(err));
    }
    return p;
  }
  void release() {
    if (sqes_) ::munmap(sqes_, sqes_len_);
    if (cq_map_ && cq_map_ != sq_map_) ::munmap(cq_map_, cq_len_);
    if (sq_map_) ::munmap(sq_map_, sq_len_);
    if (fd_ >= 0) ::close(fd_);
    sqes_ = nullptr;
    sq_map_ = cq_map_ = nullptr;
    fd_ = -1;
  }
  int fd_ = -1;
  int last_errno_ = 0;
  void *sq_map_ = nullptr, *cq_map_ = nullptr;
  size_t sq_len_ = 0, cq_len_ = 0, sqes_len_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  unsigned *sq_head_ = nullptr, *sq_tail_ = nullptr, *sq_array_ = nullptr;
  unsigned *cq_head_ = nullptr, *cq_tail_ = nullptr;
  unsigned sq_mask_ = 0, cq_mask_ = 0, sq_entries_ = 0, tail_ = 0;
  io_uring_cqe* cqes_ = nullptr;
};

// The ring for the engine thread: single issuer + deferred task work (completions are processed only when
// the thread waits for them; kernel >= 6.1), else cooperative task work, else plain.
std::unique_ptr<Ring> make_ring(unsigned entries) {
  const unsigned attempts[] = {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, IORING_SETUP_COOP_TASKRUN, 0};
  for (unsigned flags : attempts) {
    try {
      return std::make_unique<Ring>(entries, flags);
    } catch (const std::runtime_error&) {
      if (flags == 0) throw;  // EINVAL means "flag unknown to this kernel": try fewer; the last try reports
    }
  }
  return nullptr;  // unreachable
}

constexpr uint64_t kWakeTag = ~uint64_t{0};

class UringEngine : public ReadEngine {
 public:
  explicit UringEngine(size_t queue_depth) : depth_(queue_depth), slots_(queue_depth) {
    if (queue_depth == 0 || queue_depth > 4096) {
      throw std::invalid_argument("queue_depth must be in 1..4096, got " + std::to_string(queue_depth));
    }
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC);
    if (wake_fd_ < 0) throw std::runtime_error("io_uring engine: eventfd failed: " + errno_text(errno));
    for (size_t i = queue_depth; i-- > 0;) free_.push_back(static_cast<unsigned>(i));
    thread_ = std::thread([this] { run(); });
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return started_; });
    if (!start_error_.empty()) {
      lk.unlock();
      thread_.join();
      ::close(wake_fd_);
      throw std::runtime_error(start_error_);
    }
  }
  ~UringEngine() override {
    shutdown(true);
    ::close(wake_fd_);
  }

  bool submit(std::vector<ReadPiece>& pieces) override {
    bool wake;
    {
      std::lock_guard<std::mutex> g(mu_);
      if (stopping_) return false;
      for (auto& p : pieces) queue_.push_back(std::move(p));
      wake = sleeping_;
      sleeping_ = false;
    }
    if (wake) kick();
    return true;
  }

  void shutdown(bool cancel) override {
    std::deque<ReadPiece> dropped;
    {
      std::lock_guard<std::mutex> g(mu_);
      stopping_ = true;
      if (cancel) dropped.swap(queue_);
    }
    for (auto& p : dropped) {
      p.ticket->cancel();
      p.ticket->finish_piece(p.dropped());
    }
    kick();
    std::lock_guard<std::mutex> j(join_mu_);
    if (thread_.joinable()) thread_.join();
  }

  std::string name() const override { return "uring"; }
  size_t num_threads() const override { return 1; }
  size_t queue_depth() const override { return depth_; }

 private:
  using Finished = std::vector<std::pair<std::shared_ptr<ReadTicket>, std::exception_ptr>>;

  void kick() {
    uint64_t one = 1;
    while (::write(wake_fd_, &one, sizeof one) < 0 && errno == EINTR) {
    }
  }

  void run() {
    std::string error;
    try {
      ring_ = make_ring(static_cast<unsigned>(depth_ + 1));  // + 1: the eventfd read that wakes us
    } catch (const std::exception& e) {
      error = e.what();
    }
    {
      std::lock_guard<std::mutex> g(mu_);
      start_error_ = error;
      started_ = true;
    }
    cv_.notify_all();
    if (error.empty()) loop();
    ring_.reset();
  }

  void loop() {
    arm_wake();
    Finished finished;
    int failures = 0;
    for (;;) {
      bool stop;
      {
        std::lock_guard<std::mutex> g(mu_);
        while (!free_.empty() && !queue_.empty()) {
          start(std::move(queue_.front()), finished);
          queue_.pop_front();
        }
        stopping_seen_ = stopping_;
        stop = stopping_ && queue_.empty() && free_.size() == depth_;
        sleeping_ = !free_.empty();
      }
      flush(finished);
      if (stop) {
        if (!wake_armed_) break;
        if (!self_kicked_) {  // our eventfd read must complete before the ring goes away
          kick();
          self_kicked_ = true;
        }
      }
      int r = ring_->submit_and_wait(1);
      if (r < 0 && r != -EINTR && r != -EAGAIN && r != -EBUSY) {
        ring_->drop_unsubmitted([&](uint64_t tag) {
          if (tag == kWakeTag) {
            wake_armed_ = false;
          } else {
            release(static_cast<unsigned>(tag), slots_[tag].os_error(-r), finished);
          }
        });
        if (++failures > 3) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      } else {
        failures = 0;
      }
      ring_->reap([&](uint64_t tag, int res) {
        if (tag == kWakeTag) {
          wake_armed_ = false;
          if (!stopping_seen_) arm_wake();
        } else {
          complete(static_cast<unsigned>(tag), res, finished);
        }
      });
      flush(finished);
      if (!wake_armed_ && !stopping_seen_) arm_wake();  // after a failed submit took it back
    }
  }

  void arm_wake() {
    io_uring_sqe* s = ring_->next_sqe();
    if (!s) return;
    s->opcode = IORING_OP_READ;
    s->fd = wake_fd_;
    s->off = ~uint64_t{0};  // the file position: an eventfd has none
    s->addr = reinterpret_cast<uintptr_t>(&wake_buf_);
    s->len = sizeof wake_buf_;
    s->user_data = kWakeTag;
    wake_armed_ = true;
  }

  // A queued piece gets a slot and an SQE (or finishes at once).
  void start(ReadPiece&& piece, Finished& finished) {
    if (piece.ticket->cancelled()) {
      finished.emplace_back(piece.ticket, piece.cancelled());
      return;
    }
    piece.direct = piece.direct && piece.file->direct.load();
    if (piece.got >= piece.len) {  // empty piece (nbytes == 0)
      finished.emplace_back(piece.ticket, piece.got < piece.need ? piece.short_read() : nullptr);
      return;
    }
    const unsigned slot = free_.back();
    free_.pop_back();
    slots_[slot] = std::move(piece);
    prepare(slot, finished);
  }

  // An SQE reading the rest of the slot's piece.
  void prepare(unsigned slot, Finished& finished) {
    ReadPiece& p = slots_[slot];
    int fd;
    try {
      fd = p.fd();
    } catch (...) {
      release(slot, std::current_exception(), finished);
      return;
    }
    io_uring_sqe* s = ring_->next_sqe();
    if (!s) {  // cannot happen: the SQ holds queue_depth + 1 entries
      release(slot, p.os_error(EBUSY), finished);
      return;
    }
    s->opcode = IORING_OP_READ;
    s->fd = fd;
    s->off = p.off + p.got;
    s->addr = reinterpret_cast<uintptr_t>(p.dst + p.got);
    s->len = static_cast<unsigned>(std::min<size_t>(p.len - p.got, size_t{1} << 30));
    s->user_data = slot;
  }

  void complete(unsigned slot, int res, Finished& finished) {
    ReadPiece& p = slots_[slot];
    if (res == -EAGAIN || res == -EINTR) return prepare(slot, finished);
    if (res < 0) {
      if (p.fall_back_to_posix(-res)) return prepare(slot, finished);
      return release(slot, p.os_error(-res), finished);
    }
    if (res == 0) return release(slot, p.got < p.need ? p.short_read() : nullptr, finished);  // end of file
    p.got += static_cast<size_t>(res);
    if (p.got < p.len) return prepare(slot, finished);  // short read: the rest
    release(slot, nullptr, finished);
  }

  void release(unsigned slot, std::exception_ptr error, Finished& finished) {
    finished.emplace_back(std::move(slots_[slot].ticket), error);
    slots_[slot] = ReadPiece{};
    free_.push_back(slot);
  }

  static void flush(Finished& finished) {
    for (auto& [ticket, error] : finished) ticket->finish_piece(error);
    finished.clear();
  }

  const size_t depth_;
  int wake_fd_ = -1;
  std::thread thread_;
  std::mutex join_mu_;
  // Shared with callers, under mu_.
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<ReadPiece> queue_;
  bool stopping_ = false, sleeping_ = false, started_ = false;
  std::string start_error_;
  // The engine thread's own.
  std::unique_ptr<Ring> ring_;
  std::vector<ReadPiece> slots_;
  std::vector<unsigned> free_;
  uint64_t wake_buf_ = 0;
  bool wake_armed_ = false, self_kicked_ = false, stopping_seen_ = false;
};

}  // namespace

UringSupport probe_io_uring() {
  UringSupport s;
  io_uring_params p;
  std::memset(&p, 0, sizeof p);
  int fd = sys_io_uring_setup(4, &p);
  if (fd < 0) {
    s.reason = "io_uring_setup failed: " + errno_text(errno);
    return s;
  }
  constexpr unsigned kOps = 256;
  std::vector<char> buf(sizeof(io_uring_probe) + kOps * sizeof(io_uring_probe_op), 0);
  auto* probe = reinterpret_cast<io_uring_probe*>(buf.data());
  if (sys_io_uring_register(fd, IORING_REGISTER_PROBE, probe, kOps) < 0) {
    s.reason = "IORING_REGISTER_PROBE failed (kernel older than 5.6?): " + errno_text(errno);
  } else if (probe->last_op < IORING_OP_READ || !(probe->ops[IORING_OP_READ].flags & IO_URING_OP_SUPPORTED)) {
    s.reason = "the kernel's io_uring lacks IORING_OP_READ";
  } else {
    s.available = true;
    s.reason = "io_uring_setup works and supports IORING_OP_READ";
  }
  ::close(fd);
  return s;
}

std::unique_ptr<ReadEngine> make_uring_engine(size_t queue_depth) {
  UringSupport s = probe_io_uring();
  if (!s.available) throw std::runtime_error("io_uring unavailable: " + s.reason);
  return std::make_unique<UringEngine>(queue_depth);
}

}  // namespace klotski

#else  // no <linux/io_uring.h>: the extension still builds; io_uring is reported unavailable

#include <stdexcept>

namespace klotski {

UringSupport probe_io_uring() { return {false, "klotski._C was built without <linux/io_uring.h>"}; }

std::unique_ptr<ReadEngine> make_uring_engine(size_t) {
  throw std::runtime_error("io_uring unavailable: klotski._C was built without <linux/io_uring.h>");
}

}  // namespace klotski

#endif
