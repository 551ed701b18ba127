// Multi-LoRA shrink + expand for a batch of rows (tokens), each row on its own adapter slot:
//
//     y_m[t] = ((x[t] . A[slot(t)]^T) * row_scale[slot(t)])[member m's rank rows] . Bt_m[slot(t)]
//
// for every member m of a fused group (q/k/v share A's rows stacked along the rank), with
// bf16 weights and inputs, float32 accumulation and bf16 outputs. Rows are grouped by
// adapter first, so an adapter's weights are read once per call however many rows use it;
// the shrink is AVX-512 BF16 dot products (4 rank rows x up to 4 rows per tile), the expand
// float32 FMAs over Bt's rows with each output chunk's sums in registers. At batch 32 with
// 32 adapters every weight comes from DRAM (314 MB a step on SmolLM2), so what decides the
// speed is keeping the memory busy: each thread takes a contiguous run of tiles and, while
// it computes one tile, asks for the next tile's weights into L2 a cache line per line it
// reads. `python -m bench.lora_kernel` (120 SmolLM2 group calls, 32 rank-16 adapters,
// load 3-5): 27-29 -> 31 GB/s, 89-96% of a plain read of the same bytes in the same calls
// (was 73-87%); without software prefetching 17 GB/s. Tiles run on the
// caller's OpenMP team (torch's libgomp, the same runtime). Built by
// loramux.server.lora.backend.native with g++ -O3 -mavx512f -mavx512bw -mavx512vl
// -mavx512dq -mavx512bf16 -fopenmp, loaded with ctypes.
//
// Plan layout, per rank class k (stride 4 + members int64 values):
//     [width, capacity, A ptr [capacity, members * width, in] bf16,
//      row_scale ptr [capacity, members * width] f32, Bt_0 ptr [capacity, width, out_0] bf16, ...]
// Route: [n, 2] int64: (class width, index in that class's stack); width 0 = no adapter.
// Outputs: ys[m] points at member m's [n, out_m] bf16 rows (contiguous). Each delta is
// rounded to bf16 and added to what is there, rounded again (rows with no adapter are left
// alone): `out.add_(delta.to(bf16))`, as PEFT adds a delta to a 4-bit layer's output, so the
// layer's own output takes the delta with no separate delta tensor, split or add.

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace {

constexpr int kRowTile = 4;   // rows of one adapter per shrink/expand tile
constexpr int kRankTile = 4;  // rank rows per shrink tile
constexpr int kMaxMembers = 8;

struct ClassPlan {
  int64_t width;
  int64_t capacity;
  const uint16_t* a;
  const float* scale;
  const uint16_t* bt[kMaxMembers];
};

struct Tile {
  const ClassPlan* cls;
  int64_t index;          // slot index in the class stack
  int rows;               // 1..kRowTile
  int32_t row[kRowTile];  // batch rows
};

inline __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Sum of each of four vectors: {sum(v0), sum(v1), sum(v2), sum(v3)}.
inline __m128 sum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
  auto half = [](__m512 v) {
    __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  };
  return _mm_hadd_ps(_mm_hadd_ps(half(v0), half(v1)), _mm_hadd_ps(half(v2), half(v3)));
}

// A tile's weights (A's rows, then each member's Bt rows), asked for into L2 a cache line
// at a time: the thread's next tile while this one computes (`pump`, one line per line
// read), whatever is left at this tile's end, or a first tile at once (`finish`).
struct Prefetcher {
  const char* begin[kMaxMembers + 1];
  const char* end[kMaxMembers + 1];
  int segments = 0;
  int segment = 0;
  const char* p = nullptr;

  void add(const uint16_t* start, int64_t elements) {
    begin[segments] = reinterpret_cast<const char*>(start);
    end[segments] = begin[segments] + elements * 2;
    if (segments++ == 0) p = begin[0];
  }
  inline void pump() {
    if (segment >= segments) return;
    _mm_prefetch(p, _MM_HINT_T1);
    p += 64;
    if (p >= end[segment] && ++segment < segments) p = begin[segment];
  }
  void finish() {
    while (segment < segments) pump();
  }
};

