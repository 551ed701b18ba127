// NF4 matmul for the CPU straight from bitsandbytes' storage (AVX2 + FMA):
//
//     y[t, o] = bf16( sum_k x[t, k] * W[o, k] (+ bias[o]) )
//
// W is never materialised. bitsandbytes keeps it as 4-bit codes, two per byte (element 2j
// in the high nibble of byte j, 2j+1 in the low one, row-major over [out, in]), one absmax
// per block of `blocksize` elements, and with double quantisation that absmax as a uint8
// code into `code2` times a float32 absmax per `blocksize2` blocks plus `offset`. Each weight
// is what bitsandbytes' dequantisation gives, bit for bit:
//
//     absmax[b] = code2[q[b]] * absmax2[b / blocksize2] + offset   (float32, in that order)
//     W[e]      = bf16_rne(nf4[code(e)] * absmax[e / blocksize])   (float32 product, rounded)
//
// so per block the 16 possible values are computed once (16 products, rounded to bf16) and
// split into a low-byte and a high-byte table of 16 entries, and every code of the block
// is decoded by two byte shuffles (vpshufb) and two unpacks into the float32 whose upper
// half is that bf16. The decoded order inside a block is the shuffles' natural one, not
// the element order; x is permuted into that order once per call (`permute_x`), so the dot
// product needs no shuffle of the weights at all. Sums are float32 (FMA), rounded to bf16
// once at the end, as torch's bf16 linear layer does; only the summation order differs.
//
// Two paths, both over the caller's OpenMP team (torch's libgomp: the engine thread's
// workers), output rows split between threads:
//   * rows <= kGemvRows (decode of a few rows): each weight block is decoded into
//     registers and used at once for every row;
//   * more rows (a batch, a prompt chunk): per pair of output rows, the decoded weights
//     go to a float32 buffer in L1 once per block of kRowBlock input rows and a 2 x 4
//     register tile of sums runs over them (8 FMAs per 6 loads).
// Built by loramux.server.nf4.native with g++ -O3 -mavx2 -mfma -fopenmp, loaded with ctypes.

#include <immintrin.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kGemvRows = 4;
constexpr int kRowBlock = 32;

struct Weights {
  const uint8_t* packed;    // [out * in / 2] the codes
  const uint8_t* absmax_q;  // [out * in / blocksize] uint8 codes (double quant) or null
  const float* absmax;      // [blocks2] float32 (double quant) or [blocks] (plain)
  const float* code2;       // [256] the absmax codebook (double quant) or null
  float offset;             // added to each decoded absmax (double quant)
  const float* nf4;         // [16] bitsandbytes' NF4 codebook
  int64_t blocksize;        // elements per absmax (a multiple of 64)
  int64_t blocksize2;       // absmax values per absmax2 (double quant)
  int64_t in;
};

inline float block_absmax(const Weights& w, int64_t b) {
  if (w.absmax_q == nullptr) return w.absmax[b];
  const float scaled = w.code2[w.absmax_q[b]] * w.absmax[b / w.blocksize2];
  return scaled + w.offset;
}

// float32 -> bf16 bits, round to nearest even (the values here are finite).
inline __m256i round_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7FFF)), lsb);
  return _mm256_srli_epi32(r, 16);
}

// The block's 16 values as two byte tables, each in both 128-bit lanes (vpshufb is per lane).
struct Tables {
  __m256i low;
  __m256i high;
};

