// A readiness gate between a producer (the snapshot copy) and the writer's workers.
//
// The producer fills a staging buffer front to back and calls advance(n) once chunks
// [0, n) are complete; a writer task for chunk i calls wait(i) before reading its source,
// so writing starts while the copy is still running. cancel() releases every waiter with
// an error (the copy failed). Thread-safe; no Python.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <mutex>

#include "errors.h"

namespace ackpt {

class Gate {
 public:
  void advance(size_t n) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (n <= ready_) return;
      ready_ = n;
    }
    cv_.notify_all();
  }

  void cancel() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
    }
    cv_.notify_all();
  }

  size_t ready() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ready_;
  }

  // Blocks until chunk `index` is ready; throws Error when the producer cancelled.
  void wait(size_t index) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return cancelled_ || ready_ > index; });
    if (ready_ <= index) throw Error("snapshot copy was cancelled before chunk " + std::to_string(index) +
                                     " was staged");
  }

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  size_t ready_ = 0;
  bool cancelled_ = false;
};

}  // namespace ackpt
