// Paged attention over the KV block pool, for the engine's decode rows and prefill chunks:
//
//     out[t, h] = softmax_j(cap(scale * q[t, h] . K[j, h / g])) . V[j, h / g],
//                 position(t) - window < j <= position(t)
//
// (cap(s) = softcap * tanh(s / softcap) with logit soft-capping, as Gemma 2's eager
// attention; the identity without. No window: every j <= position(t).)
// read straight from the pool through each sequence's block table: no gathered copy of a
// row's keys and values (the torch path copies every row's blocks out of the pool each
// layer, then attention reads the copy again). Scores, softmax sums and the weighted sum of
// values are float32 (bf16 keys, values and queries; the products are exact in float32);
// the weights are rounded to bf16 before their product with the values, as in SDPA's CPU
// kernel, which the torch path and PEFT's reference use.
//
// One source, two builds, chosen once at start by the CPU (paged_attention/native.py):
//   AVX-512 BF16: g++ -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma
//   AVX2 + FMA:   g++ -O3 -mavx2 -mfma
// The arithmetic goes through a 16-lane float32 vector (V16: one __m512, or two __m256
// halves) and a bf16 dot-product step (vdpbf16ps, or the same two products per lane by
// widening the bf16 pairs to float32 and two FMAs, odd element first as vdpbf16ps adds
// them: the products are exact, so both round alike). Horizontal sums differ in order
// between the builds (last bits).
//
// Work: tasks of (sequence, KV head, query tile). The query heads that share a KV head and
// the tile's tokens form the task's rows, so each key and value block is read once for all
// of them: scores 16 keys at a time per row (a dot product per key, then one tree of
// horizontal sums for the 16), the values weighted for 4 rows per load. (Scoring 16 keys
// per instruction against keys transposed by bf16 pairs was faster, 0.58 against 0.73 ms
// a layer for 11 tokens over 5,900, but its order of float32 sums parted from PEFT at
// more near-ties: test_composition compared 109 of 140 tokens, against 129 in this order
// and 117 on the torch path.) Softmax runs in blocks of 512 keys from position 0 with a
// running max, rounding as SDPA's CPU kernel does (see run_task), so the numbers are the
// torch path's up to the last bits; with a window, the softmax blocks wholly before every
// row's window are not read. Tasks are shared out over OpenMP threads (the caller's team:
// torch's libgomp, the same runtime). Loaded with ctypes.
//
// Layouts (all row-major, bf16 as uint16):
//   seqs    [n_seqs, 4] int64: first query token in q/out, query tokens, position of the
//           first query (tokens cached before it), offset of its block table in `tables`;
//           query t sits at position first + t and attends to positions 0 .. first + t.
//   tables  int64: block ids, each sequence's covering its first + count positions.
//   q       [tokens, heads, head_dim] with strides q_token, q_head (head_dim contiguous).
//   k, v    [kv_heads, num_blocks, block_size, head_dim] (the pool of one layer).
//   out     [tokens, heads, head_dim], contiguous.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define LORAMUX_AVX512 1
#elif !(defined(__AVX2__) && defined(__FMA__))
#error "build with -mavx512f -mavx512bf16 ... or -mavx2 -mfma"
#endif

