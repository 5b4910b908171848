// CPU kernels for ArbNet's hash tables: gather the virtual weights, scatter-add their gradients.
//
// Compiled on first use by sharetune/models/native.py and called through ctypes. The OpenMP pragmas
// run on the OpenMP runtime PyTorch already loaded (same soname), so these loops share one thread
// pool with PyTorch's matmuls instead of fighting a second pool for the cores.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <omp.h>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

// Indices: int32, or uint16 for small tables (half the bytes to stream: in a training step the index
// comes from L3, not from L2 as in a loop that gathers and nothing else).
#if defined(__AVX2__)
__m256i load8(const int32_t* index) { return _mm256_loadu_si256((const __m256i*)index); }
__m256i load8(const uint16_t* index) { return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)index)); }
#endif

// out[i] = table[index[i]] (* sign[i]) for i in [lo, hi). `table` holds every index value: the
// caller pads the zero slot. GCC's cost model does not emit gathers for this loop on its own; explicit
// 8-wide gathers (`vector`) are 1.3x to 2.5x faster than scalar loads on the Intel CPUs we measured,
// and on AMD Zen 4 too for tables beyond L1, but 1.5x slower there for tables in L1: the caller
// chooses. Outputs larger than a core's L2 are written with streaming stores (1-15% faster training
// steps): they would only evict the table.
template <typename Index>
void gather_range(const float* __restrict table, const Index* __restrict index, const int8_t* __restrict sign,
                  float* __restrict out, int64_t lo, int64_t hi, bool vector, bool stream) {
  int64_t i = lo;
#if defined(__AVX2__)
  for (; vector && i + 8 <= hi; i += 8) {
    __m256 v = _mm256_i32gather_ps(table, load8(index + i), 4);
    if (sign) v = _mm256_mul_ps(v, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(sign + i)))));
    if (stream) {
      _mm256_stream_ps(out + i, v);
    } else {
      _mm256_storeu_ps(out + i, v);
    }
  }
  if (vector && stream) _mm_sfence();
#endif
  for (; i < hi; ++i) out[i] = sign ? table[index[i]] * sign[i] : table[index[i]];
}

// Small tables (they fit in L1/L2 several times over): each thread sums its slice of the weights
// into four interleaved private copies of the table, so that weights reading the same entry a few
// positions apart do not wait on each other's stores; the copies are added up afterwards.
template <bool Signed>
void accumulate(const float* __restrict grad, const uint16_t* __restrict index, const int8_t* __restrict sign,
                int64_t lo, int64_t hi, int64_t width, float* __restrict copies) {
  int64_t i = lo;
  for (; i + 4 <= hi; i += 4) {
    for (int u = 0; u < 4; ++u) copies[u * width + index[i + u]] += Signed ? grad[i + u] * sign[i + u] : grad[i + u];
  }
  for (; i < hi; ++i) copies[index[i]] += Signed ? grad[i] * sign[i] : grad[i];
}

// Work items: the layers' weights cut into chunks. The gather hands them out dynamically: a worker
// thread that a virtual machine wakes late (tens of microseconds, as long as an MNIST layer's whole
// gather) then finds the work done instead of holding everyone at the end of the region.
constexpr int64_t kChunk = 1 << 14;  // a multiple of 8: chunks start at the gather's vector width

struct Chunks {
  std::vector<int64_t> first;  // each layer's first chunk, then the total

  Chunks(int64_t layers, const int64_t* sizes) : first(layers + 1, 0) {
    for (int64_t l = 0; l < layers; ++l) first[l + 1] = first[l] + (sizes[l] + kChunk - 1) / kChunk;
  }
  int64_t count() const { return first.back(); }
  // The layer of chunk c, and the weights [lo, hi) it covers.
  int64_t locate(int64_t c, const int64_t* sizes, int64_t& lo, int64_t& hi) const {
    const int64_t l = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    lo = (c - first[l]) * kChunk;
    hi = std::min(sizes[l], lo + kChunk);
    return l;
  }
};

template <typename Index>
void gather_layers(int64_t layers, const float* const* tables, const Index* const* indices,
                   const int8_t* const* signs, float* const* outs, const int64_t* sizes, int threads, bool vector) {
  const Chunks chunks(layers, sizes);
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks.count(); ++c) {
    int64_t lo, hi;
    const int64_t l = chunks.locate(c, sizes, lo, hi);
    // streaming stores need 32-byte aligned addresses: PyTorch aligns to 64, and chunks start at multiples of 8
    const bool stream = sizes[l] * sizeof(float) > (2 << 20) && reinterpret_cast<uintptr_t>(outs[l]) % 32 == 0;
    gather_range(tables[l], indices[l], signs[l], outs[l], lo, hi, vector, stream);
  }
}