// h[row][r] = scale[r] * dot(A[r], x[row]) for rank rows [r0, r0 + kRankTile), R rows.
template <int R>
void shrink_tile(const Tile& tile, const uint16_t* a, const float* scale, int64_t r0,
                 const uint16_t* x, int64_t in, float* h, int64_t h_stride, Prefetcher& pf) {
  __m512 acc[R][kRankTile];
  for (int j = 0; j < R; ++j)
    for (int q = 0; q < kRankTile; ++q) acc[j][q] = _mm512_setzero_ps();
  const uint16_t* arow = a + r0 * in;
  for (int64_t k = 0; k < in; k += 32) {
    const __mmask32 mask = in - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (in - k)) - 1;
    __m512bh av[kRankTile];
    for (int q = 0; q < kRankTile; ++q) {
      av[q] = (__m512bh)_mm512_maskz_loadu_epi16(mask, arow + q * in + k);
      pf.pump();
    }
    for (int j = 0; j < R; ++j) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + tile.row[j] * in + k);
      for (int q = 0; q < kRankTile; ++q) acc[j][q] = _mm512_dpbf16_ps(acc[j][q], av[q], xv);
    }
  }
  const __m128 s = _mm_loadu_ps(scale + r0);
  for (int j = 0; j < R; ++j) {
    const __m128 sums = _mm_mul_ps(sum4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]), s);
    _mm_storeu_ps(h + tile.row[j] * h_stride + r0, sums);
  }
}

// y rows = h rows . Bt for one member: output columns in chunks of C vectors of 16, each
// chunk's R x C float32 sums held in registers while Bt's W rows go by (Bt rows are in L2 by
// now: prefetched a tile ahead), then rounded to bf16. No float32 row buffer in memory.
template <int R, int C>
inline void expand_chunk(const Tile& tile, const uint16_t* bt, int64_t width, int64_t out,
                         int64_t o, const float* h, int64_t h_stride, uint16_t* y,
                         Prefetcher& pf) {
  __m512 acc[R][C];
  for (int j = 0; j < R; ++j)
    for (int c = 0; c < C; ++c) acc[j][c] = _mm512_setzero_ps();
  const int64_t left = out - o - 16 * (C - 1);  // columns in the last vector (1..16)
  const __mmask16 last = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
  for (int64_t r = 0; r < width; ++r) {
    const uint16_t* b = bt + r * out + o;
    __m512 v[C];
    for (int c = 0; c < C; ++c)
      v[c] = bf16_to_f32(c == C - 1 ? _mm256_maskz_loadu_epi16(last, b + 16 * c)
                                    : _mm256_loadu_si256((const __m256i*)(b + 16 * c)));
    for (int q = 0; q < C / 2; ++q) pf.pump();  // one line asked per line read
    if (C == 1 && (r & 1)) pf.pump();
    for (int j = 0; j < R; ++j) {
      const __m512 hv = _mm512_set1_ps(h[tile.row[j] * h_stride + r]);
      for (int c = 0; c < C; ++c) acc[j][c] = _mm512_fmadd_ps(hv, v[c], acc[j][c]);
    }
  }
  for (int j = 0; j < R; ++j) {
    uint16_t* yrow = y + tile.row[j] * out + o;
    for (int c = 0; c < C; ++c) {
      // bf16(y + bf16(delta)), each rounding to nearest even as torch's
      const __m256i delta = (__m256i)_mm512_cvtneps_pbh(acc[j][c]);
      const __m256i old = c == C - 1 ? _mm256_maskz_loadu_epi16(last, yrow + 16 * c)
                                     : _mm256_loadu_si256((const __m256i*)(yrow + 16 * c));
      const __m256i packed =
          (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(bf16_to_f32(old), bf16_to_f32(delta)));
      if (c == C - 1)
        _mm256_mask_storeu_epi16(yrow + 16 * c, last, packed);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(yrow + 16 * c), packed);
    }
  }
}

template <int R>
void expand_stream(const Tile& tile, const uint16_t* bt, int64_t width, int64_t out,
                   const float* h, int64_t h_stride, uint16_t* y, Prefetcher& pf) {
  constexpr int C = R == 1 ? 8 : 4;  // R x C accumulators: 8 or up to 16 of 32 registers
  int64_t o = 0;
  for (; o + 16 * C <= out; o += 16 * C)
    expand_chunk<R, C>(tile, bt, width, out, o, h, h_stride, y, pf);
  for (; o < out; o += 16)
    expand_chunk<R, 1>(tile, bt, width, out, o, h, h_stride, y, pf);
}

}  // namespace

