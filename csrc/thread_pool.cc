#include "thread_pool.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

namespace ackpt {

ThreadPool::ThreadPool(unsigned threads, int nice) : size_(threads ? threads : 1), pid_(::getpid()) {
  threads_.reserve(size_ - 1);
  for (unsigned w = 1; w < size_; ++w) threads_.emplace_back([this, w, nice] { worker_main(w, nice); });
}

bool ThreadPool::forked() const { return ::getpid() != pid_; }

ThreadPool::~ThreadPool() {
  if (forked()) {
    // The std::thread objects describe threads of the parent: joining or destroying them here
    // would terminate the process, so they are leaked.
    new std::vector<std::thread>(std::move(threads_));
    sync_.release();
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::work(unsigned worker) {
  while (!failed_.load(std::memory_order_relaxed)) {
    const size_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n_) return;
    try {
      (*fn_)(i, worker);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      failed_.store(true, std::memory_order_relaxed);
    }
  }
}

void ThreadPool::worker_main(unsigned worker, int nice) {
  if (nice > 0) {
    // A new thread starts with its creator's niceness; this one's alone changes.
    const auto tid = static_cast<id_t>(::syscall(SYS_gettid));
    errno = 0;
    const int now = ::getpriority(PRIO_PROCESS, tid);
    if (errno == 0) (void)::setpriority(PRIO_PROCESS, tid, std::min(19, now + nice));
  }
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    work(worker);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--busy_ == 0) done_.notify_all();
    }
  }
}

void ThreadPool::run(size_t n, const Fn& fn) {
  if (n == 0) return;
  std::lock_guard<std::mutex> batch(run_mu_);
  fn_ = &fn;
  n_ = n;
  next_.store(0);
  failed_.store(false);
  error_ = nullptr;
  const bool parallel = n > 1 && !threads_.empty() && !forked();
  if (parallel) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy_ = static_cast<unsigned>(threads_.size());
      ++generation_;
    }
    wake_.notify_all();
  }
  work(0);
  if (parallel) {
    std::unique_lock<std::mutex> lock(mu_);
    done_.wait(lock, [&] { return busy_ == 0; });
  }
  fn_ = nullptr;
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

}  // namespace ackpt