// Large tables: out[j] = sum of grad[i] (* sign[i]) over the weights i that read entry j.
// Part p owns entries [part_lo[p], part_lo[p+1]) and the words stream[starts[p]:starts[p+1]]: one per
// weight that reads the part, in ascending position, each the step from the previous weight's position
// (high bits) and the entry relative to part_lo[p] (low `local_bits` bits). A longer step is split by
// words whose entry is all ones, which move on without adding. Threads never write the same entry, so
// no atomics; a part's slice of the table stays in cache while it is summed; and the words stream half
// the bytes of separate positions and entries (the loop is bound by memory traffic: 1.4x faster).
template <bool Signed>
void scatter_part(const float* __restrict grad, const uint32_t* __restrict stream, const int8_t* __restrict sign,
                  int64_t first, int64_t last, int local_bits, float* __restrict part) {
  const uint32_t skip = (1u << local_bits) - 1;
  int64_t i = 0;
  for (int64_t k = first; k < last; ++k) {
    const uint32_t word = stream[k];
    i += word >> local_bits;
    const uint32_t entry = word & skip;
    if (entry != skip) part[entry] += Signed ? grad[i] * sign[i] : grad[i];
  }
}

}  // namespace

// The gather and the small-table scatter take several layers at once and run them in one parallel
// region: on a virtual machine, waking the worker threads for a region costs about as much as
// gathering an MNIST layer.
extern "C" {

void sharetune_gather(int64_t layers, const float* const* tables, const int32_t* const* indices,
                      const int8_t* const* signs, float* const* outs, const int64_t* sizes, int threads) {
  gather_layers(layers, tables, indices, signs, outs, sizes, threads, true);
}

void sharetune_gather_small(int64_t layers, const float* const* tables, const uint16_t* const* indices,
                            const int8_t* const* signs, float* const* outs, const int64_t* sizes, int threads,
                            int vector) {
  gather_layers(layers, tables, indices, signs, outs, sizes, threads, vector);
}

// outs[l] has table_sizes[l] entries; the weights that read the zero slot (index table_sizes[l])
// are summed into a last private entry that is dropped.
void sharetune_scatter_small(int64_t layers, const float* const* grads, const uint16_t* const* indices,
                             const int8_t* const* signs, const int64_t* sizes, const int64_t* table_sizes,
                             float* const* outs, int threads) {
  std::vector<int64_t> offset(layers + 1, 0);  // each layer's entries (zero slot included) in a thread's sums
  int64_t weights = 0;
  for (int64_t l = 0; l < layers; ++l) {
    offset[l + 1] = offset[l] + table_sizes[l] + 1;
    weights += sizes[l];
  }
  const int64_t entries = offset[layers];
  std::vector<float> partial((int64_t)threads * entries);
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> copies(4 * entries, 0.f);  // layer l: four copies of its entries from 4 * offset[l]
    // Each thread sums an equal run of the layers' weights, laid end to end: which thread sums which
    // weights, and so the rounding, depends only on the thread count, never on timing.
    const int thread = omp_get_thread_num(), count = omp_get_num_threads();
    const int64_t begin = weights * thread / count, end = weights * (thread + 1) / count;
    for (int64_t l = 0, first = 0; l < layers; first += sizes[l++]) {
      const int64_t lo = std::max<int64_t>(begin - first, 0), hi = std::min(end - first, sizes[l]);
      if (lo >= hi) continue;
      float* mine = copies.data() + 4 * offset[l];
      if (signs[l]) {
        accumulate<true>(grads[l], indices[l], signs[l], lo, hi, table_sizes[l] + 1, mine);
      } else {
        accumulate<false>(grads[l], indices[l], signs[l], lo, hi, table_sizes[l] + 1, mine);
      }
    }
    float* sums = partial.data() + (int64_t)thread * entries;
    for (int64_t l = 0; l < layers; ++l) {
      const int64_t width = table_sizes[l] + 1;
      const float* c = copies.data() + 4 * offset[l];
      for (int64_t j = 0; j < width; ++j) sums[offset[l] + j] = (c[j] + c[width + j]) + (c[2 * width + j] + c[3 * width + j]);
    }
#pragma omp barrier
    for (int64_t l = 0; l < layers; ++l) {
#pragma omp for schedule(static) nowait
      for (int64_t j = 0; j < table_sizes[l]; ++j) {
        float s = 0.f;
        for (int u = 0; u < count; ++u) s += partial[(int64_t)u * entries + offset[l] + j];
        outs[l][j] = s;
      }
    }
  }
}

// Large tables, part by part: see scatter_part.
void sharetune_scatter(const float* __restrict grad, const uint32_t* __restrict stream, const int8_t* __restrict sign,
                       const int64_t* __restrict starts, const int64_t* __restrict part_lo, int64_t parts,
                       int local_bits, float* __restrict out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t p = 0; p < parts; ++p) {
    float* part = out + part_lo[p];
    std::memset(part, 0, sizeof(float) * (part_lo[p + 1] - part_lo[p]));
    if (sign) {
      scatter_part<true>(grad, stream, sign, starts[p], starts[p + 1], local_bits, part);
    } else {
      scatter_part<false>(grad, stream, sign, starts[p], starts[p + 1], local_bits, part);
    }
  }
}

}  // extern "C"
