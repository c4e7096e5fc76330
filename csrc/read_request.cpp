#include "read_request.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "errors.h"

namespace klotski {

OpenFile::~OpenFile() {
  if (direct_fd >= 0) ::close(direct_fd);
  if (posix_fd >= 0) ::close(posix_fd);
}

int OpenFile::buffered_fd() {
  std::lock_guard<std::mutex> g(mu);
  if (posix_fd < 0) {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
      int err = errno;
      throw OSErrorWithPath(err, "cannot reopen '" + path + "' for buffered reads: " + std::strerror(err), path);
    }
    posix_fd = fd;
  }
  return posix_fd;
}

uint64_t OpenFile::size() const {
  struct stat st;
  int fd = direct_fd >= 0 ? direct_fd : posix_fd;
  return (fd >= 0 && fstat(fd, &st) == 0) ? static_cast<uint64_t>(st.st_size) : 0;
}

ReadTicket::ReadTicket(std::string path, uint64_t offset, uint64_t nbytes, bool direct, size_t pieces)
    : path_(std::move(path)), offset_(offset), nbytes_(nbytes), direct_(direct), pending_(pieces) {}

bool ReadTicket::done() {
  std::lock_guard<std::mutex> g(mu_);
  return pending_ == 0;
}

std::string ReadTicket::describe() const { return "read of " + describe_request(path_, offset_, nbytes_); }

void ReadTicket::finish_piece(std::exception_ptr error) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (error && !error_) error_ = error;
    if (pending_ > 0) --pending_;
  }
  cv_.notify_all();
}

void ReadTicket::wait(double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  if (!wait_interruptibly(lk, cv_, timeout_s, [&] { return pending_ == 0; })) {
    throw WaitTimeout(describe() + " not finished after " + std::to_string(timeout_s) + " s");
  }
  if (error_) std::rethrow_exception(error_);
}

void ReadTicket::rethrow_if_failed() {
  std::lock_guard<std::mutex> g(mu_);
  if (pending_ == 0 && error_) std::rethrow_exception(error_);
}

bool ReadPiece::fall_back_to_posix(int err) {
  if (!(direct && err == EINVAL && allow_fallback && got == 0)) return false;
  file->direct.store(false);  // this file refuses O_DIRECT reads: buffered from now on
  ticket->fell_back_to_posix();
  direct = false;
  return true;
}

std::exception_ptr ReadPiece::os_error(int err) const {
  return std::make_exception_ptr(OSErrorWithPath(
      err,
      ticket->describe() + " failed: " + std::strerror(err) + " (read of " + std::to_string(len - got) +
          " bytes at " + std::to_string(off + got) + ")",
      ticket->path()));
}

std::exception_ptr ReadPiece::short_read() const {
  return std::make_exception_ptr(ShortReadError(
      "short read: " + ticket->describe() + " reaches past end of file (file is " + std::to_string(file->size()) +
      " bytes, request ends at " + std::to_string(ticket->offset() + ticket->nbytes()) + "); got " +
      std::to_string(got) + " of " + std::to_string(need) + " bytes at " + std::to_string(off)));
}

std::exception_ptr ReadPiece::cancelled() const {
  return std::make_exception_ptr(ReaderClosed(ticket->describe() + " cancelled"));
}

std::exception_ptr ReadPiece::dropped() const {
  return std::make_exception_ptr(
      ReaderClosed(ticket->describe() + " was cancelled: the reader was closed before it ran"));
}

void read_piece_blocking(ReadPiece& p) {
  int fd = p.fd();
  while (p.got < p.len) {
    ssize_t r = ::pread(fd, p.dst + p.got, p.len - p.got, static_cast<off_t>(p.off + p.got));
    if (r < 0) {
      int err = errno;
      if (err == EINTR) continue;
      if (p.fall_back_to_posix(err)) {
        fd = p.fd();
        continue;
      }
      std::rethrow_exception(p.os_error(err));
    }
    if (r == 0) break;  // end of file
    p.got += static_cast<size_t>(r);
  }
  if (p.got < p.need) std::rethrow_exception(p.short_read());
}

}  // namespace klotski
