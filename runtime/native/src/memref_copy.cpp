// `memrefCopy`: the strided copy that MLIR's memref lowering calls for `memref.copy`
// between non-contiguous memrefs. Upstream ships it in the C runner utils, which the
// torch-mlir wheel does not include, so the runtime provides it.
#include <stdint.h>
#include <string.h>

#include "lowbit/runtime.h"

namespace {

struct UnrankedMemRef {
  int64_t rank;
  void* descriptor;
};

// Ranked descriptor layout: allocated, aligned, offset, sizes[rank], strides[rank].
struct DescriptorView {
  char* aligned;
  int64_t offset;
  const int64_t* sizes;
  const int64_t* strides;

  DescriptorView(const UnrankedMemRef& m) {
    auto* words = static_cast<int64_t*>(m.descriptor);
    aligned = reinterpret_cast<char*>(words[1]);
    offset = words[2];
    sizes = words + 3;
    strides = words + 3 + m.rank;
  }
};

}  // namespace

extern "C" LOWBIT_API void memrefCopy(int64_t elem_size, UnrankedMemRef* src, UnrankedMemRef* dst) {
  const int64_t rank = src->rank;
  DescriptorView s(*src), d(*dst);
  char* sp = s.aligned + s.offset * elem_size;
  char* dp = d.aligned + d.offset * elem_size;
  if (rank == 0) {
    memcpy(dp, sp, elem_size);
    return;
  }
  for (int64_t i = 0; i < rank; ++i)
    if (s.sizes[i] == 0) return;

  // Innermost run that is contiguous in both source and destination.
  int64_t inner = 1;
  int64_t dim = rank - 1;
  while (dim >= 0 && s.strides[dim] == inner && d.strides[dim] == inner) {
    inner *= s.sizes[dim];
    --dim;
  }
  const int64_t run_bytes = inner * elem_size;
  if (dim < 0) {
    memmove(dp, sp, run_bytes);
    return;
  }
  // Odometer over the outer dimensions [0, dim].
  int64_t index[64] = {0};
  if (rank > 64) return;
  for (;;) {
    int64_t so = 0, doff = 0;
    for (int64_t i = 0; i <= dim; ++i) {
      so += index[i] * s.strides[i];
      doff += index[i] * d.strides[i];
    }
    memmove(dp + doff * elem_size, sp + so * elem_size, run_bytes);
    int64_t i = dim;
    while (i >= 0) {
      if (++index[i] < s.sizes[i]) break;
      index[i] = 0;
      --i;
    }
    if (i < 0) return;
  }
}
