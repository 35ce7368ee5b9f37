// Block-sparse expert FFN primitives for CPU: read only the selected experts' rows, in place.
//
// Dimension legend: T tokens, D model width, E experts, R rows per expert of the weight in use
// (2S for the gated input projection, S otherwise), K slots per token, N used slots.
//
// A "slot" is one (token, choice) pair, numbered t * K + j. `build_groups` sorts the used slots by
// expert (a counting sort, stable), so every expert's work is a contiguous slot list and every
// selected weight block is streamed once per call, whatever the number of tokens:
//
//   grouped_in        pre[slot, :] = W[e] x[t] (+ b[e])                 dot-product tiles, 4 rows x 4 tokens
//   grouped_out       out[t, :]    = Σ_slots Σ_s a[slot, s] W[e, s, :]   few tokens: rows split over threads;
//                                                                       many: columns split, 6-token tiles
//   grouped_wgrad     dW[e]        = Σ_slots g[slot, :] ⊗ x[t, :]       weight gradient
//   fused_expert_ffn  grouped_in → (act(gate) ⊙ up − centre) · scale → grouped_out (+ out_init), one call
//                     (known activations; centre = the representatives folds in the static term)
//
// The backward pass needs no other primitive: d x of grouped_in is grouped_out with the same
// weight, d a of grouped_out is grouped_in with the same weight, and both weight gradients are
// grouped_wgrad. Weights are fp32 or bf16; arithmetic is fp32 (bf16 is widened on load), except
// bf16 x bf16 input projections on CPUs with AVX512-BF16 (vdpbf16ps: bf16 products, fp32 sums, as
// torch's own bf16 matmul). GCC vector extensions, so one source serves AVX-512, AVX2 and NEON.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

// bf16 x bf16 products with fp32 accumulation (vdpbf16ps), when the build target has them.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define MOEFY_BF16_DOT 1
#else
#define MOEFY_BF16_DOT 0
#endif