namespace {

constexpr int kMaxRows = 64;      // rows of a task: query tokens x query heads per KV head
constexpr int kMaxHeadDim = 256;  // a multiple of 32
constexpr int kMaxBlock = 64;     // keys per block
constexpr int kSplit = 512;       // keys per softmax block, aligned at position 0

struct Geometry {
  int64_t kv_heads, groups, head_dim, block_size, num_blocks;
  int64_t q_token, q_head;
  float scale;
  int64_t window;  // 0: none
  float softcap;   // 0: none
};

struct Task {
  int64_t seq, kv_head, t0, tokens;  // query tokens [t0, t0 + tokens) of the sequence
};

// ---- the 16-lane float32 vector and the operations the kernel takes from it ----

#ifdef LORAMUX_AVX512

struct V16 {
  __m512 v;
};
struct QChunk {  // 32 bf16 query dims, as vdpbf16ps takes them
  __m512bh v;
};

inline V16 vzero() { return {_mm512_setzero_ps()}; }
inline V16 vset1(float x) { return {_mm512_set1_ps(x)}; }
inline V16 vload(const float* p) { return {_mm512_load_ps(p)}; }  // 64-byte aligned
inline void vstore(float* p, V16 a) { _mm512_store_ps(p, a.v); }
inline V16 vadd(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V16 vsub(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V16 vmul(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 vdiv(V16 a, V16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V16 vmax(V16 a, V16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V16 vfmadd(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V16 vfnmadd(V16 a, V16 b, V16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
inline V16 vround(V16 a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline V16 vscalef(V16 a, V16 n) { return {_mm512_scalef_ps(a.v, n.v)}; }  // a * 2^n
inline V16 vabs(V16 a) { return {_mm512_abs_ps(a.v)}; }
inline V16 vcopysign(V16 magnitude, V16 sign) {
  const __m512 s = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  return {_mm512_or_ps(_mm512_andnot_ps(s, magnitude.v), _mm512_and_ps(s, sign.v))};
}
inline float vreduce_add(V16 a) { return _mm512_reduce_add_ps(a.v); }
inline float vreduce_max(V16 a) { return _mm512_reduce_max_ps(a.v); }
inline __mmask16 lanes_below(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}
// lanes [lo, hi) of a, the others `fill`
inline V16 vkeep(V16 a, int64_t lo, int64_t hi, float fill) {
  const __mmask16 m = static_cast<__mmask16>(lanes_below(hi) & ~lanes_below(lo));
  return {_mm512_mask_mov_ps(_mm512_set1_ps(fill), m, a.v)};
}
inline V16 vload_n(const float* p, int64_t n, float fill) {  // lanes past n: fill
  return {_mm512_mask_loadu_ps(_mm512_set1_ps(fill), lanes_below(n), p)};
}
inline void vstore_n(float* p, V16 a, int64_t n) { _mm512_mask_storeu_ps(p, lanes_below(n), a.v); }
// 0 where a is -inf (keys a row does not see), else e
inline V16 vzero_where_neg_inf(V16 e, V16 a) {
  const __mmask16 m = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
  return {_mm512_maskz_mov_ps(m, e.v)};
}
inline V16 vload_bf16(const uint16_t* p) {  // 16 bf16 -> float32
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))};
}
inline V16 vround_bf16(V16 a) {  // float32 -> bf16 (round to nearest even) -> float32
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(a.v);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline void vstore_bf16(uint16_t* p, V16 a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(a.v));
}
inline QChunk load_q(const uint16_t* p) { return {(__m512bh)_mm512_loadu_si512(p)}; }
// a[i] += q[2i+1] k[2i+1] + q[2i] k[2i] over 32 dims (lane i: dims 2i, 2i+1)
inline V16 dot_bf16(V16 a, const QChunk& q, const uint16_t* k) {
  return {_mm512_dpbf16_ps(a.v, q.v, (__m512bh)_mm512_loadu_si512(k))};
}

// Lane j of the result: the sum of v[j]'s 16 lanes (16 horizontal sums in 15 adds).
inline V16 transpose_sum16(const V16* in) {
  __m512 v[16];
  for (int i = 0; i < 16; ++i) v[i] = in[i].v;
  // Level 1: pairs (2i, 2i+1) -> within each 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3].
  __m512 s1[8];
  for (int i = 0; i < 8; ++i)
    s1[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                          _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  // Level 2: per 128-bit lane [sum a, sum b, sum c, sum d] of that lane's 4 elements.
  __m512 s2[4];
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(s1[2 * i]), b = _mm512_castps_pd(s1[2 * i + 1]);
    s2[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                          _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // s2[i] lane L (128-bit) holds partial sums of vectors 4i..4i+3 over lane L's elements.
  // Level 3: add the four 128-bit lanes, keeping vectors in order.
  const __m512 t0 = _mm512_shuffle_f32x4(s2[0], s2[1], 0x88);  // lanes 0,2 of s2[0], s2[1]
  const __m512 t1 = _mm512_shuffle_f32x4(s2[0], s2[1], 0xDD);  // lanes 1,3
  const __m512 t2 = _mm512_shuffle_f32x4(s2[2], s2[3], 0x88);
  const __m512 t3 = _mm512_shuffle_f32x4(s2[2], s2[3], 0xDD);
  const __m512 u0 = _mm512_add_ps(t0, t1);  // [s2_0 (l0+l1), s2_0 (l2+l3), s2_1 .., s2_1 ..]
  const __m512 u1 = _mm512_add_ps(t2, t3);
  const __m512 w0 = _mm512_shuffle_f32x4(u0, u1, 0x88);
  const __m512 w1 = _mm512_shuffle_f32x4(u0, u1, 0xDD);
  return {_mm512_add_ps(w0, w1)};
}

#else  // AVX2 + FMA: two 8-lane halves

struct V16 {
  __m256 lo, hi;
};
struct QChunk {  // 32 bf16 query dims widened: per lane i, dims 2i+1 (odd) and 2i (even)
  __m256 odd_lo, even_lo, odd_hi, even_hi;
};

inline V16 vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V16 vset1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V16 vload(const float* p) { return {_mm256_load_ps(p), _mm256_load_ps(p + 8)}; }
inline void vstore(float* p, V16 a) {
  _mm256_store_ps(p, a.lo);
  _mm256_store_ps(p + 8, a.hi);
}
inline V16 vadd(V16 a, V16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V16 vsub(V16 a, V16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V16 vmul(V16 a, V16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V16 vdiv(V16 a, V16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V16 vmax(V16 a, V16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V16 vfmadd(V16 a, V16 b, V16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline V16 vfnmadd(V16 a, V16 b, V16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline V16 vround(V16 a) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, kMode), _mm256_round_ps(a.hi, kMode)};
}
inline __m256 scalef8(__m256 a, __m256 n) {  // a * 2^n for integral n in [-126, 127]
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
}
inline V16 vscalef(V16 a, V16 n) { return {scalef8(a.lo, n.lo), scalef8(a.hi, n.hi)}; }
inline V16 vabs(V16 a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
inline V16 vcopysign(V16 magnitude, V16 sign) {
  const __m256 s = _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(0x80000000u)));
  return {_mm256_or_ps(_mm256_andnot_ps(s, magnitude.lo), _mm256_and_ps(s, sign.lo)),
          _mm256_or_ps(_mm256_andnot_ps(s, magnitude.hi), _mm256_and_ps(s, sign.hi))};
}
inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline float vreduce_add(V16 a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
inline float vreduce_max(V16 a) {
  const __m256 m = _mm256_max_ps(a.lo, a.hi);
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline V16 vkeep(V16 a, int64_t lo, int64_t hi, float fill) {  // lanes [lo, hi) of a
  alignas(32) float t[16];
  vstore(t, a);
  for (int64_t j = 0; j < 16; ++j)
    if (j < lo || j >= hi) t[j] = fill;
  return vload(t);
}
inline V16 vload_n(const float* p, int64_t n, float fill) {
  if (n >= 16) return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
  alignas(32) float t[16];
  for (int64_t j = 0; j < 16; ++j) t[j] = j < n ? p[j] : fill;
  return vload(t);
}
inline void vstore_n(float* p, V16 a, int64_t n) {
  if (n >= 16) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
    return;
  }
  alignas(32) float t[16];
  vstore(t, a);
  std::memcpy(p, t, sizeof(float) * static_cast<size_t>(std::max<int64_t>(n, 0)));
}
inline V16 vzero_where_neg_inf(V16 e, V16 a) {
  const __m256 inf = _mm256_set1_ps(-INFINITY);
  return {_mm256_and_ps(e.lo, _mm256_cmp_ps(a.lo, inf, _CMP_NEQ_OQ)),
          _mm256_and_ps(e.hi, _mm256_cmp_ps(a.hi, inf, _CMP_NEQ_OQ))};
}
inline __m256 widen8(__m128i h) {  // 8 bf16 -> float32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline V16 vload_bf16(const uint16_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {widen8(_mm256_castsi256_si128(v)), widen8(_mm256_extracti128_si256(v, 1))};
}
// float32 -> bf16 bits in the high half of each lane, rounded to nearest even (NaN kept
// NaN), as vcvtneps2bf16 and torch round
inline __m256i bf16_bits8(__m256 a) {
  const __m256i x = _mm256_castps_si256(a);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(x, _mm256_set1_epi32(0x00400000)), nan);
  return _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
}
inline V16 vround_bf16(V16 a) {
  return {_mm256_castsi256_ps(bf16_bits8(a.lo)), _mm256_castsi256_ps(bf16_bits8(a.hi))};
}
inline void vstore_bf16(uint16_t* p, V16 a) {
  const __m256i lo = _mm256_srli_epi32(bf16_bits8(a.lo), 16);
  const __m256i hi = _mm256_srli_epi32(bf16_bits8(a.hi), 16);
  // packus interleaves the 128-bit halves: [lo 0-3, hi 0-3, lo 4-7, hi 4-7] -> in order
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
}
inline void widen_pairs(__m256i v, __m256& odd, __m256& even) {  // 16 bf16 -> 8 pairs
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline QChunk load_q(const uint16_t* p) {
  QChunk q;
  widen_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), q.odd_lo, q.even_lo);
  widen_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)), q.odd_hi, q.even_hi);
  return q;
}
inline V16 dot_bf16(V16 a, const QChunk& q, const uint16_t* k) {
  __m256 odd, even;
  widen_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k)), odd, even);
  a.lo = _mm256_fmadd_ps(q.even_lo, even, _mm256_fmadd_ps(q.odd_lo, odd, a.lo));
  widen_pairs(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + 16)), odd, even);
  a.hi = _mm256_fmadd_ps(q.even_hi, even, _mm256_fmadd_ps(q.odd_hi, odd, a.hi));
  return a;
}
// Lane j of the result: the sum of v[j]'s 16 lanes: the halves added, then 8 x 8 lanes by
// horizontal adds.
inline __m256 transpose_sum8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  // u0: [sums of v0..v3 over lanes 0-3 | over lanes 4-7], u1 the same for v4..v7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
inline V16 transpose_sum16(const V16* in) {
  __m256 w[16];
  for (int i = 0; i < 16; ++i) w[i] = _mm256_add_ps(in[i].lo, in[i].hi);
  return {transpose_sum8(w), transpose_sum8(w + 8)};
}

#endif

// e^x for x <= 0 (scores minus their running max), float32, ~2 ulp: 2^n * p(r).
inline V16 exp_ps(V16 x) {
  x = vmax(x, vset1(-87.0f));
  const V16 n = vround(vmul(x, vset1(1.44269504088896341f)));
  V16 r = vfnmadd(n, vset1(0.693359375f), x);
  r = vfnmadd(n, vset1(-2.12194440e-4f), r);
  V16 p = vset1(1.9875691500e-4f);
  p = vfmadd(p, r, vset1(1.3981999507e-3f));
  p = vfmadd(p, r, vset1(8.3334519073e-3f));
  p = vfmadd(p, r, vset1(4.1665795894e-2f));
  p = vfmadd(p, r, vset1(1.6666665459e-1f));
  p = vfmadd(p, r, vset1(5.0000001201e-1f));
  p = vfmadd(p, vmul(r, r), vadd(r, vset1(1.0f)));
  return vscalef(p, n);
}

// cap * tanh(s / cap), float32: tanh|x| = (1 - e) / (1 + e) with e = exp(-2|x|) <= 1.
inline V16 soft_cap(V16 s, float cap) {
  const V16 x = vmul(s, vset1(1.0f / cap));
  const V16 e = exp_ps(vmul(vabs(x), vset1(-2.0f)));
  const V16 t = vdiv(vsub(vset1(1.0f), e), vadd(vset1(1.0f), e));
  return vmul(vcopysign(t, x), vset1(cap));
}

// acc[i] += sum_j w[i][j] * vf[j] over `keys` keys, for R rows, NV vectors of 16 dims at d.
template <int R, int NV>
inline void weigh_values(float* const* acc, const float* const* w, const float (*vf)[kMaxHeadDim],
                         int64_t keys, int64_t d) {
  V16 a[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) a[i][v] = vload(acc[i] + d + 16 * v);
  for (int64_t j = 0; j < keys; ++j) {
    V16 vv[NV];
    for (int v = 0; v < NV; ++v) vv[v] = vload(&vf[j][d + 16 * v]);
    for (int i = 0; i < R; ++i) {
      const V16 b = vset1(w[i][j]);
      for (int v = 0; v < NV; ++v) a[i][v] = vfmadd(b, vv[v], a[i][v]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) vstore(acc[i] + d + 16 * v, a[i][v]);
}

struct RowState {
  float max[kMaxRows];
  float sum[kMaxRows];
  alignas(64) float acc[kMaxRows][kMaxHeadDim];
  alignas(64) float p[kMaxRows][kSplit];  // one block's scores, then its weights
};

// One task: its rows against every key they see, in blocks of kSplit keys from position 0,
// each block as SDPA's CPU kernel (flash attention) treats it for bf16 inputs: float32
// scores (soft-capped where the model caps them), the row's running max updated by the
// block's max, e = exp(score - max) summed in float32, the weights rounded to bf16 for
// their product with the values (float32 sums), earlier sums rescaled by exp(old max - new
// max). So a row's weights are those of the torch path and of PEFT's reference up to the
// last bits of a float32 dot product or exp, and independent of which other queries share
// the task or the call.
void run_task(const Task& task, const int64_t* seqs, const int64_t* tables, const uint16_t* q,
              const uint16_t* k, const uint16_t* v, const Geometry& g, RowState& st) {
  const int64_t* seq = seqs + 4 * task.seq;
  const int64_t first = seq[2];
  const int64_t* table = tables + seq[3];
  const int64_t hd = g.head_dim, bs = g.block_size, vec = hd / 32;
  const int rows = static_cast<int>(task.tokens * g.groups);
  alignas(64) QChunk qv[kMaxRows][kMaxHeadDim / 32];
  int64_t last[kMaxRows];    // the last position row r attends to
  int64_t oldest[kMaxRows];  // the first: 0, or the start of its window
  int64_t oldest_all = INT64_MAX;
  for (int r = 0; r < rows; ++r) {
    const int64_t t = task.t0 + r / g.groups;
    const int64_t head = task.kv_head * g.groups + r % g.groups;
    const uint16_t* src = q + (seq[0] + t) * g.q_token + head * g.q_head;
    for (int64_t c = 0; c < vec; ++c) qv[r][c] = load_q(src + 32 * c);
    last[r] = first + t;
    // transformers' sliding-window mask: key j seen when j > position - window
    oldest[r] = g.window > 0 ? std::max<int64_t>(0, last[r] - g.window + 1) : 0;
    oldest_all = std::min(oldest_all, oldest[r]);
    st.max[r] = -INFINITY;
    st.sum[r] = 0.0f;
    for (int64_t d = 0; d < hd; ++d) st.acc[r][d] = 0.0f;
  }
  const int64_t seen = first + task.t0 + task.tokens;  // keys the tile's last row sees
  const uint16_t* k_head = k + task.kv_head * g.num_blocks * bs * hd;
  const uint16_t* v_head = v + task.kv_head * g.num_blocks * bs * hd;
  alignas(64) float vf[16][kMaxHeadDim];  // 16 keys' values in float32
  // Softmax blocks before every row's window weigh nothing: not read.
  for (int64_t s0 = oldest_all / kSplit * kSplit; s0 < seen; s0 += kSplit) {
    const int64_t s1 = std::min<int64_t>(seen, s0 + kSplit);
    float block_max[kMaxRows];
    for (int r = 0; r < rows; ++r) block_max[r] = -INFINITY;
    // Scores, 16 keys at a time (a group never crosses a KV block: the block size divides
    // kSplit, and groups restart at each block).
    for (int64_t key0 = s0; key0 < s1;) {
      const int64_t b = key0 / bs, in_block = key0 % bs;
      const int64_t n = std::min<int64_t>({16, bs - in_block, s1 - key0});
      const uint16_t* kb = k_head + (table[b] * bs + in_block) * hd;
      for (int r = 0; r < rows; ++r) {
        const int64_t visible = std::min<int64_t>(n, last[r] - key0 + 1);
        const int64_t hidden = std::max<int64_t>(0, oldest[r] - key0);  // before its window
        float* out = st.p[r] + (key0 - s0);
        if (visible <= hidden) {
          for (int64_t j = 0; j < n; ++j) out[j] = -INFINITY;
          continue;
        }
        V16 dots[16];
        for (int j = 0; j < 16; ++j) {
          V16 a = vzero();
          if (j >= hidden && j < visible) {
            const uint16_t* kr = kb + j * hd;
            for (int64_t c = 0; c < vec; ++c) a = dot_bf16(a, qv[r][c], kr + 32 * c);
          }
          dots[j] = a;
        }
        V16 sc = vmul(transpose_sum16(dots), vset1(g.scale));
        if (g.softcap > 0.0f) sc = soft_cap(sc, g.softcap);
        sc = vkeep(sc, hidden, visible, -INFINITY);
        block_max[r] = std::max(block_max[r], vreduce_max(sc));
        vstore_n(out, sc, n);
      }
      key0 += n;
    }
    // Weights: exp against the running max, float32 sums, bf16-rounded weights.
    bool active[kMaxRows];
    for (int r = 0; r < rows; ++r) {
      active[r] = block_max[r] != -INFINITY;
      if (!active[r]) continue;
      const float new_max = std::max(st.max[r], block_max[r]);
      const float correction = std::exp(st.max[r] - new_max);  // 0 on the first block
      const V16 m = vset1(new_max);
      V16 total = vzero();
      float* pr = st.p[r];
      for (int64_t j = 0; j < s1 - s0; j += 16) {
        const int64_t lanes = s1 - s0 - j;
        const V16 sc = vload_n(pr + j, lanes, -INFINITY);
        // exp(-inf - max) is 0: keys the row does not see weigh nothing.
        const V16 e = vzero_where_neg_inf(exp_ps(vsub(sc, m)), sc);
        total = vadd(total, e);
        vstore_n(pr + j, vround_bf16(e), lanes);
      }
      st.sum[r] = vreduce_add(total) + correction * st.sum[r];
      st.max[r] = new_max;
      if (correction != 1.0f) {
        const V16 corr = vset1(correction);
        for (int64_t d = 0; d < hd; d += 16) vstore(st.acc[r] + d, vmul(vload(st.acc[r] + d), corr));
      }
    }
    // Weighted values, 16 keys at a time, 4 rows at a time (each row's weights past what
    // it sees are 0, so every row of a group can take the group's keys).
    int active_rows[kMaxRows];
    int n_active = 0;
    for (int r = 0; r < rows; ++r)
      if (active[r]) active_rows[n_active++] = r;
    for (int64_t key0 = s0; key0 < s1;) {
      const int64_t b = key0 / bs, in_block = key0 % bs;
      const int64_t n = std::min<int64_t>({16, bs - in_block, s1 - key0});
      const uint16_t* vb = v_head + (table[b] * bs + in_block) * hd;
      if (key0 + n < s1 && (key0 + n) % bs == 0) {
        const int64_t next = table[(key0 + n) / bs] * bs * hd;
        _mm_prefetch(reinterpret_cast<const char*>(k_head + next), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(v_head + next), _MM_HINT_T0);
      }
      for (int64_t j = 0; j < n; ++j)
        for (int64_t d = 0; d < hd; d += 16) vstore(&vf[j][d], vload_bf16(vb + j * hd + d));
      for (int a0 = 0; a0 < n_active; a0 += 4) {
        const int count = std::min(4, n_active - a0);
        float* acc[4];
        const float* w[4];
        for (int i = 0; i < count; ++i) {
          acc[i] = st.acc[active_rows[a0 + i]];
          w[i] = st.p[active_rows[a0 + i]] + (key0 - s0);
        }
        for (int64_t d = 0; d < hd; d += 64) {
          const bool whole = hd - d >= 64;  // else 32 dims left (hd is a multiple of 32)
          switch (count * 2 + (whole ? 1 : 0)) {
            case 2: weigh_values<1, 2>(acc, w, vf, n, d); break;
            case 3: weigh_values<1, 4>(acc, w, vf, n, d); break;
            case 4: weigh_values<2, 2>(acc, w, vf, n, d); break;
            case 5: weigh_values<2, 4>(acc, w, vf, n, d); break;
            case 6: weigh_values<3, 2>(acc, w, vf, n, d); break;
            case 7: weigh_values<3, 4>(acc, w, vf, n, d); break;
            case 8: weigh_values<4, 2>(acc, w, vf, n, d); break;
            default: weigh_values<4, 4>(acc, w, vf, n, d); break;
          }
        }
      }
      key0 += n;
    }
  }
}

void write_rows(const Task& task, const int64_t* seqs, const Geometry& g, const float* sums,
                const float* accs, int64_t acc_stride, uint16_t* out) {
  const int64_t heads = g.kv_heads * g.groups, hd = g.head_dim;
  const int rows = static_cast<int>(task.tokens * g.groups);
  for (int r = 0; r < rows; ++r) {
    const int64_t t = seqs[4 * task.seq] + task.t0 + r / g.groups;
    const int64_t head = task.kv_head * g.groups + r % g.groups;
    uint16_t* dst = out + (t * heads + head) * hd;
    const V16 inv = vset1(sums[r] > 0.0f ? 1.0f / sums[r] : 0.0f);
    for (int64_t d = 0; d < hd; d += 16)
      vstore_bf16(dst + d, vmul(vload(accs + r * acc_stride + d), inv));
  }
}

}  // namespace

// Returns 0, or a positive code for arguments the kernel does not take (the caller checks
// the geometry once at start; this is the backstop). window: keys at positions > the
// query's - window (0: none); softcap: cap * tanh(scores / cap) (0: none).
extern "C" int loramux_paged_attention(int64_t n_seqs, const int64_t* seqs, const int64_t* tables,
                                       const uint16_t* q, int64_t q_token, int64_t q_head,
                                       const uint16_t* k, const uint16_t* v, int64_t kv_heads,
                                       int64_t groups, int64_t head_dim, int64_t block_size,
                                       int64_t num_blocks, float scale, int64_t window,
                                       float softcap, uint16_t* out) {
  if (head_dim % 32 != 0 || head_dim > kMaxHeadDim || block_size > kMaxBlock ||
      kSplit % block_size != 0 || groups < 1 || groups > kMaxRows || window < 0 ||
      !(softcap >= 0.0f))
    return 1;
  const Geometry g{kv_heads, groups,  head_dim, block_size, num_blocks,
                   q_token,  q_head,  scale,    window,     softcap};
  const int threads = omp_get_max_threads();
  // A sequence's query tokens cut into tiles, each reading the context, so that a chunk
  // over a long context is several tasks per KV head (3 KV heads on SmolLM2: 3 tasks for 2
  // threads, one of them idle half the time, without the cut); decode rows are 1 token.
  const int64_t per_head = std::max<int64_t>(1, (4 * threads + kv_heads - 1) / kv_heads);
  std::vector<Task> tasks;
  for (int64_t s = 0; s < n_seqs; ++s) {
    const int64_t count = seqs[4 * s + 1], first = seqs[4 * s + 2];
    if (count < 1 || first < 0) return 2;
    const int64_t tile = std::clamp<int64_t>((count + per_head - 1) / per_head, 1, kMaxRows / groups);
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t t0 = 0; t0 < count; t0 += tile)
        tasks.push_back({s, h, t0, std::min(tile, count - t0)});
  }
  auto run = [&](int64_t i) {
    thread_local RowState st;
    const Task& task = tasks[i];
    run_task(task, seqs, tables, q, k, v, g, st);
    write_rows(task, seqs, g, st.sum, &st.acc[0][0], kMaxHeadDim, out);
  };
  const int64_t count = static_cast<int64_t>(tasks.size());
  if (threads < 2 || count < 2) {
    for (int64_t i = 0; i < count; ++i) run(i);
  } else {
#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < count; ++i) run(i);
  }
  return 0;
}
