// Paged attention over the KV block pool, for the engine's decode rows and prefill chunks:
//
//     out[t, h] = softmax_j(scale * q[t, h] . K[j, h / g]) . V[j, h / g],  j <= position(t)
//
// read straight from the pool through each sequence's block table: no gathered copy of a
// row's keys and values (the torch path copies every row's blocks out of the pool each
// layer, then attention reads the copy again). Scores, softmax sums and the weighted sum of
// values are float32 (bf16 keys, values and queries; the products are exact in float32);
// the weights are rounded to bf16 before their product with the values, as in SDPA's CPU
// kernel, which the torch path and PEFT's reference use.
//
// Work: tasks of (sequence, KV head, query tile). The query heads that share a KV head and
// the tile's tokens form the task's rows, so each key and value block is read once for all
// of them. Softmax runs in blocks of 512 keys from position 0 with a running max, rounding
// as SDPA's CPU kernel does (see run_task), so the numbers are the torch path's up to the
// last bits. Tasks are shared out over OpenMP threads (the caller's team: torch's libgomp,
// the same runtime). Built by loramux.server.paged_attention.native with
// g++ -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -fopenmp, loaded with ctypes.
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
#include <vector>

namespace {

constexpr int kMaxRows = 64;      // rows of a task: query tokens x query heads per KV head
constexpr int kMaxHeadDim = 256;  // a multiple of 32
constexpr int kMaxBlock = 64;     // keys per block

struct Geometry {
  int64_t kv_heads, groups, head_dim, block_size, num_blocks;
  int64_t q_token, q_head;
  float scale;
};

struct Task {
  int64_t seq, kv_head, t0, tokens;  // query tokens [t0, t0 + tokens) of the sequence
};

inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// e^x for x <= 0 (scores minus their running max), float32, ~2 ulp: 2^n * p(r).
inline __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// Lane j of the result: the sum of v[j]'s 16 lanes (16 horizontal sums in 15 adds).
inline __m512 transpose_sum16(__m512 v[16]) {
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
  return _mm512_add_ps(w0, w1);
}

constexpr int kSplit = 512;  // keys per softmax block, aligned at position 0

struct RowState {
  float max[kMaxRows];
  float sum[kMaxRows];
  alignas(64) float acc[kMaxRows][kMaxHeadDim];
  alignas(64) float p[kMaxRows][kSplit];  // one block's scores, then its weights
};

// One task: its rows against every key they see, in blocks of kSplit keys from position 0,
// each block as SDPA's CPU kernel (flash attention) treats it for bf16 inputs: float32
// scores, the row's running max updated by the block's max, e = exp(score - max) summed
// in float32, the weights rounded to bf16 for their product with the values (float32
// sums), earlier sums rescaled by exp(old max - new max). So a row's weights are those of
// the torch path and of PEFT's reference up to the last bits of a float32 dot product or
// exp, and independent of which other queries share the task or the call.
void run_task(const Task& task, const int64_t* seqs, const int64_t* tables, const uint16_t* q,
              const uint16_t* k, const uint16_t* v, const Geometry& g, RowState& st) {
  const int64_t* seq = seqs + 4 * task.seq;
  const int64_t first = seq[2];
  const int64_t* table = tables + seq[3];
  const int64_t hd = g.head_dim, bs = g.block_size, vec = hd / 32;
  const int rows = static_cast<int>(task.tokens * g.groups);
  alignas(64) __m512bh qv[kMaxRows][kMaxHeadDim / 32];
  int64_t last[kMaxRows];  // the last position row r attends to
  for (int r = 0; r < rows; ++r) {
    const int64_t t = task.t0 + r / g.groups;
    const int64_t head = task.kv_head * g.groups + r % g.groups;
    const uint16_t* src = q + (seq[0] + t) * g.q_token + head * g.q_head;
    for (int64_t c = 0; c < vec; ++c) qv[r][c] = (__m512bh)_mm512_loadu_si512(src + 32 * c);
    last[r] = first + t;
    st.max[r] = -INFINITY;
    st.sum[r] = 0.0f;
    for (int64_t d = 0; d < hd; ++d) st.acc[r][d] = 0.0f;
  }
  const int64_t seen = first + task.t0 + task.tokens;  // keys the tile's last row sees
  const uint16_t* k_head = k + task.kv_head * g.num_blocks * bs * hd;
  const uint16_t* v_head = v + task.kv_head * g.num_blocks * bs * hd;
  alignas(64) float vf[16][kMaxHeadDim];  // 16 keys' values in float32
  for (int64_t s0 = 0; s0 < seen; s0 += kSplit) {
    const int64_t s1 = std::min<int64_t>(seen, s0 + kSplit);
    float block_max[kMaxRows];
    for (int r = 0; r < rows; ++r) block_max[r] = -INFINITY;
    // Scores, 16 keys at a time (a group never crosses a KV block: kSplit and 16 are
    // multiples of... the block size divides kSplit, and groups restart at each block).
    for (int64_t key0 = s0; key0 < s1;) {
      const int64_t b = key0 / bs, in_block = key0 % bs;
      const int64_t n = std::min<int64_t>({16, bs - in_block, s1 - key0});
      const uint16_t* kb = k_head + (table[b] * bs + in_block) * hd;
      for (int r = 0; r < rows; ++r) {
        const int64_t visible = std::min<int64_t>(n, last[r] - key0 + 1);
        float* out = st.p[r] + (key0 - s0);
        if (visible <= 0) {
          for (int64_t j = 0; j < n; ++j) out[j] = -INFINITY;
          continue;
        }
        __m512 dots[16];
        for (int j = 0; j < 16; ++j) {
          __m512 a = _mm512_setzero_ps();
          if (j < visible) {
            const uint16_t* kr = kb + j * hd;
            for (int64_t c = 0; c < vec; ++c)
              a = _mm512_dpbf16_ps(a, qv[r][c], (__m512bh)_mm512_loadu_si512(kr + 32 * c));
          }
          dots[j] = a;
        }
        const __mmask16 valid = static_cast<__mmask16>((1u << visible) - 1);
        const __m512 sc = _mm512_mask_mov_ps(
            _mm512_set1_ps(-INFINITY), valid,
            _mm512_mul_ps(transpose_sum16(dots), _mm512_set1_ps(g.scale)));
        block_max[r] = std::max(block_max[r], _mm512_mask_reduce_max_ps(valid, sc));
        _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1), sc);
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
      const __m512 m = _mm512_set1_ps(new_max);
      __m512 total = _mm512_setzero_ps();
      float* pr = st.p[r];
      for (int64_t j = 0; j < s1 - s0; j += 16) {
        const __mmask16 lanes = static_cast<__mmask16>(
            s1 - s0 - j >= 16 ? 0xFFFF : (1u << (s1 - s0 - j)) - 1);
        const __m512 sc = _mm512_maskz_loadu_ps(lanes, pr + j);
        // exp(-inf - max) is 0: keys the row does not see weigh nothing.
        const __mmask16 seen_lanes = lanes & _mm512_cmp_ps_mask(sc, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 e = _mm512_maskz_mov_ps(seen_lanes, exp_ps(_mm512_sub_ps(sc, m)));
        total = _mm512_add_ps(total, e);
        _mm512_mask_storeu_ps(pr + j, lanes, bf16_to_f32((__m256i)_mm512_cvtneps_pbh(e)));
      }
      st.sum[r] = _mm512_reduce_add_ps(total) + correction * st.sum[r];
      st.max[r] = new_max;
      if (correction != 1.0f) {
        const __m512 corr = _mm512_set1_ps(correction);
        for (int64_t d = 0; d < hd; d += 16)
          _mm512_store_ps(st.acc[r] + d, _mm512_mul_ps(_mm512_load_ps(st.acc[r] + d), corr));
      }
    }
    // Weighted values, 16 keys at a time.
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
        for (int64_t d = 0; d < hd; d += 16)
          _mm512_store_ps(&vf[j][d], bf16_to_f32(_mm256_loadu_si256(
                                         reinterpret_cast<const __m256i*>(vb + j * hd + d))));
      for (int r = 0; r < rows; ++r) {
        if (!active[r]) continue;
        const int64_t visible = std::min<int64_t>(n, last[r] - key0 + 1);
        if (visible <= 0) continue;
        const float* pr = st.p[r] + (key0 - s0);
        for (int64_t d = 0; d < hd; d += 16) {
          __m512 a = _mm512_load_ps(st.acc[r] + d);
          for (int64_t j = 0; j < visible; ++j)
            a = _mm512_fmadd_ps(_mm512_set1_ps(pr[j]), _mm512_load_ps(&vf[j][d]), a);
          _mm512_store_ps(st.acc[r] + d, a);
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
    const __m512 inv = _mm512_set1_ps(sums[r] > 0.0f ? 1.0f / sums[r] : 0.0f);
    for (int64_t d = 0; d < hd; d += 16) {
      const __m256bh y = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(accs + r * acc_stride + d), inv));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), (__m256i)y);
    }
  }
}

}  // namespace

// Returns 0, or a positive code for arguments the kernel does not take (the caller checks
// the geometry once at start; this is the backstop).
extern "C" int loramux_paged_attention(int64_t n_seqs, const int64_t* seqs, const int64_t* tables,
                                       const uint16_t* q, int64_t q_token, int64_t q_head,
                                       const uint16_t* k, const uint16_t* v, int64_t kv_heads,
                                       int64_t groups, int64_t head_dim, int64_t block_size,
                                       int64_t num_blocks, float scale, uint16_t* out) {
  if (head_dim % 32 != 0 || head_dim > kMaxHeadDim || block_size > kMaxBlock ||
      kSplit % block_size != 0 || groups < 1 || groups > kMaxRows)
    return 1;
  const Geometry g{kv_heads, groups, head_dim, block_size, num_blocks, q_token, q_head, scale};
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