namespace {

constexpr int64_t L = 16;  // lanes of one vector
// Software prefetch. The selected experts' rows are contiguous streams that every CPU's hardware
// prefetcher follows; what it cannot predict is the jump to the next selected expert, whose first
// PF_NEXT_LINES cache lines are requested early (into all cache levels: a non-temporal hint lands
// in L1 only on Intel, where lines requested far ahead are evicted before use and read twice).
// PF_DIST > 0 adds in-stream prefetches PF_DIST bytes ahead of each row being read.
// PF_SHADOW: while a weight block is read, the block of the next work item (the next selected
// expert, elsewhere in memory) is prefetched line by line at the same offsets, so one block is
// always in flight; without it each jump to a new expert waits for the prefetcher to re-learn the
// stream (small experts of a few KB jump often).
#ifndef PF_NEXT_LINES
#define PF_NEXT_LINES 16
#endif
#ifndef PF_DIST
#define PF_DIST 0
#endif
#ifndef PF_SHADOW
#define PF_SHADOW 1
#endif
// Blocks smaller than this are not shadowed: measured (fp32, 1 thread, Intel Xeon with AVX-512) it
// gained 3-8% on 32-neuron experts at d=2048 (0.5 MB blocks), ±1% on 5 MB blocks and lost 3-4% on
// SmolLM2's 6-neuron experts (28 KB), where the prefetches only compete with the stream itself.
constexpr int64_t SHADOW_MIN_BYTES = int64_t(64) * 1024;

// Prefetch the line `delta` elements away from p (delta 0: nothing to shadow).
template <typename W>
inline void shadow(const W* p, int64_t delta) {
#if PF_SHADOW
  if (delta) __builtin_prefetch(p + delta, 0, 3);
#else
  (void)p, (void)delta;
#endif
}

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef float vf_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint16_t vh_u __attribute__((vector_size(32), aligned(2), may_alias));
typedef uint32_t vu __attribute__((vector_size(64)));

// Two-input lane shuffle of 16-lane vectors (indices 0..31): GCC's spelling works from GCC 4.7.
#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, vi{__VA_ARGS__})
#endif

using bf16 = at::BFloat16;

// Fewest multiply-adds worth a thread: smaller calls run serially (a parallel region costs
// microseconds, far more on an oversubscribed machine).
constexpr int64_t MIN_WORK = int64_t(1) << 16;

// Items per thread such that each thread gets at least MIN_WORK of `total_work`.
inline int64_t grain_for(int64_t items, int64_t total_work) {
  const int64_t per_item = std::max<int64_t>(1, total_work / std::max<int64_t>(items, 1));
  return std::max<int64_t>(1, MIN_WORK / per_item);
}

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline vf load(const bf16* p) {
  vu w = __builtin_convertvector(*reinterpret_cast<const vh_u*>(p), vu) << 16;
  return reinterpret_cast<vf&>(w);
}
// Start fetching the first lines of a weight block the HW prefetcher cannot predict (the next
// selected expert): the first PF_NEXT_LINES lines of its first row(s).
template <typename W>
inline void prefetch_rows(const W* w, int64_t D) {
#if PF_NEXT_LINES
  const char* p = reinterpret_cast<const char*>(w);
  const int64_t bytes = std::min<int64_t>(D * int64_t(sizeof(W)), PF_NEXT_LINES * 64);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
#else
  (void)w, (void)D;
#endif
}

// Load once into a register: otherwise GCC folds the load into every FMA that uses the value,
// multiplying the loads per FMA by the tile's token count.
template <typename V>
inline void keep_in_register(V& v) {
#if defined(__AVX512F__)  // (a 16-lane vector is one register only with AVX-512)
  asm volatile("" : "+v"(v));
#else
  (void)v;
#endif
}

inline void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }
inline float scalar(float v) { return v; }
inline float scalar(bf16 v) { return static_cast<float>(v); }
inline vf splat(float a) { return vf{} + a; }
inline float hsum(vf v) {
  v += SHUFFLE(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
  v += SHUFFLE(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
  v += SHUFFLE(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return v[0] + v[1];
}

// out[j] = hsum(v[j]) for 16 vectors at once: a transpose-and-add tree (15 adds, 30 shuffles
// instead of 16 separate horizontal sums).
inline void hsum16(const vf* v, float* out) {
  vf c[8], d[4], e[2];
  for (int k = 0; k < 8; ++k)
    c[k] = SHUFFLE(v[2 * k], v[2 * k + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           SHUFFLE(v[2 * k], v[2 * k + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  for (int k = 0; k < 4; ++k)
    d[k] = SHUFFLE(c[2 * k], c[2 * k + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           SHUFFLE(c[2 * k], c[2 * k + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  for (int k = 0; k < 2; ++k)
    e[k] = SHUFFLE(d[2 * k], d[2 * k + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           SHUFFLE(d[2 * k], d[2 * k + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  store(out, SHUFFLE(e[0], e[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                 SHUFFLE(e[0], e[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
}

// out[rb * TB + tb] = hsum(acc[rb][tb])
template <int RB, int TB>
inline void hsum_tile(const vf (&acc)[RB][TB], float* out) {
  if constexpr (RB * TB == 16) {
    hsum16(&acc[0][0], out);
  } else {
    for (int rb = 0; rb < RB; ++rb)
      for (int tb = 0; tb < TB; ++tb) out[rb * TB + tb] = hsum(acc[rb][tb]);
  }
}

// ---------------------------------------------------------------------------------------------
// Grouping

struct Groups {
  const int64_t* offsets;  // (E + 1,) start of each expert's slot list
  const int64_t* slots;    // (N,) slot ids t * K + j, grouped by expert
  int64_t k;
  std::vector<int64_t> token;  // (N,) slots[q] / k, computed once (a 64-bit division is slow)
  const int64_t* tokens;       // token.data()
  const int64_t* arows;        // (N,) row of the activations `a` that grouped_out reads for slots[q]:
                               // slots (a in slot order) or 0..N-1 (a in grouped order, contiguous per expert)
};

Groups groups_of(const at::Tensor& offsets, const at::Tensor& slots, int64_t k) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && slots.scalar_type() == at::kLong, "groups must be int64");
  TORCH_CHECK(offsets.is_contiguous() && slots.is_contiguous(), "groups must be contiguous");
  Groups g{offsets.data_ptr<int64_t>(), slots.data_ptr<int64_t>(), k, {}, nullptr, slots.data_ptr<int64_t>()};
  g.token.resize(static_cast<size_t>(slots.numel()));
  for (int64_t q = 0; q < slots.numel(); ++q) g.token[q] = g.slots[q] / k;
  g.tokens = g.token.data();
  return g;
}

std::tuple<at::Tensor, at::Tensor> build_groups(const at::Tensor& idx_in, int64_t num_experts) {
  TORCH_CHECK(idx_in.dim() == 2 && idx_in.scalar_type() == at::kLong, "idx must be a (T, K) int64 tensor");
  at::Tensor idx = idx_in.contiguous();
  const int64_t n = idx.numel();
  const int64_t* p = idx.data_ptr<int64_t>();
  at::Tensor offsets = at::zeros({num_experts + 1}, idx.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  int64_t used = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t e = p[i];
    if (e == -1) continue;
    TORCH_CHECK(e >= 0 && e < num_experts, "expert index ", e, " out of range: valid are 0..",
                num_experts - 1, " and -1 (empty slot)");
    ++off[e + 1];
    ++used;
  }
  for (int64_t e = 0; e < num_experts; ++e) off[e + 1] += off[e];
  at::Tensor slots = at::empty({used}, idx.options());
  int64_t* s = slots.data_ptr<int64_t>();
  std::vector<int64_t> fill(off, off + num_experts);
  for (int64_t i = 0; i < n; ++i) {
    if (p[i] != -1) s[fill[p[i]]++] = i;
  }
  return {offsets, slots};
}

// ---------------------------------------------------------------------------------------------
// grouped_in: pre[slot, r] = <W[e, r, :], x[t, :]> (+ b[e, r])

#if MOEFY_BF16_DOT
inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// RB rows x TB tokens of bf16 dot products, 32 bf16 pairs per instruction.
template <int RB, int TB>
inline void dot_tile_bf16(const bf16* const* xs, const bf16* w, int64_t D, float* out, int64_t pf) {
  __m512 acc[RB][TB];
  for (int rb = 0; rb < RB; ++rb)
    for (int tb = 0; tb < TB; ++tb) acc[rb][tb] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32) {
    const __mmask32 m = D - d >= 32 ? ~__mmask32(0) : __mmask32((uint64_t(1) << (D - d)) - 1);
    __m512i xv[TB];
    for (int tb = 0; tb < TB; ++tb) xv[tb] = _mm512_maskz_loadu_epi16(m, xs[tb] + d);
    for (int rb = 0; rb < RB; ++rb) {
      shadow(w + rb * D + d, pf);
      __m512i wv = _mm512_maskz_loadu_epi16(m, w + rb * D + d);
      keep_in_register(wv);
      for (int tb = 0; tb < TB; ++tb) acc[rb][tb] = _mm512_dpbf16_ps(acc[rb][tb], as_bh(wv), as_bh(xv[tb]));
    }
  }
  vf sums[RB][TB];
  for (int rb = 0; rb < RB; ++rb)
    for (int tb = 0; tb < TB; ++tb) sums[rb][tb] = (vf)acc[rb][tb];
  hsum_tile<RB, TB>(sums, out);
}
#endif

// RB weight rows x TB tokens, accumulated over D; out[rb * TB + tb]. X: float, or bf16 with
// bf16 weights (only where MOEFY_BF16_DOT).
template <int RB, int TB, typename X, typename W>
inline void dot_tile(const X* const* xs, const W* w, int64_t D, float* out, int64_t pf = 0) {
#if MOEFY_BF16_DOT
  if constexpr (std::is_same_v<X, bf16>) {
    dot_tile_bf16<RB, TB>(xs, w, D, out, pf);
    return;
  } else
#endif
  {
    vf acc[RB][TB];
    for (int rb = 0; rb < RB; ++rb)
      for (int tb = 0; tb < TB; ++tb) acc[rb][tb] = vf{};
    int64_t d = 0;
    for (; d + L <= D; d += L) {
      vf xv[TB];
      for (int tb = 0; tb < TB; ++tb) xv[tb] = load(xs[tb] + d);
      for (int rb = 0; rb < RB; ++rb) {
#if PF_DIST
        __builtin_prefetch(reinterpret_cast<const char*>(w + rb * D + d) + PF_DIST, 0, 3);
#endif
        if (sizeof(W) == 4 || (d & 31) == 0) shadow(w + rb * D + d, pf);  // one prefetch per 64-byte line
        vf wv = load(w + rb * D + d);
        keep_in_register(wv);
        for (int tb = 0; tb < TB; ++tb) acc[rb][tb] += wv * xv[tb];
      }
    }
    hsum_tile<RB, TB>(acc, out);
    if (d < D)
      for (int rb = 0; rb < RB; ++rb)
        for (int tb = 0; tb < TB; ++tb) {
          float s = 0.0f;
          for (int64_t j = d; j < D; ++j) s += scalar(w[rb * D + j]) * scalar(xs[tb][j]);
          out[rb * TB + tb] += s;
        }
  }
}

template <int TB, typename X, typename W>
inline void dot_rows(const X* const* xs, const W* w, int64_t rows, int64_t D, float* out,
                     int64_t pf = 0) {
  int64_t r = 0;
  if constexpr (TB > 4) {  // 2 rows x up to 8 tokens: each weight row is reused by twice the tokens
    for (; r + 2 <= rows; r += 2) dot_tile<2, TB>(xs, w + r * D, D, out + r * TB, pf);
    if (r < rows) dot_tile<1, TB>(xs, w + r * D, D, out + r * TB, pf);
    return;
  }
  for (; r + 4 <= rows; r += 4) dot_tile<4, TB>(xs, w + r * D, D, out + r * TB, pf);
  switch (rows - r) {
    case 3: dot_tile<3, TB>(xs, w + r * D, D, out + r * TB, pf); break;
    case 2: dot_tile<2, TB>(xs, w + r * D, D, out + r * TB, pf); break;
    case 1: dot_tile<1, TB>(xs, w + r * D, D, out + r * TB, pf); break;
    default: break;
  }
}

struct InItem {
  int64_t e, slot_begin, ntok, r0, r1;
};

#ifndef IN_TB_MAX
#define IN_TB_MAX 8
#endif
constexpr int64_t IN_TB = IN_TB_MAX;  // tokens per tile (4 rows x 4 tokens, or 2 rows x 8 tokens)

// Work items in expert-major order, so a static split streams each thread through contiguous
// weight rows. Row chunks keep one chunk of weights cache-resident across the token blocks.
std::vector<InItem> in_items(const Groups& g, int64_t E, int64_t R, int64_t D) {
  int64_t rc = std::max<int64_t>(4, (int64_t(64) * 1024 / (4 * std::max<int64_t>(D, 1))) / 4 * 4);
  rc = std::min(rc, R);
  std::vector<InItem> items;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t b = g.offsets[e], n = g.offsets[e + 1] - b;
    if (n == 0) continue;
    for (int64_t r0 = 0; r0 < R; r0 += rc)
      for (int64_t t0 = 0; t0 < n; t0 += IN_TB)
        items.push_back({e, b + t0, std::min(IN_TB, n - t0), r0, std::min(R, r0 + rc)});
  }
  return items;
}

template <typename X, typename W>
void grouped_in_impl(const X* x, const W* w, const W* bias, const Groups& g, int64_t E, int64_t R,
                     int64_t D, float* pre) {
  const std::vector<InItem> items = in_items(g, E, R, D);
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t grain = grain_for(n_items, (g.offsets[E] - g.offsets[0]) * R * D);
  at::parallel_for(0, n_items, grain, [&](int64_t begin, int64_t end) {
    constexpr int64_t rows_per_tile = 64;
    float tile[IN_TB * rows_per_tile];
    for (int64_t i = begin; i < end; ++i) {
      const InItem& it = items[i];
      // the next item's block, when it is elsewhere (another expert): start it, then shadow it
      int64_t pf = 0;
      if (i + 1 < end && items[i + 1].e != it.e) {
        prefetch_rows(w + (items[i + 1].e * R + items[i + 1].r0) * D, D);
        if ((it.r1 - it.r0) * D * int64_t(sizeof(W)) >= SHADOW_MIN_BYTES)
          pf = ((items[i + 1].e - it.e) * R + (items[i + 1].r0 - it.r0)) * D;
      }
      const X* xs[IN_TB];
      int64_t slot[IN_TB];
      for (int64_t tb = 0; tb < it.ntok; ++tb) {
        slot[tb] = g.slots[it.slot_begin + tb];
        xs[tb] = x + g.tokens[it.slot_begin + tb] * D;
      }
      for (int64_t r0 = it.r0; r0 < it.r1; r0 += rows_per_tile) {
        const int64_t rows = std::min(rows_per_tile, it.r1 - r0);
        const W* wr = w + (it.e * R + r0) * D;
        switch (it.ntok) {
#if IN_TB_MAX == 8
          case 8: dot_rows<8>(xs, wr, rows, D, tile, pf); break;
          case 7: dot_rows<7>(xs, wr, rows, D, tile, pf); break;
          case 6: dot_rows<6>(xs, wr, rows, D, tile, pf); break;
          case 5: dot_rows<5>(xs, wr, rows, D, tile, pf); break;
#endif
          case 4: dot_rows<4>(xs, wr, rows, D, tile, pf); break;
          case 3: dot_rows<3>(xs, wr, rows, D, tile, pf); break;
          case 2: dot_rows<2>(xs, wr, rows, D, tile, pf); break;
          default: dot_rows<1>(xs, wr, rows, D, tile, pf); break;
        }
        for (int64_t r = 0; r < rows; ++r) {
          const float b = bias ? scalar(bias[it.e * R + r0 + r]) : 0.0f;
          for (int64_t tb = 0; tb < it.ntok; ++tb) pre[slot[tb] * R + r0 + r] = tile[r * it.ntok + tb] + b;
        }
      }
    }
  });
}

void check_weight(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.dim() == 3, name, " must be (E, rows, D)");
  TORCH_CHECK(w.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, name,
              " must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.device().is_cpu(), name, " must be on the CPU");
}

at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Rows of slots not in `slots` (empty slots) are zero; the kernels write all the others.
void zero_unused_rows(at::Tensor& rows, const at::Tensor& slots) {
  const int64_t n_rows = rows.size(0), width = rows.size(1), n = slots.numel();
  if (n == n_rows) return;
  std::vector<char> used(static_cast<size_t>(n_rows), 0);
  const int64_t* sl = slots.data_ptr<int64_t>();
  for (int64_t q = 0; q < n; ++q) used[sl[q]] = 1;
  float* p = rows.data_ptr<float>();
  for (int64_t r = 0; r < n_rows; ++r)
    if (!used[r]) std::fill(p + r * width, p + (r + 1) * width, 0.0f);
}

// bf16 weights and bf16 activations multiply as bf16 (fp32 sums), as torch's bf16 matmul does.
bool bf16_math(const at::Tensor& x, const at::Tensor& w) {
  return MOEFY_BF16_DOT && x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16;
}

at::Tensor grouped_in(const at::Tensor& x_in, const at::Tensor& w, const std::optional<at::Tensor>& b,
                      const at::Tensor& offsets, const at::Tensor& slots, int64_t k) {
  check_weight(w, "w");
  const int64_t E = w.size(0), R = w.size(1), D = w.size(2);
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == D, "x must be (T, ", D, ")");
  const int64_t T = x_in.size(0);
  at::Tensor pre = at::empty({T * k, R}, x_in.options().dtype(at::kFloat));
  const Groups g = groups_of(offsets, slots, k);
  zero_unused_rows(pre, slots);
  const bool has_b = b.has_value() && b->defined();
  if (has_b) TORCH_CHECK(b->is_contiguous() && b->numel() == E * R && b->scalar_type() == w.scalar_type(), "bad bias");
  float* out = pre.data_ptr<float>();
  if (w.scalar_type() == at::kFloat) {
    const at::Tensor x = as_f32(x_in);
    grouped_in_impl(x.data_ptr<float>(), w.data_ptr<float>(), has_b ? b->data_ptr<float>() : nullptr, g, E, R, D, out);
  } else if (bf16_math(x_in, w)) {
    const at::Tensor x = x_in.contiguous();
    grouped_in_impl(x.data_ptr<bf16>(), w.data_ptr<bf16>(), has_b ? b->data_ptr<bf16>() : nullptr, g, E, R, D, out);
  } else {
    const at::Tensor x = as_f32(x_in);
    grouped_in_impl(x.data_ptr<float>(), w.data_ptr<bf16>(), has_b ? b->data_ptr<bf16>() : nullptr, g, E, R, D, out);
  }
  return pre;
}

// ---------------------------------------------------------------------------------------------
// grouped_out: out[t, :] = Σ_{slots of t} Σ_s a[slot, s] W[e, s, :]

// o[:] += Σ_s c[s] w[s, :] over `rows` weight rows (4 at a time), shadowing the block `pf` elements away.
template <typename W>
inline void accumulate_rows(float* o, const float* c, const W* w, int64_t rows, int64_t D, int64_t pf) {
  int64_t s = 0;
  for (; s + 4 <= rows; s += 4) {
    const W* w0 = w + s * D;
    const vf c0 = splat(c[s]), c1 = splat(c[s + 1]), c2 = splat(c[s + 2]), c3 = splat(c[s + 3]);
    int64_t d = 0;
    for (; d + L <= D; d += L) {
#if PF_DIST
      for (int64_t r = 0; r < 4; ++r) __builtin_prefetch(reinterpret_cast<const char*>(w0 + r * D + d) + PF_DIST, 0, 3);
#endif
      if (sizeof(W) == 4 || (d & 31) == 0)
        for (int64_t r = 0; r < 4; ++r) shadow(w0 + r * D + d, pf);
      store(o + d, load(o + d) + ((c0 * load(w0 + d) + c1 * load(w0 + D + d)) +
                                  (c2 * load(w0 + 2 * D + d) + c3 * load(w0 + 3 * D + d))));
    }
    for (; d < D; ++d)
      o[d] += c[s] * scalar(w0[d]) + c[s + 1] * scalar(w0[D + d]) + c[s + 2] * scalar(w0[2 * D + d]) +
              c[s + 3] * scalar(w0[3 * D + d]);
  }
  for (; s < rows; ++s) {
    const W* w0 = w + s * D;
    const vf c0 = splat(c[s]);
    int64_t d = 0;
    for (; d + L <= D; d += L) {
      if (sizeof(W) == 4 || (d & 31) == 0) shadow(w0 + d, pf);
      store(o + d, load(o + d) + c0 * load(w0 + d));
    }
    for (; d < D; ++d) o[d] += c[s] * scalar(w0[d]);
  }
}

// Few tokens: split the selected rows among threads (each streams contiguous expert blocks) and
// accumulate into thread-private rows of out, summed at the end.
template <typename W>
void grouped_out_rows(const float* a, const W* w, const Groups& g, int64_t E, int64_t S, int64_t D, int64_t T,
                      float* out) {
  struct Item {
    int64_t e, s0, s1;
  };
  std::vector<Item> items;
  const int64_t rc = 16;
  for (int64_t e = 0; e < E; ++e)
    if (g.offsets[e + 1] > g.offsets[e])
      for (int64_t s0 = 0; s0 < S; s0 += rc) items.push_back({e, s0, std::min(S, s0 + rc)});
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t work = (g.offsets[E] - g.offsets[0]) * S * D;
  const int64_t nthreads =
      std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), n_items, work / MIN_WORK}));
  std::vector<float> part(static_cast<size_t>(std::max<int64_t>(nthreads - 1, 0) * T * D), 0.0f);
  const int64_t chunk = (n_items + nthreads - 1) / std::max<int64_t>(nthreads, 1);
  at::parallel_for(0, nthreads, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t p = pb; p < pe; ++p) {
      float* acc = p == 0 ? out : part.data() + (p - 1) * T * D;
      for (int64_t i = p * chunk; i < std::min(n_items, (p + 1) * chunk); ++i) {
        const Item& it = items[i];
        int64_t pf = 0;  // as in grouped_in: start the next expert's block, then shadow it
        if (i + 1 < n_items && items[i + 1].e != it.e) {
          prefetch_rows(w + (items[i + 1].e * S + items[i + 1].s0) * D, D);
          if ((it.s1 - it.s0) * D * int64_t(sizeof(W)) >= SHADOW_MIN_BYTES)
            pf = ((items[i + 1].e - it.e) * S + (items[i + 1].s0 - it.s0)) * D;
        }
        for (int64_t q = g.offsets[it.e]; q < g.offsets[it.e + 1]; ++q)
          accumulate_rows(acc + g.tokens[q] * D, a + g.arows[q] * S + it.s0, w + (it.e * S + it.s0) * D,
                          it.s1 - it.s0, D, pf);
      }
    }
  });
  for (int64_t p = 1; p < nthreads; ++p) {
    const float* src = part.data() + (p - 1) * T * D;
    for (int64_t i = 0; i < T * D; ++i) out[i] += src[i];
  }
}

// Many tokens: split the columns among threads (no write conflicts); within a column block of
// NV vectors, tiles of TB tokens of one expert keep their partial sums in registers over S.
template <int TB, int NV, typename W>
inline void out_tile(const float* a, const W* w, const int64_t* slots, const int64_t* toks, int64_t S, int64_t D,
                     int64_t col, float* out) {
  vf acc[TB][NV];
  for (int tb = 0; tb < TB; ++tb)
    for (int v = 0; v < NV; ++v) acc[tb][v] = vf{};
  for (int64_t s = 0; s < S; ++s) {
    vf wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = load(w + s * D + col + v * L);
    for (int tb = 0; tb < TB; ++tb) {
      const vf c = splat(a[slots[tb] * S + s]);
      for (int v = 0; v < NV; ++v) acc[tb][v] += c * wv[v];
    }
  }
  for (int tb = 0; tb < TB; ++tb) {
    float* o = out + toks[tb] * D + col;
    for (int v = 0; v < NV; ++v) store(o + v * L, load(o + v * L) + acc[tb][v]);
  }
}

template <int NV, typename W>
inline void out_block(const float* a, const W* we, const int64_t* slots, int64_t n, const int64_t* toks, int64_t S,
                      int64_t D, int64_t col, float* out) {
  int64_t q = 0;
  for (; q + 6 <= n; q += 6) out_tile<6, NV>(a, we, slots + q, toks + q, S, D, col, out);
  switch (n - q) {
    case 5: out_tile<5, NV>(a, we, slots + q, toks + q, S, D, col, out); break;
    case 4: out_tile<4, NV>(a, we, slots + q, toks + q, S, D, col, out); break;
    case 3: out_tile<3, NV>(a, we, slots + q, toks + q, S, D, col, out); break;
    case 2: out_tile<2, NV>(a, we, slots + q, toks + q, S, D, col, out); break;
    case 1: out_tile<1, NV>(a, we, slots + q, toks + q, S, D, col, out); break;
    default: break;
  }
}

template <typename W>
void grouped_out_cols(const float* a, const W* w, const Groups& g, int64_t E, int64_t S, int64_t D,
                      float* out) {
  constexpr int64_t CW = 4 * L;  // columns per block
  const int64_t nblocks = (D + CW - 1) / CW;
  const int64_t grain = grain_for(nblocks, (g.offsets[E] - g.offsets[0]) * S * D);
  at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t col = blk * CW, width = std::min(CW, D - col);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t b = g.offsets[e], n = g.offsets[e + 1] - b;
        if (n == 0) continue;
        const W* we = w + e * S * D;
        switch (width / L) {
          case 4: out_block<4>(a, we, g.arows + b, n, g.tokens + b, S, D, col, out); break;
          case 3: out_block<3>(a, we, g.arows + b, n, g.tokens + b, S, D, col, out); break;
          case 2: out_block<2>(a, we, g.arows + b, n, g.tokens + b, S, D, col, out); break;
          case 1: out_block<1>(a, we, g.arows + b, n, g.tokens + b, S, D, col, out); break;
          default: break;
        }
        for (int64_t j = col + (width / L) * L; j < col + width; ++j)  // scalar tail (D % 16)
          for (int64_t q = b; q < b + n; ++q) {
            float sum = 0.0f;
            for (int64_t s = 0; s < S; ++s) sum += a[g.arows[q] * S + s] * scalar(we[s * D + j]);
            out[g.tokens[q] * D + j] += sum;
          }
      }
    }
  });
}

#if MOEFY_BF16_DOT
// Many tokens, bf16 activations and weights: as grouped_out_cols, with vdpbf16ps. Each expert's
// 64-column block of W is first repacked into (s, s+1) row pairs per column, once per block and
// expert (then reused by all its token tiles), so one instruction does two rows for 16 columns.
alignas(64) constexpr uint16_t PAIR_LO[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                              8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
alignas(64) constexpr uint16_t PAIR_HI[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                              24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};

inline __mmask32 mask32(int64_t n) {
  return n >= 32 ? ~__mmask32(0) : n <= 0 ? __mmask32(0) : __mmask32((uint64_t(1) << n) - 1);
}
inline __mmask16 mask16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// packed[p * 4 + v]: columns 16 v .. 16 v + 15 of rows 2p, 2p+1 of W[e, :, col : col + width], paired.
inline void pack_pairs(const bf16* we, int64_t S, int64_t D, int64_t col, int64_t width, __m512i* packed) {
  const __m512i lo = _mm512_load_si512(PAIR_LO), hi = _mm512_load_si512(PAIR_HI);
  for (int64_t s = 0; s < S; s += 2) {
    for (int u = 0; u < 2; ++u) {
      const __mmask32 m = mask32(width - 32 * u);
      const __m512i r0 = _mm512_maskz_loadu_epi16(m, we + s * D + col + 32 * u);
      const __m512i r1 = s + 1 < S ? _mm512_maskz_loadu_epi16(m, we + (s + 1) * D + col + 32 * u) : _mm512_setzero_si512();
      packed[(s / 2) * 4 + 2 * u] = _mm512_permutex2var_epi16(r0, lo, r1);
      packed[(s / 2) * 4 + 2 * u + 1] = _mm512_permutex2var_epi16(r0, hi, r1);
    }
  }
}

template <int TB>
inline void out_tile_bf16(const bf16* a, const __m512i* packed, const int64_t* slots, const int64_t* toks, int64_t S,
                          int64_t D, int64_t col, int64_t width, float* out) {
  __m512 acc[TB][4];
  for (int tb = 0; tb < TB; ++tb)
    for (int v = 0; v < 4; ++v) acc[tb][v] = _mm512_setzero_ps();
  const uint16_t* ab = reinterpret_cast<const uint16_t*>(a);
  for (int64_t s = 0; s < S; s += 2) {
    __m512i wv[4];
    for (int v = 0; v < 4; ++v) {
      wv[v] = _mm512_load_si512(packed + (s / 2) * 4 + v);
      keep_in_register(wv[v]);
    }
    for (int tb = 0; tb < TB; ++tb) {
      const uint16_t* ar = ab + slots[tb] * S + s;  // the pair (a[s], a[s+1]); a[s+1] = 0 past the end
      const __m512i c = _mm512_set1_epi32(static_cast<int>(ar[0] | (s + 1 < S ? uint32_t(ar[1]) << 16 : 0u)));
      for (int v = 0; v < 4; ++v) acc[tb][v] = _mm512_dpbf16_ps(acc[tb][v], as_bh(wv[v]), as_bh(c));
    }
  }
  for (int tb = 0; tb < TB; ++tb) {
    float* o = out + toks[tb] * D + col;
    for (int v = 0; v < 4; ++v) {
      const __mmask16 m = mask16(width - 16 * v);
      _mm512_mask_storeu_ps(o + 16 * v, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, o + 16 * v), acc[tb][v]));
    }
  }
}

void grouped_out_cols_bf16(const bf16* a, const bf16* w, const Groups& g, int64_t E, int64_t S, int64_t D,
                           float* out) {
  constexpr int64_t CW = 64;
  const int64_t nblocks = (D + CW - 1) / CW;
  const int64_t grain = grain_for(nblocks, (g.offsets[E] - g.offsets[0]) * S * D / 2);
  at::parallel_for(0, nblocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<__m512i> packed(static_cast<size_t>((S + 1) / 2 * 4));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t col = blk * CW, width = std::min(CW, D - col);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t b = g.offsets[e], n = g.offsets[e + 1] - b;
        if (n == 0) continue;
        pack_pairs(w + e * S * D, S, D, col, width, packed.data());
        const int64_t* sl = g.arows + b;
        int64_t q = 0;
        for (; q + 6 <= n; q += 6) out_tile_bf16<6>(a, packed.data(), sl + q, g.tokens + b + q, S, D, col, width, out);
        switch (n - q) {
          case 5: out_tile_bf16<5>(a, packed.data(), sl + q, g.tokens + b + q, S, D, col, width, out); break;
          case 4: out_tile_bf16<4>(a, packed.data(), sl + q, g.tokens + b + q, S, D, col, width, out); break;
          case 3: out_tile_bf16<3>(a, packed.data(), sl + q, g.tokens + b + q, S, D, col, width, out); break;
          case 2: out_tile_bf16<2>(a, packed.data(), sl + q, g.tokens + b + q, S, D, col, width, out); break;
          case 1: out_tile_bf16<1>(a, packed.data(), sl + q, g.tokens + b + q, S, D, col, width, out); break;
          default: break;
        }
      }
    }
  });
}
#endif

constexpr int64_t FEW_TOKENS = 8;

// out (T, D) starts as zeros, or as `init` (D,) on every row
at::Tensor grouped_out_impl(const at::Tensor& a_in, const at::Tensor& w, const Groups& g, int64_t tokens,
                            const float* init = nullptr) {
  const int64_t E = w.size(0), S = w.size(1), D = w.size(2);
  at::Tensor out = init ? at::empty({tokens, D}, a_in.options().dtype(at::kFloat))
                        : at::zeros({tokens, D}, a_in.options().dtype(at::kFloat));
  if (init)
    for (int64_t t = 0; t < tokens; ++t) std::copy(init, init + D, out.data_ptr<float>() + t * D);
  float* o = out.data_ptr<float>();
  const bool few = tokens <= FEW_TOKENS;
#if MOEFY_BF16_DOT
  if (!few && bf16_math(a_in, w)) {
    const at::Tensor a = a_in.contiguous();
    grouped_out_cols_bf16(a.data_ptr<bf16>(), w.data_ptr<bf16>(), g, E, S, D, o);
    return out;
  }
#endif
  const at::Tensor a = as_f32(a_in);
  if (w.scalar_type() == at::kFloat) {
    if (few) grouped_out_rows(a.data_ptr<float>(), w.data_ptr<float>(), g, E, S, D, tokens, o);
    else grouped_out_cols(a.data_ptr<float>(), w.data_ptr<float>(), g, E, S, D, o);
  } else {
    if (few) grouped_out_rows(a.data_ptr<float>(), w.data_ptr<bf16>(), g, E, S, D, tokens, o);
    else grouped_out_cols(a.data_ptr<float>(), w.data_ptr<bf16>(), g, E, S, D, o);
  }
  return out;
}

at::Tensor grouped_out(const at::Tensor& a_in, const at::Tensor& w, const at::Tensor& offsets,
                       const at::Tensor& slots, int64_t k, int64_t tokens) {
  check_weight(w, "w");
  TORCH_CHECK(a_in.dim() == 2 && a_in.size(0) == tokens * k && a_in.size(1) == w.size(1), "a must be (T * K, ",
              w.size(1), ")");
  return grouped_out_impl(a_in, w, groups_of(offsets, slots, k), tokens);
}

// ---------------------------------------------------------------------------------------------
// grouped_wgrad: dW[e, r, :] = Σ_{slots of e} g[slot, r] x[t, :]

template <int RB, int NV>
inline void wgrad_tile(const float* gr, const float* x, const int64_t* slots, int64_t n, int64_t k, int64_t R,
                       int64_t D, int64_t r0, int64_t col, float* dw) {
  vf acc[RB][NV];
  for (int rb = 0; rb < RB; ++rb)
    for (int v = 0; v < NV; ++v) acc[rb][v] = vf{};
  for (int64_t q = 0; q < n; ++q) {
    const int64_t slot = slots[q];
    const float* xr = x + (slot / k) * D + col;
    vf xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = load(xr + v * L);
    for (int rb = 0; rb < RB; ++rb) {
      const vf c = splat(gr[slot * R + r0 + rb]);
      for (int v = 0; v < NV; ++v) acc[rb][v] += c * xv[v];
    }
  }
  for (int rb = 0; rb < RB; ++rb)
    for (int v = 0; v < NV; ++v) store(dw + (r0 + rb) * D + col + v * L, acc[rb][v]);
}

template <int RB>
inline void wgrad_rows(const float* gr, const float* x, const int64_t* slots, int64_t n, int64_t k, int64_t R,
                       int64_t D, int64_t r0, float* dw) {
  int64_t col = 0;
  for (; col + 4 * L <= D; col += 4 * L) wgrad_tile<RB, 4>(gr, x, slots, n, k, R, D, r0, col, dw);
  switch ((D - col) / L) {
    case 3: wgrad_tile<RB, 3>(gr, x, slots, n, k, R, D, r0, col, dw); break;
    case 2: wgrad_tile<RB, 2>(gr, x, slots, n, k, R, D, r0, col, dw); break;
    case 1: wgrad_tile<RB, 1>(gr, x, slots, n, k, R, D, r0, col, dw); break;
    default: break;
  }
  col += ((D - col) / L) * L;
  for (int64_t r = r0; r < r0 + RB; ++r)
    for (int64_t j = col; j < D; ++j) {
      float sum = 0.0f;
      for (int64_t q = 0; q < n; ++q) sum += gr[slots[q] * R + r] * x[(slots[q] / k) * D + j];
      dw[r * D + j] = sum;
    }
}

at::Tensor grouped_wgrad(const at::Tensor& g_in, const at::Tensor& x_in, const at::Tensor& offsets,
                         const at::Tensor& slots, int64_t k, int64_t num_experts) {
  const at::Tensor gr = as_f32(g_in), x = as_f32(x_in);
  const int64_t R = gr.size(1), D = x.size(1);
  TORCH_CHECK(gr.size(0) == x.size(0) * k, "g must be (T * K, R)");
  at::Tensor dw = at::zeros({num_experts, R, D}, x.options());
  const Groups g = groups_of(offsets, slots, k);
  constexpr int64_t RB = 4;
  const int64_t nrb = (R + RB - 1) / RB;
  const float* gp = gr.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* out = dw.data_ptr<float>();
  const int64_t grain = grain_for(num_experts * nrb, slots.numel() * R * D);
  at::parallel_for(0, num_experts * nrb, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t e = i / nrb, r0 = (i % nrb) * RB;
      const int64_t b = g.offsets[e], n = g.offsets[e + 1] - b;
      if (n == 0) continue;
      float* dwe = out + e * R * D;
      switch (std::min(RB, R - r0)) {
        case 4: wgrad_rows<4>(gp, xp, g.slots + b, n, k, R, D, r0, dwe); break;
        case 3: wgrad_rows<3>(gp, xp, g.slots + b, n, k, R, D, r0, dwe); break;
        case 2: wgrad_rows<2>(gp, xp, g.slots + b, n, k, R, D, r0, dwe); break;
        default: wgrad_rows<1>(gp, xp, g.slots + b, n, k, R, D, r0, dwe); break;
      }
    }
  });
  return dw;
}