inline Tables block_tables(const Weights& w, __m256 nf4_lo, __m256 nf4_hi, int64_t b) {
  const __m256 scale = _mm256_set1_ps(block_absmax(w, b));
  const __m256i v0 = round_bf16(_mm256_mul_ps(nf4_lo, scale));  // codes 0-7, u32
  const __m256i v1 = round_bf16(_mm256_mul_ps(nf4_hi, scale));  // codes 8-15
  // u16 [0-3, 8-11 | 4-7, 12-15] -> [0-7 | 8-15]
  const __m256i words = _mm256_permute4x64_epi64(_mm256_packus_epi32(v0, v1), 0xD8);
  // per lane: 8 low bytes then 8 high bytes
  const __m256i split = _mm256_shuffle_epi8(
      words, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6,
                              8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
  // [L0-7 H0-7 | L8-15 H8-15] -> [L0-15 | H0-15]
  const __m256i tables = _mm256_permute4x64_epi64(split, 0xD8);
  return {_mm256_permute2x128_si256(tables, tables, 0x00),
          _mm256_permute2x128_si256(tables, tables, 0x11)};
}

// 64 weights of one block (32 bytes of codes) as 8 vectors of 8 float32, in decode order.
inline void decode64(const uint8_t* codes, const Tables& t, __m256 out[8]) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i nib[2] = {_mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask),
                          _mm256_and_si256(bytes, mask)};
  for (int h = 0; h < 2; ++h) {
    const __m256i lo = _mm256_shuffle_epi8(t.low, nib[h]);
    const __m256i hi = _mm256_shuffle_epi8(t.high, nib[h]);
    const __m256i w0 = _mm256_unpacklo_epi8(lo, hi);
    const __m256i w1 = _mm256_unpackhi_epi8(lo, hi);
    out[4 * h + 0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w0));
    out[4 * h + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w0));
    out[4 * h + 2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w1));
    out[4 * h + 3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w1));
  }
}

// Which element of its 64-block the decode order's position p holds.
inline int decoded_element(int p) {
  const int reg = p / 8, lane = (p / 4) % 2, k = p % 4;
  const int nibble = reg / 4, quarter = reg % 4;
  const int byte = quarter * 4 + k + 16 * lane;
  return 2 * byte + nibble;
}

