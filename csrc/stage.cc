#include "stage.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <system_error>
#include <thread>

#include "errors.h"

namespace ackpt {

namespace {
// A helper thread takes at least this much copying (fewer bytes: fewer threads).
constexpr uint64_t kMinShare = uint64_t(8) << 20;

// FormatError unless every region lies inside [0, dst_len) with a source (and, when
// `sorted`, at or after the end of the one before).
void check_regions(uint64_t dst_len, const std::vector<Region>& regions, bool sorted) {
  uint64_t previous = 0;
  for (size_t k = 0; k < regions.size(); ++k) {
    const Region& r = regions[k];
    if ((sorted && r.dst_offset < previous) || r.length > dst_len || r.dst_offset > dst_len - r.length)
      throw FormatError("staging region " + std::to_string(k) + " [" + std::to_string(r.dst_offset) +
                        ", +" + std::to_string(r.length) + ") is unsorted or outside the " +
                        std::to_string(dst_len) + "-byte buffer");
    if (r.length && !r.src) throw FormatError("staging region " + std::to_string(k) + ": null source");
    previous = r.dst_offset + r.length;
  }
}

void copy_regions(char* dst, const std::vector<Region>& regions) {
  for (const Region& r : regions)
    if (r.length) std::memcpy(dst + r.dst_offset, r.src, r.length);
}
}  // namespace

void stage_regions(char* dst, uint64_t dst_len, const std::vector<Region>& regions,
                   const std::vector<uint64_t>& chunk_ends, Gate* gate, uint64_t floor,
                   unsigned threads) {
  check_regions(dst_len, regions, true);
  // Share the bytes among `threads` copiers (each at least kMinShare): the calling thread
  // copies the front and opens the gate behind it; helpers copy the rest in equal slices.
  uint64_t total = 0;
  for (const Region& r : regions) total += r.length;
  const uint64_t most = std::max<uint64_t>(1, total / kMinShare);
  const unsigned parts = static_cast<unsigned>(std::min<uint64_t>(std::max(1u, threads), most));
  std::vector<std::vector<Region>> share(parts);
  const uint64_t each = total / parts;
  unsigned p = 0;
  uint64_t filled = 0;
  for (const Region& whole : regions) {
    Region r = whole;
    while (p + 1 < parts && r.length && filled + r.length > each) {
      const uint64_t take = each - filled;
      if (take) share[p].push_back(Region{r.src, r.dst_offset, take});
      r = Region{static_cast<const char*>(r.src) + take, r.dst_offset + take, r.length - take};
      ++p;
      filled = 0;
    }
    share[p].push_back(r);
    filled += r.length;
  }
  auto copy = [&](const std::vector<Region>& part) { copy_regions(dst, part); };
  std::vector<std::thread> helpers;
  for (unsigned h = 1; h < parts; ++h) {
    try {
      helpers.emplace_back(copy, std::cref(share[h]));
    } catch (const std::system_error&) {  // no thread to be had: copy it here afterwards
      break;
    }
  }
  const std::vector<Region>& front = share[0];
  const uint64_t front_end = parts > 1 && !share[1].empty() ? share[1].front().dst_offset : floor;
  size_t opened = 0;
  for (size_t k = 0; k < front.size(); ++k) {
    const Region& r = front[k];
    if (r.length) std::memcpy(dst + r.dst_offset, r.src, r.length);
    if (!gate) continue;
    const uint64_t next = std::min(k + 1 < front.size() ? front[k + 1].dst_offset : front_end, floor);
    const size_t ready = static_cast<size_t>(
        std::upper_bound(chunk_ends.begin(), chunk_ends.end(), next) - chunk_ends.begin());
    if (ready > opened) {
      gate->advance(ready);
      opened = ready;
    }
  }
  for (auto& t : helpers) t.join();
  for (unsigned h = 1 + static_cast<unsigned>(helpers.size()); h < parts; ++h) copy(share[h]);
  if (gate && parts > 1) {
    const size_t ready = static_cast<size_t>(
        std::upper_bound(chunk_ends.begin(), chunk_ends.end(), floor) - chunk_ends.begin());
    if (ready > opened) gate->advance(ready);
  }
}

StageQueue::StageQueue() : worker_([this] { run(); }) {}

StageQueue::~StageQueue() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_.notify_one();
  worker_.join();   // run() drains the queue before it returns
}

void StageQueue::submit(char* dst, uint64_t dst_len, std::vector<Region> regions) {
  check_regions(dst_len, regions, false);
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(Batch{dst, std::move(regions)});
  }
  work_.notify_one();
}

void StageQueue::wait() {
  std::unique_lock<std::mutex> lock(mu_);
  idle_.wait(lock, [&] { return queue_.empty() && !busy_; });
}

void StageQueue::run() {
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    work_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;   // stopping, nothing left
    Batch batch = std::move(queue_.front());
    queue_.pop_front();
    busy_ = true;
    lock.unlock();
    copy_regions(batch.dst, batch.regions);
    lock.lock();
    busy_ = false;
    if (queue_.empty()) idle_.notify_all();
  }
}

}  // namespace ackpt