// ---------------------------------------------------------------------------------------------
// fused_expert_ffn: the whole expert FFN in one call (inference), for activations known by code.

enum Act : int64_t { ACT_SILU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3, ACT_RELU = 4 };

// e^v for 16 lanes (Cephes expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp).
inline vf vexp(vf v) {
  const vf hi = splat(88.3762626647949f), lo = splat(-87.3365447505531f);
  v = v > hi ? hi : v;
  v = v < lo ? lo : v;
  const vf fx = v * 1.44269504088896341f + 0.5f;
  vf n = __builtin_convertvector(__builtin_convertvector(fx, vi), vf);
  n = n > fx ? n - 1.0f : n;  // floor
  v = v - n * 0.693359375f + n * 2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * v + 1.3981999507e-3f;
  y = y * v + 8.3334519073e-3f;
  y = y * v + 4.1665795894e-2f;
  y = y * v + 1.6666665459e-1f;
  y = y * v + 5.0000001201e-1f;
  y = y * (v * v) + v + 1.0f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  return y * reinterpret_cast<const vf&>(e);
}

// The activations of enum Act, 16 lanes at a time; within about 1e-6 · max(1, |v|) of torch's.
inline vf vactivate(vf v, int64_t act) {
  const vf zero = vf{};
  switch (act) {
    case ACT_SILU: return v / (1.0f + vexp(-v));
    case ACT_GELU: {  // 0.5 v (1 + erf(v / sqrt 2)), erf by Abramowitz-Stegun 7.1.26 (|error| < 1.5e-7)
      const vf x = v * 0.70710678118654752f;
      const vf ax = x < zero ? -x : x;
      const vf t = 1.0f / (1.0f + 0.3275911f * ax);
      const vf poly = ((((1.061405429f * t - 1.453152027f) * t + 1.421413741f) * t - 0.284496736f) * t +
                       0.254829592f) * t;
      const vf q = poly * vexp(-ax * ax);  // 1 - erf(|x|)
      return 0.5f * v * (x < zero ? q : 2.0f - q);
    }
    case ACT_GELU_TANH: {  // 0.5 v (1 + tanh(u)) = v sigmoid(2u)
      const vf u = 0.7978845608028654f * (v + 0.044715f * v * v * v);
      return v / (1.0f + vexp(-2.0f * u));
    }
    case ACT_RELU: return v > zero ? v : zero;
    default: return v;
  }
}