extern "C" int loramux_bgmv(int64_t n, int64_t in, int64_t members, const int64_t* outs,
                            const uint16_t* x, int64_t num_classes, const int64_t* plan,
                            const int64_t* route, const int64_t* ys) {
  if (members < 1 || members > kMaxMembers || num_classes < 0 || n < 0) return -1;
  std::vector<ClassPlan> classes(static_cast<size_t>(num_classes));
  int64_t max_width = 0;
  for (int64_t k = 0; k < num_classes; ++k) {
    const int64_t* p = plan + k * (4 + members);
    ClassPlan& c = classes[k];
    c.width = p[0];
    c.capacity = p[1];
    c.a = reinterpret_cast<const uint16_t*>(p[2]);
    c.scale = reinterpret_cast<const float*>(p[3]);
    for (int64_t m = 0; m < members; ++m) c.bt[m] = reinterpret_cast<const uint16_t*>(p[4 + m]);
    if (c.width % kRankTile != 0 || c.width <= 0) return -1;
    max_width = std::max(max_width, c.width);
  }
  uint16_t* y[kMaxMembers];
  for (int64_t m = 0; m < members; ++m) y[m] = reinterpret_cast<uint16_t*>(ys[m]);

  // Rows grouped by (class, index): one tile per up to kRowTile rows of the same adapter.
  std::vector<int64_t> order;
  order.reserve(n);
  for (int64_t t = 0; t < n; ++t) {
    if (route[2 * t] != 0) order.push_back(t);
  }
  std::stable_sort(order.begin(), order.end(), [route](int64_t l, int64_t r) {
    return route[2 * l] != route[2 * r] ? route[2 * l] < route[2 * r]
                                        : route[2 * l + 1] < route[2 * r + 1];
  });
  std::vector<Tile> tiles;
  for (size_t i = 0; i < order.size();) {
    const int64_t width = route[2 * order[i]], index = route[2 * order[i] + 1];
    const ClassPlan* cls = nullptr;
    for (const ClassPlan& c : classes)
      if (c.width == width) cls = &c;
    if (cls == nullptr || index < 0 || index >= cls->capacity) return -2;
    Tile tile{cls, index, 0, {0, 0, 0, 0}};
    while (i < order.size() && tile.rows < kRowTile && route[2 * order[i]] == width &&
           route[2 * order[i] + 1] == index)
      tile.row[tile.rows++] = static_cast<int32_t>(order[i++]);
    tiles.push_back(tile);
  }
  if (tiles.empty()) return 0;

  const int64_t h_stride = members * max_width;
  thread_local std::vector<float> h_buffer;
  if (static_cast<int64_t>(h_buffer.size()) < n * h_stride) h_buffer.resize(n * h_stride);
  float* h = h_buffer.data();

  // One work item per tile: its shrink, then its expand for every member, on one thread, so
  // a call has a single fork/join and no barrier between the two halves (on a shared,
  // loaded machine each barrier can wait out a scheduler slice). Tiles stay in slot order.
  int64_t weight_bytes = 0;
  for (const Tile& t : tiles) weight_bytes += t.cls->width * members * in * 2;
  const int64_t count = static_cast<int64_t>(tiles.size());
  auto weights = [&](const Tile& t, Prefetcher& pf) {
    const int64_t rows = members * t.cls->width;
    pf.add(t.cls->a + t.index * rows * in, rows * in);
    for (int64_t m = 0; m < members; ++m)
      pf.add(t.cls->bt[m] + t.index * t.cls->width * outs[m], t.cls->width * outs[m]);
  };
  // Tile i; `first`: nobody prefetched its weights (ask for them at once); `next`: the
  // tile this thread takes after it (its weights prefetched meanwhile), or -1.
  auto run_tile = [&](int64_t i, bool first, int64_t next) {
    const Tile& tile = tiles[i];
    const ClassPlan& c = *tile.cls;
    const int64_t rows = members * c.width;
    const uint16_t* a = c.a + tile.index * rows * in;
    const float* scale = c.scale + tile.index * rows;
    if (first) {
      Prefetcher now;
      weights(tile, now);
      now.finish();
    }
    Prefetcher pf;
    if (next >= 0) weights(tiles[next], pf);
    // h per batch row: [members * width] of this class, member m's rank rows at m * width.
    for (int64_t r0 = 0; r0 < rows; r0 += kRankTile) {
      switch (tile.rows) {
        case 1: shrink_tile<1>(tile, a, scale, r0, x, in, h, h_stride, pf); break;
        case 2: shrink_tile<2>(tile, a, scale, r0, x, in, h, h_stride, pf); break;
        case 3: shrink_tile<3>(tile, a, scale, r0, x, in, h, h_stride, pf); break;
        default: shrink_tile<4>(tile, a, scale, r0, x, in, h, h_stride, pf); break;
      }
    }
    for (int64_t m = 0; m < members; ++m) {
      const int64_t out = outs[m];
      const uint16_t* bt = c.bt[m] + tile.index * c.width * out;
      const float* hm = h + m * c.width;
      uint16_t* ym = y[m];
      switch (tile.rows) {
        case 1: expand_stream<1>(tile, bt, c.width, out, hm, h_stride, ym, pf); break;
        case 2: expand_stream<2>(tile, bt, c.width, out, hm, h_stride, ym, pf); break;
        case 3: expand_stream<3>(tile, bt, c.width, out, hm, h_stride, ym, pf); break;
        default: expand_stream<4>(tile, bt, c.width, out, hm, h_stride, ym, pf); break;
      }
    }
    pf.finish();
  };
  // Small calls run on the caller alone, WITHOUT entering a parallel region: a region of
  // fewer threads than the pool makes libgomp end the surplus workers, and the next op
  // (ours or torch's) must create them again (measured: batch-32 decode steps 49 -> 93 ms
  // on the base model's share when every small call did `num_threads(1)`). Large calls
  // use the whole team, as torch's own parallel ops do.
  const int threads = omp_get_max_threads();
  if (threads < 2 || weight_bytes < (64 << 10) || count < 2) {
    for (int64_t i = 0; i < count; ++i) run_tile(i, i == 0, i + 1 < count ? i + 1 : -1);
    return 0;
  }
  // Each thread owns one contiguous run of tiles, balanced by bytes, and takes them from
  // its front: it streams one run of the slot stacks (consecutive slots lie next to each
  // other) and knows its next tile, whose weights it prefetches while computing this one.
  // A thread done with its run takes tiles from the back of the others' (a thread the OS
  // preempted holds up no one), prefetching the tile before the one it took.
  // Bounds of run t: [lo, hi) packed as lo | hi << 32.
  std::unique_ptr<std::atomic<uint64_t>[]> runs(new std::atomic<uint64_t>[threads]);
  {
    int64_t total = 0;
    for (const Tile& t : tiles) total += t.cls->width;
    int64_t before = 0, i = 0;
    for (int t = 0; t < threads; ++t) {  // a tile goes to the run its middle byte falls in
      const int64_t lo = i, hi_bytes = total * (t + 1) / threads;
      while (i < count && before + tiles[i].cls->width / 2 < hi_bytes)
        before += tiles[i++].cls->width;
      runs[t].store(static_cast<uint64_t>(lo) | static_cast<uint64_t>(i) << 32);
    }
  }
  auto take = [&](int t, bool front, int64_t* next) -> int64_t {
    uint64_t bounds = runs[t].load(std::memory_order_relaxed);
    for (;;) {
      const int64_t lo = static_cast<int64_t>(bounds & 0xFFFFFFFFu);
      const int64_t hi = static_cast<int64_t>(bounds >> 32);
      if (lo >= hi) return -1;
      const uint64_t taken = front ? bounds + 1 : bounds - (uint64_t(1) << 32);
      if (runs[t].compare_exchange_weak(bounds, taken, std::memory_order_relaxed)) {
        const int64_t i = front ? lo : hi - 1;
        *next = front ? (i + 1 < hi ? i + 1 : -1) : (i - 1 >= lo ? i - 1 : -1);
        return i;
      }
    }
  };
#pragma omp parallel num_threads(threads)
  {
    const int id = omp_get_thread_num();
    for (int k = 0; k < threads; ++k) {
      // own run first, from the front; then the others' from the back (and the runs of any
      // thread the team did not get)
      const int t = (id + k) % threads;
      int64_t next = -1;
      bool first = true;  // a tile nobody prefetched: its weights asked for at once
      for (int64_t i; (i = take(t, k == 0, &next)) >= 0; first = false) run_tile(i, first, next);
    }
  }
  return 0;
}
