#include "remat/io/file.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <sstream>

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace remat {
namespace io {

namespace {

std::string errno_text() {
  return std::strerror(errno);
}

// After a rename, the new directory entry is durable only once the folder
// itself is synced. Failure here cannot undo the rename, so it is ignored.
void fsync_parent(const std::string& path) {
  auto slash = path.find_last_of('/');
  std::string dir = slash == std::string::npos ? "." : path.substr(0, slash);
  if (dir.empty()) {
    dir = "/";
  }
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd >= 0) {
    (void)::fsync(fd);
    ::close(fd);
  }
}

constexpr const char* kTempInfix = ".tmp.";

// The <pid> of a temporary file's name NAME.tmp.<pid>, or -1 when `name`
// is not one.
int64_t temp_file_pid(const std::string& name) {
  const auto at = name.rfind(kTempInfix);
  if (at == std::string::npos || at == 0) {
    return -1;
  }
  const std::string digits = name.substr(at + std::strlen(kTempInfix));
  // pid_t is 32 bits: at most 10 digits, and no sign or leading zero.
  if (digits.empty() || digits.size() > 10 || digits[0] == '0' ||
      !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
    return -1;
  }
  const int64_t pid = std::stoll(digits);
  return pid <= INT32_MAX ? pid : -1;
}

} // namespace

std::string temp_path(const std::string& path) {
  return path + kTempInfix + std::to_string(::getpid());
}

AtomicFile::AtomicFile(std::string path)
    : path_(std::move(path)), temp_path_(io::temp_path(path_)) {
  TORCH_CHECK(
      !path_.empty(),
      "AtomicFile: expected a file path, but got an empty string");
  fd_ = ::open(
      temp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
  TORCH_CHECK(fd_ >= 0, "could not create '", temp_path_, "': ", errno_text());
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {
    ::close(fd_);
  }
  if (!committed_) {
    ::unlink(temp_path_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t size_bytes) {
  TORCH_CHECK(
      fd_ >= 0 && !committed_, "AtomicFile: write to '", path_,
      "' after commit()");
  const char* p = static_cast<const char*>(data);
  while (size_bytes > 0) {
    ssize_t n = ::write(fd_, p, size_bytes);
    if (n < 0 && errno == EINTR) {
      continue;
    }
    TORCH_CHECK(n > 0, "could not write to '", temp_path_, "': ", errno_text());
    p += n;
    size_bytes -= static_cast<size_t>(n);
  }
}

void AtomicFile::commit() {
  TORCH_CHECK(
      fd_ >= 0 && !committed_, "AtomicFile: commit() of '", path_, "' twice");
  TORCH_CHECK(
      ::fsync(fd_) == 0, "could not fsync '", temp_path_, "': ", errno_text());
  int rc = ::close(fd_);
  fd_ = -1;
  TORCH_CHECK(rc == 0, "could not close '", temp_path_, "': ", errno_text());
  TORCH_CHECK(
      ::rename(temp_path_.c_str(), path_.c_str()) == 0, "could not rename '",
      temp_path_, "' to '", path_, "': ", errno_text());
  committed_ = true;
  fsync_parent(path_);
}

void write_file_atomic(const std::string& path, const std::string& bytes) {
  AtomicFile file(path);
  file.write(bytes);
  file.commit();
}

void link_file_atomic(const std::string& target, const std::string& link_path) {
  const std::string temp = temp_path(link_path);
  ::unlink(temp.c_str()); // one this process left, killed or failed
  TORCH_CHECK(
      ::link(target.c_str(), temp.c_str()) == 0, "could not link '", target, "' to '", temp,
      "': ", errno_text());
  if (::rename(temp.c_str(), link_path.c_str()) != 0) {
    const std::string why = errno_text();
    ::unlink(temp.c_str());
    TORCH_CHECK(false, "could not rename '", temp, "' to '", link_path, "': ", why);
  }
  fsync_parent(link_path);
}

std::vector<std::string> remove_stale_temp_files(const std::string& dir) {
  std::vector<std::string> names;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) {
    TORCH_CHECK(
        errno == ENOENT || errno == ENOTDIR, "could not list '", dir, "': ", errno_text());
    return {};
  }
  while (const dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    const int64_t pid = temp_file_pid(name);
    // kill(pid, 0) sends nothing: it fails with ESRCH when no such process
    // exists, with EPERM when one does under another user (left alone).
    if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
      names.push_back(name);
    }
  }
  ::closedir(d);
  std::sort(names.begin(), names.end());
  std::vector<std::string> removed;
  for (const auto& name : names) {
    const std::string path = dir + "/" + name;
    struct stat st;
    if (::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
      continue; // gone meanwhile, or a folder, a link, ...: not ours
    }
    if (::unlink(path.c_str()) == 0) {
      removed.push_back(path);
    } else {
      TORCH_CHECK(errno == ENOENT, "could not remove '", path, "': ", errno_text());
    }
  }
  return removed;
}

std::string regular_file_problem(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    return errno_text();
  }
  if (S_ISREG(st.st_mode)) {
    return "";
  }
  const char* kind = S_ISDIR(st.st_mode) ? "a folder"
      : S_ISCHR(st.st_mode)              ? "a character device"
      : S_ISBLK(st.st_mode)              ? "a block device"
      : S_ISFIFO(st.st_mode)             ? "a FIFO"
      : S_ISSOCK(st.st_mode)             ? "a socket"
                                         : "not one";
  return std::string("expected a regular file, but it is ") + kind;
}

void require_regular_file(const std::string& path, const std::string& what) {
  const auto problem = regular_file_problem(path);
  TORCH_CHECK(
      problem.empty(), "could not open ", what.empty() ? "" : what + " ", "'", path, "': ",
      problem);
}

std::string read_file(const std::string& path, int64_t max_bytes) {
  require_regular_file(path);
  std::ifstream in(path, std::ios::binary);
  TORCH_CHECK(in, "could not open '", path, "': ", errno_text());
  in.seekg(0, std::ios::end);
  const auto size = static_cast<int64_t>(in.tellg());
  TORCH_CHECK(size >= 0, "could not find the size of '", path, "'");
  TORCH_CHECK(
      max_bytes < 0 || size <= max_bytes, "'", path, "' is ", size,
      " bytes; expected at most ", max_bytes, " bytes for this kind of file");
  in.seekg(0, std::ios::beg);
  std::string out(static_cast<size_t>(size), '\0');
  in.read(&out[0], static_cast<std::streamsize>(size));
  TORCH_CHECK(
      !in.bad() && in.gcount() == size, "could not read '", path,
      "' (did it change while being read?)");
  return out;
}

} // namespace io
} // namespace remat
