#include "huge_pages.h"

#include <cerrno>
#include <cstdint>
#include <fstream>

#ifdef __linux__
#include <sys/mman.h>
#endif

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25  // older libc headers; the kernel call is what matters
#endif

namespace ackpt {

size_t huge_page_size() {
#ifdef __linux__
  static const size_t size = [] {
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size");
    size_t n = 0;
    return (f >> n) ? n : size_t(0);
  }();
  return size;
#else
  return 0;
#endif
}

Collapse collapse_huge_pages(void* p, size_t len) {
#ifdef __linux__
  const size_t huge = huge_page_size();
  if (!huge) return Collapse::kUnsupported;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + huge - 1) / huge * huge;
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + len) / huge * huge;
  if (end <= begin) return Collapse::kDone;
  if (::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_COLLAPSE) == 0) return Collapse::kDone;
  // EINVAL: no MADV_COLLAPSE in this kernel, or THP set to "never"; EPERM: not allowed here.
  return errno == EINVAL || errno == EPERM ? Collapse::kUnsupported : Collapse::kRetry;
#else
  (void)p;
  (void)len;
  return Collapse::kUnsupported;
#endif
}

}  // namespace ackpt