// a[slot, :] = scale · (act(pre[slot, :S]) ⊙ pre[slot, S:2S] − centre[e]) (gated) or
// scale · (act(pre[slot, :S]) − centre[e]); centre (E, S) may be null (= 0). With the experts'
// representatives as centre, the down projection yields Σ g_e (v_e − m_e): the MoE layer's
// static-embedding term folded into the kernel.
template <typename A>
void activate_slots(const float* pre, const int64_t* slots, int64_t n, const float* scale, const float* centre,
                    const int64_t* idx, int64_t S, int64_t R, bool gated, int64_t act, A* a) {
  // Chunks of slots: their gate values are packed into one buffer and activated 16 lanes at a
  // time whatever S is (small experts waste no lanes), then combined with up, centre and scale.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(16, 4096 / std::max<int64_t>(S, 1)));
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  at::parallel_for(0, n_chunks, std::max<int64_t>(1, MIN_WORK / (16 * S * chunk)), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(static_cast<size_t>((chunk * S + L - 1) / L * L));
    for (int64_t ch = begin; ch < end; ++ch) {
      const int64_t q0 = ch * chunk, m = std::min(chunk, n - q0);
      for (int64_t i = 0; i < m; ++i) std::copy(pre + slots[q0 + i] * R, pre + slots[q0 + i] * R + S, buf.data() + i * S);
      const int64_t used = m * S;
      std::fill(buf.begin() + used, buf.end(), 0.0f);
      for (int64_t j = 0; j < used; j += L) store(buf.data() + j, vactivate(load(buf.data() + j), act));
      for (int64_t i = 0; i < m; ++i) {
        const int64_t slot = slots[q0 + i];
        const float c = scale ? scale[slot] : 1.0f;
        const float* up = pre + slot * R + S;
        const float* ctr = centre ? centre + idx[slot] * S : nullptr;
        const float* v = buf.data() + i * S;
        A* o = a + (q0 + i) * S;
        for (int64_t j = 0; j < S; ++j) {
          float r = gated ? v[j] * up[j] : v[j];
          if (ctr) r -= ctr[j];
          o[j] = static_cast<A>(r * c);
        }
      }
    }
  });
}

