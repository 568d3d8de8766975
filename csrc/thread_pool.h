// A fixed pool of worker threads running one batch of indexed tasks at a time.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace ackpt {

class ThreadPool {
 public:
  // threads >= 1 workers in all; the thread calling run() is one of them, so threads - 1
  // are started here. nice > 0: the started threads run that much nicer than the thread
  // that made the pool (Linux thread niceness; refused changes are ignored).
  explicit ThreadPool(unsigned threads, int nice = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned size() const { return size_; }

  // After fork() the child has none of the pool's threads: there run() does every task on the
  // calling thread (worker 0) and the destructor leaves the dead threads alone.
  //
  // Calls fn(task, worker) for every task in [0, n), worker in [0, size()), each worker
  // running its tasks one after another. The first exception stops the hand-out of further
  // tasks; run() waits for the tasks in progress, then rethrows it. Concurrent run() calls
  // on one pool are serialised.
  using Fn = std::function<void(size_t task, unsigned worker)>;
  void run(size_t n, const Fn& fn);

 private:
  void worker_main(unsigned worker, int nice);
  void work(unsigned worker);

  bool forked() const;

  const unsigned size_;
  const long pid_;  // process that started the threads
  std::vector<std::thread> threads_;
  std::mutex run_mu_;  // one batch at a time

  // Synchronisation shared with the pool threads, on the heap so that a forked child can leak
  // it: destroying a condition variable the parent's threads waited on blocks forever.
  struct Sync {
    std::mutex mu;
    std::condition_variable wake, done;
  };
  std::unique_ptr<Sync> sync_ = std::make_unique<Sync>();
  std::mutex& mu_ = sync_->mu;
  std::condition_variable& wake_ = sync_->wake;
  std::condition_variable& done_ = sync_->done;
  uint64_t generation_ = 0;
  unsigned busy_ = 0;  // pool threads still in the current batch
  bool stop_ = false;

  const Fn* fn_ = nullptr;
  size_t n_ = 0;
  std::atomic<size_t> next_{0};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
};

}  // namespace ackpt
