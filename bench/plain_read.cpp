// The plain-read reference of bench/lora_kernel.py: read the same bytes the LoRA kernel
// reads for one group call (a list of contiguous regions), nothing else, with AVX-512 loads (integer adds: no float special cases)
// on the caller's OpenMP team, each thread one contiguous share of the call's bytes. What
// is left between the kernel and this is the kernel's own cost, not the machine's.
// Built by bench/lora_kernel.py through loramux.server.native_build (same flags).

#include <immintrin.h>
#include <omp.h>

#include <cstdint>

extern "C" double loramux_plain_read(int64_t regions, const int64_t* address,
                                     const int64_t* bytes) {
  int64_t total = 0;
  for (int64_t i = 0; i < regions; ++i) total += bytes[i] / 64 * 64;
  double result = 0;
#pragma omp parallel reduction(+ : result)
  {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    int64_t begin = total * id / threads / 64 * 64, end = total * (id + 1) / threads / 64 * 64;
    __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
    int64_t base = 0;  // offset of region i's first byte in the call's bytes
    for (int64_t i = 0; i < regions && base < end; ++i) {
      const int64_t length = bytes[i] / 64 * 64;
      const int64_t lo = begin > base ? begin - base : 0;
      const int64_t hi = end - base < length ? end - base : length;
      const char* p = reinterpret_cast<const char*>(address[i]);
      int64_t off = lo;
      for (; off + 128 <= hi; off += 128) {
        acc0 = _mm512_add_epi32(acc0, _mm512_loadu_si512(p + off));
        acc1 = _mm512_add_epi32(acc1, _mm512_loadu_si512(p + off + 64));
      }
      for (; off < hi; off += 64) acc0 = _mm512_add_epi32(acc0, _mm512_loadu_si512(p + off));
      base += length;
    }
    result += static_cast<double>(_mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1)));
  }
  return result;
}