at::Tensor fused_expert_ffn(const at::Tensor& x, const at::Tensor& w_in, const std::optional<at::Tensor>& b_in,
                            const at::Tensor& w_out, const at::Tensor& idx, const std::optional<at::Tensor>& scale,
                            int64_t act, bool gated, const std::optional<at::Tensor>& centre,
                            const std::optional<at::Tensor>& out_init) {
  check_weight(w_out, "w_out");
  const int64_t E = w_out.size(0), S = w_out.size(1), D = w_out.size(2);
  const int64_t T = idx.size(0), K = idx.size(1);
  TORCH_CHECK(act >= ACT_SILU && act <= ACT_RELU, "unknown activation code ", act);
  auto [offsets, slots] = build_groups(idx, E);
  at::Tensor pre = grouped_in(x, w_in, b_in, offsets, slots, K);  // (T*K, R) fp32
  const int64_t R = pre.size(1);
  TORCH_CHECK(R == (gated ? 2 * S : S), "w_in has ", R, " rows per expert; expected ", gated ? 2 * S : S);
  // bf16 weights, many tokens: a is rounded to bf16 for the vdpbf16ps down projection
  const bool a_bf16 = T > FEW_TOKENS && bf16_math(x, w_out);
  // a in grouped order (N, S): each expert's rows contiguous for the down projection
  const int64_t n = slots.numel();
  at::Tensor a = at::empty({n, S}, pre.options().dtype(a_bf16 ? at::kBFloat16 : at::kFloat));
  at::Tensor sc;
  const float* scp = nullptr;
  if (scale.has_value() && scale->defined()) {
    sc = as_f32(*scale);
    TORCH_CHECK(sc.numel() == T * K, "scale must be (T, K)");
    scp = sc.data_ptr<float>();
  }
  at::Tensor ctr;
  const float* cp = nullptr;
  if (centre.has_value() && centre->defined()) {
    ctr = as_f32(*centre);
    TORCH_CHECK(ctr.numel() == E * S, "centre must be (E, S) = (", E, ", ", S, ")");
    cp = ctr.data_ptr<float>();
  }
  const at::Tensor idx_c = idx.contiguous();
  const int64_t* sl = slots.data_ptr<int64_t>();
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  const float* pp = pre.data_ptr<float>();
  if (a_bf16) activate_slots(pp, sl, n, scp, cp, ip, S, R, gated, act, a.data_ptr<bf16>());
  else activate_slots(pp, sl, n, scp, cp, ip, S, R, gated, act, a.data_ptr<float>());
  Groups g = groups_of(offsets, slots, K);
  std::vector<int64_t> rows(static_cast<size_t>(n));
  for (int64_t q = 0; q < n; ++q) rows[q] = q;
  g.arows = rows.data();
  at::Tensor init;
  if (out_init.has_value() && out_init->defined()) {
    init = as_f32(*out_init);
    TORCH_CHECK(init.numel() == D, "out_init must be (D,) = (", D, ",)");
  }
  at::Tensor out = grouped_out_impl(a, w_out, g, T, init.defined() ? init.data_ptr<float>() : nullptr);
  return out.to(x.scalar_type());
}