// x rows [rows, in] bf16 -> float32 in decode order, [rows, in].
void permute_x(const uint16_t* x, int64_t x_stride, int64_t rows, int64_t in, float* xp) {
  int order[64];
  for (int p = 0; p < 64; ++p) order[p] = decoded_element(p);
  for (int64_t t = 0; t < rows; ++t) {
    const uint16_t* src = x + t * x_stride;
    float* dst = xp + t * in;
    for (int64_t k = 0; k < in; k += 64) {
      for (int p = 0; p < 64; ++p) {
        const uint32_t bits = uint32_t(src[k + order[p]]) << 16;
        std::memcpy(dst + k + p, &bits, 4);
      }
    }
  }
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return uint16_t((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline float from_bf16(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Output row o's block b: the codes of its 64-element chunk c.
inline const uint8_t* chunk_codes(const Weights& w, int64_t o, int64_t k) {
  return w.packed + (o * w.in + k) / 2;
}

template <int R>
void gemv_rows(const Weights& w, int64_t out_begin, int64_t out_end, const float* xp,
               const uint16_t* bias, uint16_t* y, int64_t y_stride) {
  const __m256 nf4_lo = _mm256_loadu_ps(w.nf4), nf4_hi = _mm256_loadu_ps(w.nf4 + 8);
  const int64_t in = w.in, per_block = w.blocksize / 64;
  for (int64_t o = out_begin; o < out_end; ++o) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    const int64_t first_block = o * in / w.blocksize;
    for (int64_t k = 0, b = first_block; k < in; ++b) {
      const Tables t = block_tables(w, nf4_lo, nf4_hi, b);
      for (int64_t c = 0; c < per_block; ++c, k += 64) {
        __m256 wv[8];
        decode64(chunk_codes(w, o, k), t, wv);
        for (int r = 0; r < R; ++r) {
          const float* xr = xp + r * in + k;
          for (int v = 0; v < 8; ++v)
            acc[r][v & 1] = _mm256_fmadd_ps(wv[v], _mm256_loadu_ps(xr + 8 * v), acc[r][v & 1]);
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      float sum = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
      if (bias != nullptr) sum += from_bf16(bias[o]);
      y[r * y_stride + o] = to_bf16(sum);
    }
  }
}

// Output rows [o, o + 2) decoded to float32 into `buf` [2, in].
void decode_rows(const Weights& w, int64_t o, int64_t count, float* buf) {
  const __m256 nf4_lo = _mm256_loadu_ps(w.nf4), nf4_hi = _mm256_loadu_ps(w.nf4 + 8);
  const int64_t in = w.in, per_block = w.blocksize / 64;
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t k = 0, b = (o + i) * in / w.blocksize; k < in; ++b) {
      const Tables t = block_tables(w, nf4_lo, nf4_hi, b);
      for (int64_t c = 0; c < per_block; ++c, k += 64) {
        __m256 wv[8];
        decode64(chunk_codes(w, o + i, k), t, wv);
        for (int v = 0; v < 8; ++v) _mm256_storeu_ps(buf + i * in + k + 8 * v, wv[v]);
      }
    }
  }
}

// y[t0 .. t0+R) x [o, o+2) from decoded rows `buf` and permuted inputs.
template <int R>
void tile(const float* buf, int64_t in, const float* xp, int64_t t0, int64_t o, int64_t count,
          const uint16_t* bias, uint16_t* y, int64_t y_stride) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const float* w0 = buf;
  const float* w1 = buf + (count > 1 ? in : 0);
  for (int64_t k = 0; k < in; k += 8) {
    const __m256 a = _mm256_loadu_ps(w0 + k), b = _mm256_loadu_ps(w1 + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(xp + (t0 + r) * in + k);
      acc[r][0] = _mm256_fmadd_ps(a, xv, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(b, xv, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int64_t i = 0; i < count; ++i) {
      float sum = hsum(acc[r][i]);
      if (bias != nullptr) sum += from_bf16(bias[o + i]);
      y[(t0 + r) * y_stride + o + i] = to_bf16(sum);
    }
  }
}

void tiled(const Weights& w, int64_t rows, int64_t out, const float* xp, const uint16_t* bias,
           uint16_t* y, int64_t y_stride) {
  const int64_t in = w.in, pairs = (out + 1) / 2;
#pragma omp parallel
  {
    std::vector<float> buf(2 * in);
    for (int64_t t0 = 0; t0 < rows; t0 += kRowBlock) {
      const int64_t t_end = t0 + kRowBlock < rows ? t0 + kRowBlock : rows;
#pragma omp for schedule(static)
      for (int64_t p = 0; p < pairs; ++p) {
        const int64_t o = 2 * p, count = o + 1 < out ? 2 : 1;
        decode_rows(w, o, count, buf.data());
        int64_t t = t0;
        for (; t + 4 <= t_end; t += 4) tile<4>(buf.data(), in, xp, t, o, count, bias, y, y_stride);
        for (; t < t_end; ++t) tile<1>(buf.data(), in, xp, t, o, count, bias, y, y_stride);
      }
    }
  }
}

template <int R>
void gemv(const Weights& w, int64_t out, const float* xp, const uint16_t* bias, uint16_t* y,
          int64_t y_stride) {
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t begin = out * id / threads, end = out * (id + 1) / threads;
    gemv_rows<R>(w, begin, end, xp, bias, y, y_stride);
  }
}

bool valid(const Weights& w, int64_t out) {
  if (w.in <= 0 || out <= 0 || w.blocksize <= 0 || w.blocksize % 64 || w.in % w.blocksize)
    return false;
  if (w.absmax_q != nullptr && (w.code2 == nullptr || w.blocksize2 <= 0)) return false;
  return w.packed != nullptr && w.absmax != nullptr && w.nf4 != nullptr;
}

}  // namespace

extern "C" {

// y [rows, out] bf16 (row stride y_stride) = x [rows, in] bf16 (row stride x_stride) . W^T
// (+ bias [out] bf16, or null). absmax_q null: plain absmax [out * in / blocksize] float32.
// Returns 0, or 1 when the arguments are not a layout this kernel reads.
int loramux_nf4_matmul(int64_t rows, int64_t in, int64_t out, const uint16_t* x,
                       int64_t x_stride, const uint8_t* packed, const uint8_t* absmax_q,
                       const float* absmax, const float* code2, float offset, const float* nf4,
                       int64_t blocksize, int64_t blocksize2, const uint16_t* bias, uint16_t* y,
                       int64_t y_stride) {
  const Weights w{packed, absmax_q, absmax, code2, offset, nf4, blocksize, blocksize2, in};
  if (!valid(w, out) || rows < 0) return 1;
  if (rows == 0) return 0;
  std::vector<float> xp(rows * in);
  permute_x(x, x_stride, rows, in, xp.data());
  switch (rows) {
    case 1: gemv<1>(w, out, xp.data(), bias, y, y_stride); break;
    case 2: gemv<2>(w, out, xp.data(), bias, y, y_stride); break;
    case 3: gemv<3>(w, out, xp.data(), bias, y, y_stride); break;
    case 4: gemv<4>(w, out, xp.data(), bias, y, y_stride); break;
    default: tiled(w, rows, out, xp.data(), bias, y, y_stride);
  }
  return 0;
}

// W [out, in] bf16 in element order: the same per-block tables and byte shuffles as the
// matmul, the words interleaved back into element order. The engine's prompt passes use it
// (NativeNf4Linear: these bits, then torch's bf16 GEMM, as bitsandbytes computes them), and
// tests compare it with bitsandbytes' dequantize_4bit bit for bit.
int loramux_nf4_dequantize(int64_t in, int64_t out, const uint8_t* packed,
                           const uint8_t* absmax_q, const float* absmax, const float* code2,
                           float offset, const float* nf4, int64_t blocksize, int64_t blocksize2,
                           uint16_t* w_out) {
  const Weights w{packed, absmax_q, absmax, code2, offset, nf4, blocksize, blocksize2, in};
  if (!valid(w, out)) return 1;
  const int64_t per_block = blocksize / 64;
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < out; ++o) {
    const __m256 nf4_lo = _mm256_loadu_ps(nf4), nf4_hi = _mm256_loadu_ps(nf4 + 8);
    const __m256i mask = _mm256_set1_epi8(0x0F);
    for (int64_t k = 0, b = o * in / blocksize; k < in; ++b) {
      const Tables t = block_tables(w, nf4_lo, nf4_hi, b);
      for (int64_t c = 0; c < per_block; ++c, k += 64) {
        const __m256i bytes =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk_codes(w, o, k)));
        const __m256i even = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);  // 2j
        const __m256i odd = _mm256_and_si256(bytes, mask);                        // 2j + 1
        const __m256i el = _mm256_shuffle_epi8(t.low, even), eh = _mm256_shuffle_epi8(t.high, even);
        const __m256i ol = _mm256_shuffle_epi8(t.low, odd), oh = _mm256_shuffle_epi8(t.high, odd);
        // words of byte j: [0-7 | 16-23] and [8-15 | 24-31]
        const __m256i a = _mm256_unpacklo_epi8(el, eh), bb = _mm256_unpackhi_epi8(el, eh);
        const __m256i cc = _mm256_unpacklo_epi8(ol, oh), d = _mm256_unpackhi_epi8(ol, oh);
        // elements [0-7 | 32-39], [8-15 | 40-47], [16-23 | 48-55], [24-31 | 56-63]
        const __m256i p0 = _mm256_unpacklo_epi16(a, cc), p1 = _mm256_unpackhi_epi16(a, cc);
        const __m256i p2 = _mm256_unpacklo_epi16(bb, d), p3 = _mm256_unpackhi_epi16(bb, d);
        __m256i* dst = reinterpret_cast<__m256i*>(w_out + o * in + k);
        _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(p0, p1, 0x20));
        _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(p2, p3, 0x20));
        _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(p0, p1, 0x31));
        _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(p2, p3, 0x31));
      }
    }
  }
  return 0;
}

}  // extern "C"
