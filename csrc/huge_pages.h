// Backing a range of anonymous memory with transparent huge pages, after it was faulted in.
#pragma once

#include <cstddef>

namespace ackpt {

// The size of one transparent huge page on this machine (/sys/kernel/mm/transparent_hugepage/
// hpage_pmd_size), or 0 where there are none (no THP support, not Linux).
size_t huge_page_size();

enum class Collapse { kDone, kRetry, kUnsupported };

// Asks the kernel to move the whole huge pages inside [p, p + len) onto huge pages now
// (madvise MADV_COLLAPSE, Linux 6.1+), synchronously, on the calling thread. The bytes keep
// their values. kRetry: the kernel could not do all of it this time (pages pinned by IO in
// flight, no free huge page); kUnsupported: this kernel or its settings never will.
Collapse collapse_huge_pages(void* p, size_t len);

}  // namespace ackpt