// ---------------------------------------------------------------------------------------------
// routed_expert_ffn: a converted layer's whole inference step for a few tokens (decoding), one call:
//
//   z = (x − x_mean) ⊙ x_scale;  logits = z W_rᵀ + b_r          (T, R) the linear router, fp32 sums
//   idx[t] = [0 .. ns−1, ns + top_k_routed(logits[t])]          shared experts first (fixed k)
//   out = fused_expert_ffn(x, idx, centre, out_init)            as above
//
// Replaces about a dozen small torch ops per layer and token (standardise, linear, top-k, joining
// the shared ids, the dispatch checks). Returns (out (T, D) in x's dtype, idx (T, ns + k) int64,
// logits (T, R) fp32).

template <typename W>
void router_logits(const float* z, const W* wr, const float* br, int64_t T, int64_t R, int64_t D, float* logits) {
  // blocks of 16 router rows split over threads; T is small: one token at a time (rows re-read from cache)
  constexpr int64_t RB = 16;
  const int64_t blocks = (R + RB - 1) / RB;
  at::parallel_for(0, blocks, grain_for(blocks, T * R * D), [&](int64_t begin, int64_t end) {
    float tile[RB];
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * RB, rows = std::min(RB, R - r0);
      for (int64_t t = 0; t < T; ++t) {
        const float* xs[1] = {z + t * D};
        dot_rows<1>(xs, wr + r0 * D, rows, D, tile);
        float* lt = logits + t * R + r0;
        for (int64_t r = 0; r < rows; ++r) lt[r] = tile[r] + (br ? br[r0 + r] : 0.0f);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_expert_ffn(
    const at::Tensor& x, const std::optional<at::Tensor>& x_mean, const std::optional<at::Tensor>& x_scale,
    const at::Tensor& router_w, const std::optional<at::Tensor>& router_b, int64_t num_shared, int64_t k_routed,
    const at::Tensor& w_in, const std::optional<at::Tensor>& b_in, const at::Tensor& w_out, int64_t act, bool gated,
    const std::optional<at::Tensor>& centre, const std::optional<at::Tensor>& out_init) {
  check_weight(w_out, "w_out");
  TORCH_CHECK(x.dim() == 2, "x must be (T, D)");
  const int64_t T = x.size(0), D = x.size(1), E = w_out.size(0);
  TORCH_CHECK(router_w.dim() == 2 && router_w.size(1) == D && router_w.is_contiguous(),
              "router_w must be a contiguous (R, ", D, ") matrix");
  TORCH_CHECK(router_w.scalar_type() == at::kFloat || router_w.scalar_type() == at::kBFloat16,
              "router_w must be float32 or bfloat16");
  const int64_t R = router_w.size(0);
  TORCH_CHECK(num_shared >= 0 && num_shared + R == E, "num_shared (", num_shared, ") + routed experts (", R,
              ") must equal the experts (", E, ")");
  TORCH_CHECK(k_routed >= 1 && k_routed <= R, "k_routed=", k_routed, " must be in 1..", R);
  // z = (x − mean) ⊙ scale, fp32
  at::Tensor z = as_f32(x);
  if (x_mean.has_value() && x_mean->defined()) z = z - as_f32(*x_mean);
  if (x_scale.has_value() && x_scale->defined()) z = z * as_f32(*x_scale);
  z = z.contiguous();
  at::Tensor bias;
  if (router_b.has_value() && router_b->defined()) {
    bias = as_f32(*router_b);
    TORCH_CHECK(bias.numel() == R, "router_b must have ", R, " entries");
  }
  at::Tensor logits_t = at::empty({T, R}, z.options());
  float* logits = logits_t.data_ptr<float>();
  const float* zp = z.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (router_w.scalar_type() == at::kFloat) router_logits(zp, router_w.data_ptr<float>(), bp, T, R, D, logits);
  else router_logits(zp, router_w.data_ptr<bf16>(), bp, T, R, D, logits);
  // top-k per token (unordered, as torch.topk(sorted=False)); shared experts first
  const int64_t K = num_shared + k_routed;
  at::Tensor idx = at::empty({T, K}, x.options().dtype(at::kLong));
  int64_t* ip = idx.data_ptr<int64_t>();
  std::vector<int32_t> order(static_cast<size_t>(R));
  for (int64_t t = 0; t < T; ++t) {
    const float* lt = logits + t * R;
    for (int64_t r = 0; r < R; ++r) order[r] = static_cast<int32_t>(r);
    if (k_routed < R)
      std::nth_element(order.begin(), order.begin() + (k_routed - 1), order.end(),
                       [lt](int32_t a, int32_t b) { return lt[a] > lt[b] || (lt[a] == lt[b] && a < b); });
    int64_t* row = ip + t * K;
    for (int64_t j = 0; j < num_shared; ++j) row[j] = j;
    for (int64_t j = 0; j < k_routed; ++j) row[num_shared + j] = num_shared + order[j];
  }
  at::Tensor out = fused_expert_ffn(x, w_in, b_in, w_out, idx, std::nullopt, act, gated, centre, out_init);
  return {out, idx, logits_t};
}

// Dense-path activations of the MoE layer: pre (T*E, R) from one GEMM over all experts, row q of
// expert q % E; u[q, :] = mask[q] · (act(gate) ⊙ up − centre[q % E]) (T*E, S) fp32. With the 0/1
// selection mask, u W_out over all experts equals the block-sparse kernel's sum.
at::Tensor centred_activation(const at::Tensor& pre_in, const at::Tensor& centre_in, const at::Tensor& mask_in,
                              int64_t act, bool gated) {
  TORCH_CHECK(act >= ACT_SILU && act <= ACT_RELU, "unknown activation code ", act);
  const at::Tensor pre = as_f32(pre_in), centre = as_f32(centre_in), mask = as_f32(mask_in);
  TORCH_CHECK(centre.dim() == 2, "centre must be (E, S)");
  const int64_t E = centre.size(0), S = centre.size(1), R = gated ? 2 * S : S;
  TORCH_CHECK(pre.dim() == 2 && pre.size(1) == R && pre.size(0) % std::max<int64_t>(E, 1) == 0, "pre must be (T * E, ", R, ")");
  const int64_t n = pre.size(0);
  TORCH_CHECK(mask.numel() == n, "mask must have T * E entries");
  std::vector<int64_t> rows(static_cast<size_t>(n)), expert(static_cast<size_t>(n));
  for (int64_t q = 0; q < n; ++q) rows[q] = q, expert[q] = q % E;
  at::Tensor u = at::empty({n, S}, pre.options());
  activate_slots(pre.data_ptr<float>(), rows.data(), n, mask.data_ptr<float>(), centre.data_ptr<float>(), expert.data(),
                 S, R, gated, act, u.data_ptr<float>());
  return u;
}

}  // namespace

#ifndef MOEFY_LIB
#define MOEFY_LIB moefy_cpu  // the torch.ops namespace; each ISA variant is built with its own
#endif

TORCH_LIBRARY(MOEFY_LIB, m) {
  m.def("build_groups(Tensor idx, int num_experts) -> (Tensor, Tensor)");
  m.def("grouped_in(Tensor x, Tensor w, Tensor? b, Tensor offsets, Tensor slots, int k) -> Tensor");
  m.def("grouped_out(Tensor a, Tensor w, Tensor offsets, Tensor slots, int k, int tokens) -> Tensor");
  m.def("grouped_wgrad(Tensor g, Tensor x, Tensor offsets, Tensor slots, int k, int num_experts) -> Tensor");
  m.def(
      "fused_expert_ffn(Tensor x, Tensor w_in, Tensor? b_in, Tensor w_out, Tensor idx, Tensor? scale, int act, "
      "bool gated, Tensor? centre=None, Tensor? out_init=None) -> Tensor");
  m.def("centred_activation(Tensor pre, Tensor centre, Tensor mask, int act, bool gated) -> Tensor");
  m.def(
      "routed_expert_ffn(Tensor x, Tensor? x_mean, Tensor? x_scale, Tensor router_w, Tensor? router_b, "
      "int num_shared, int k_routed, Tensor w_in, Tensor? b_in, Tensor w_out, int act, bool gated, "
      "Tensor? centre=None, Tensor? out_init=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(MOEFY_LIB, CPU, m) {
  m.impl("build_groups", &build_groups);
  m.impl("grouped_in", &grouped_in);
  m.impl("grouped_out", &grouped_out);
  m.impl("grouped_wgrad", &grouped_wgrad);
  m.impl("fused_expert_ffn", &fused_expert_ffn);
  m.impl("centred_activation", &centred_activation);
  m.impl("routed_expert_ffn", &routed_expert_ffn);
}
