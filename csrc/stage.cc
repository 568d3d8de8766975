#include "stage.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <utility>
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


// Splits `pieces` (each with a `length`) into at most `threads` shares of about equal bytes,
// each at least kMinShare; a piece that straddles two shares is cut with
// `rest(piece, at)`, the piece from byte `at` on. Shares keep the pieces' order.
template <class Piece, class Rest>
std::vector<std::vector<Piece>> share_bytes(const std::vector<Piece>& pieces, unsigned threads, Rest rest) {
  uint64_t total = 0;
  for (const Piece& p : pieces) total += p.length;
  const uint64_t most = std::max<uint64_t>(1, total / kMinShare);
  const unsigned parts = static_cast<unsigned>(std::min<uint64_t>(std::max(1u, threads), most));
  std::vector<std::vector<Piece>> share(parts);
  const uint64_t each = total / parts;
  unsigned s = 0;
  uint64_t filled = 0;
  for (const Piece& whole : pieces) {
    Piece p = whole;
    while (s + 1 < parts && p.length && filled + p.length > each) {
      const uint64_t take = each - filled;
      if (take) {
        Piece head = p;
        head.length = take;
        share[s].push_back(head);
      }
      p = rest(p, take);
      ++s;
      filled = 0;
    }
    share[s].push_back(p);
    filled += p.length;
  }
  return share;
}

void copy_regions(char* dst, const std::vector<Region>& regions) {
  for (const Region& r : regions)
    if (r.length) std::memcpy(dst + r.dst_offset, r.src, r.length);
}
// Copies shares 1.. of `share` on threads of their own from construction; finish() (or
// the destructor) joins them and copies, on the calling thread, any share no thread could
// be started for. Share 0 is the caller's.
template <class Piece>
class Helpers {
 public:
  template <class Fn>
  Helpers(const std::vector<std::vector<Piece>>& share, Fn copy) : share_(share), copy_(copy) {
    for (size_t h = 1; h < share.size(); ++h) {
      try {
        threads_.emplace_back(copy_, std::cref(share[h]));
      } catch (const std::system_error&) {  // no thread to be had: copied in finish()
        break;
      }
    }
  }
  ~Helpers() { finish(); }
  Helpers(const Helpers&) = delete;
  Helpers& operator=(const Helpers&) = delete;

  void finish() {
    if (done_) return;
    done_ = true;
    for (auto& t : threads_) t.join();
    for (size_t h = 1 + threads_.size(); h < share_.size(); ++h) copy_(share_[h]);
  }

 private:
  const std::vector<std::vector<Piece>>& share_;
  std::function<void(const std::vector<Piece>&)> copy_;
  std::vector<std::thread> threads_;
  bool done_ = false;
};

template <class Piece, class Fn>
Helpers(const std::vector<std::vector<Piece>>&, Fn) -> Helpers<Piece>;

void copy_each(const std::vector<Copy>& copies) {
  for (const Copy& c : copies)
    if (c.length) std::memmove(c.dst, c.src, c.length);
}

// Whether no two copies write the same byte.
bool disjoint_destinations(const std::vector<Copy>& copies) {
  std::vector<std::pair<uintptr_t, uint64_t>> spans;
  spans.reserve(copies.size());
  for (const Copy& c : copies)
    if (c.length) spans.emplace_back(reinterpret_cast<uintptr_t>(c.dst), c.length);
  std::sort(spans.begin(), spans.end());
  for (size_t k = 1; k < spans.size(); ++k)
    if (spans[k].first - spans[k - 1].first < spans[k - 1].second) return false;
  return true;
}
}  // namespace

void copy_all(const std::vector<Copy>& copies, unsigned threads) {
  for (size_t k = 0; k < copies.size(); ++k)
    if (copies[k].length && (!copies[k].src || !copies[k].dst))
      throw FormatError("copy " + std::to_string(k) + ": null source or destination");
  // Overlapping destinations are copied in order, so the last copy wins as in a loop.
  if (threads > 1 && !disjoint_destinations(copies)) threads = 1;
  const std::vector<std::vector<Copy>> share = share_bytes(copies, threads, [](const Copy& c, uint64_t at) {
    return Copy{static_cast<const char*>(c.src) + at, static_cast<char*>(c.dst) + at, c.length - at};
  });
  Helpers helpers(share, copy_each);
  copy_each(share[0]);
  helpers.finish();
}

void stage_regions(char* dst, uint64_t dst_len, const std::vector<Region>& regions,
                   const std::vector<uint64_t>& chunk_ends, Gate* gate, uint64_t floor,
                   unsigned threads) {
  check_regions(dst_len, regions, true);
  // Share the bytes among `threads` copiers (each at least kMinShare): the calling thread
  // copies the front and opens the gate behind it; helpers copy the rest in equal slices.
  const std::vector<std::vector<Region>> share = share_bytes(regions, threads, [](const Region& r, uint64_t at) {
    return Region{static_cast<const char*>(r.src) + at, r.dst_offset + at, r.length - at};
  });
  const unsigned parts = static_cast<unsigned>(share.size());
  Helpers helpers(share, [dst](const std::vector<Region>& part) { copy_regions(dst, part); });
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
  helpers.finish();
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
