// The CPU kernels of the feature-major decode step (cloud_jax/model/decode_step.py), XLA FFI
// handlers built and loaded by cpu_kernels.py:
//
// CloudJaxDecodeAttention: the decode step's attention (layers.py, gqa_attention with a shared
// prefix and keys stored [.., D, S]) for one new token per row, computed in one pass instead of
// XLA's ~20 small operations a layer: scores against the group's prefix keys and the row's own
// keys, the masked softmax over both segments, and the weighted values. Work is split by (prefix
// group, key/value head) over XLA's intra-op thread pool.
//
// Shapes (fp32, row-major): q [B, KV, G, D]; prefix keys [N, KV, D, P], values [N, KV, P, D];
// own keys [B, KV, D, S], values [B, KV, S, D]; masks (int32, nonzero = attend) [B, P], [B, S];
// output [B, KV, G, D]. Rows come in N groups of B / N consecutive rows, each reading its group's
// prefix. A masked score takes the attribute mask_value (layers.py's), so a row with every key
// masked averages every value, as the XLA path does.
//
// Only the keys a row attends to are read: the span of its mask (the group's span for the shared
// prefix); the keys outside it would weigh exp(mask_value - max) = 0 exactly.
//
// CloudJaxDecodeAttentionWrite: the same attention taking the queries and the new key and value
// from the q/k/v product [(KV G + 2 KV) D, B] as the weight product leaves it: the rotary
// embedding (split halves, cos/sin rows [B, D]) of the queries and key, the key and value written
// into the caches (aliased to the call's outputs) at slot `start`, and the output [KV G D, B].
//
// CloudJaxDecodeMatmul: y [O, N] = w [O, I] . x [I, N] in fp32 for a few columns N (the decode's
// rows): each output row's N values are held in vector registers, a block of output rows at a
// time, and each weight is read once, as one broadcast multiply-add, streaming the weight rows
// from memory with a software prefetch ahead. Blocks of output rows are split over XLA's
// intra-op thread pool. Around the product (attributes): x's RMS norm or the gated unit
// silu(x[:I]) * x[I:] first, a residual added to y, y written [N, O].

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kW = 16;     // floats a vector
constexpr int kRegs = 32;  // vector registers
#else
constexpr int kW = 8;
constexpr int kRegs = 16;
#endif
typedef float Vec __attribute__((vector_size(kW * sizeof(float))));

inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, sizeof(Vec)); return v; }
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

// Key blocks ahead of the one being scored that each key row prefetches: the rows are strided
// [D, len], a pattern the hardware prefetchers follow poorly.
constexpr int kKeyBlocksAhead = 2;

// out[a][j] = sum_d q[a][d] * keys_t[d][j] for QB queries over KB * kW keys from j0; keys
// [D, ld_k]. QB * KB accumulators: enough independent chains to keep both FMA units busy.
template <int QB, int KB>
inline void ScoreBlock(const float* q, int64_t d_size, const float* keys_t, int64_t ld_k,
                       int64_t j0, float* out, int64_t ld_out) {
  Vec acc[QB][KB];
  for (int a = 0; a < QB; ++a)
    for (int c = 0; c < KB; ++c) acc[a][c] = Vec{};
  for (int64_t d = 0; d < d_size; ++d) {
    const float* row = keys_t + d * ld_k + j0;
    Vec k[KB];
    for (int c = 0; c < KB; ++c) __builtin_prefetch(row + (kKeyBlocksAhead * KB + c) * kW);
    for (int c = 0; c < KB; ++c) k[c] = Load(row + c * kW);
    for (int a = 0; a < QB; ++a) {
      const float qd = q[a * d_size + d];
      for (int c = 0; c < KB; ++c) acc[a][c] += qd * k[c];
    }
  }
  for (int a = 0; a < QB; ++a)
    for (int c = 0; c < KB; ++c) Store(out + a * ld_out + j0 + c * kW, acc[a][c]);
}

// Scores of QB queries against keys [D, ld_k]'s first len columns. The keys' rows and out's hold
// `room` >= len columns: a last partial block of keys is scored as a whole vector when it fits
// (the scores past len are never read), else one key at a time.
template <int QB>
void ScoresQB(const float* q, int64_t d_size, const float* keys_t, int64_t ld_k, int64_t len,
              int64_t room, float* out, int64_t ld_out) {
  int64_t j0 = 0;
  for (; j0 + 2 * kW <= len; j0 += 2 * kW)
    ScoreBlock<QB, 2>(q, d_size, keys_t, ld_k, j0, out, ld_out);
  for (; j0 < len && j0 + kW <= room; j0 += kW)
    ScoreBlock<QB, 1>(q, d_size, keys_t, ld_k, j0, out, ld_out);
  for (int a = 0; a < QB; ++a)
    for (int64_t j = j0; j < len; ++j) {
      float total = 0.f;
      for (int64_t d = 0; d < d_size; ++d) total += q[a * d_size + d] * keys_t[d * ld_k + j];
      out[a * ld_out + j] = total;
    }
}

// Queries a score block, with 2 key vectors a block: 4 x 2 accumulators with 32 vector registers
// (6 measured no faster with AVX-512), 6 x 2 with 16 (faster than 4 x 2 with AVX2).
constexpr int kQB = kRegs == 32 ? 4 : 6;

// Keys a panel (a multiple of both widths' 2 kW): with more queries than one block holds (the
// prefix's), the scores take the keys a panel at a time, every query block against one panel
// before the next. A panel's lines (D rows of 128 bytes, 8 KiB at D = 64) then come from memory
// once, for the first query block, and the prefetch two key blocks ahead has the other blocks'
// work to cover its latency; over the whole span one query block at a time, the keys came from
// memory with one block's work between two key blocks (a quarter of it at 24 queries). On a
// Zen 3 host (AVX2), the bench's attention alone: 32 keys a panel 9% faster than none, 16 as
// much, 64 and 128 3% (tools/attention_ab.py; docs/BENCHMARKS.md).
constexpr int64_t kKeyPanel = 32;

void ScoresPanel(const float* q, int64_t nq, int64_t d_size, const float* keys_t, int64_t ld_k,
                 int64_t len, int64_t room, float* out, int64_t ld_out) {
  int64_t a = 0;
  for (; a + kQB <= nq; a += kQB)
    ScoresQB<kQB>(q + a * d_size, d_size, keys_t, ld_k, len, room, out + a * ld_out, ld_out);
  const float* qa = q + a * d_size;
  float* oa = out + a * ld_out;
  switch (nq - a) {
    case 5: ScoresQB<5>(qa, d_size, keys_t, ld_k, len, room, oa, ld_out); break;
    case 4: ScoresQB<4>(qa, d_size, keys_t, ld_k, len, room, oa, ld_out); break;
    case 3: ScoresQB<3>(qa, d_size, keys_t, ld_k, len, room, oa, ld_out); break;
    case 2: ScoresQB<2>(qa, d_size, keys_t, ld_k, len, room, oa, ld_out); break;
    case 1: ScoresQB<1>(qa, d_size, keys_t, ld_k, len, room, oa, ld_out); break;
    default: break;  // nq - a < kQB
  }
}

void Scores(const float* q, int64_t nq, int64_t d_size, const float* keys_t, int64_t ld_k,
            int64_t len, int64_t room, float* out, int64_t ld_out) {
  int64_t j0 = 0;
  if (nq > kQB)
    for (; j0 + kKeyPanel < len; j0 += kKeyPanel)
      ScoresPanel(q, nq, d_size, keys_t + j0, ld_k, kKeyPanel, kKeyPanel, out + j0, ld_out);
  ScoresPanel(q, nq, d_size, keys_t + j0, ld_k, len - j0, room - j0, out + j0, ld_out);
}

constexpr int kValueRowsAhead = 8;  // value rows ahead that the weighted sum prefetches

// out[a][:DV kW] += sum_j p[a][j] * values[j][:DV kW] for QB queries: DV vectors of the value
// rows (stride ld_v floats) and of the output rows (stride ld_out).
template <int QB, int DV>
inline void WeightedBlock(const float* p, int64_t ld_p, const float* values, int64_t ld_v,
                          int64_t len, float* out, int64_t ld_out) {
  Vec acc[QB][DV];
  for (int a = 0; a < QB; ++a)
    for (int e = 0; e < DV; ++e) acc[a][e] = Vec{};
  for (int64_t j = 0; j < len; ++j) {
    for (int e = 0; e < DV * kW; e += 16)  // the value row kValueRowsAhead on, a line at a time
      __builtin_prefetch(values + (j + kValueRowsAhead) * ld_v + e);
    Vec row[DV];
    for (int e = 0; e < DV; ++e) row[e] = Load(values + j * ld_v + e * kW);
    for (int a = 0; a < QB; ++a) {
      const float pj = p[a * ld_p + j];
      for (int e = 0; e < DV; ++e) acc[a][e] += pj * row[e];
    }
  }
  for (int a = 0; a < QB; ++a)
    for (int e = 0; e < DV; ++e)
      Store(out + a * ld_out + e * kW, Load(out + a * ld_out + e * kW) + acc[a][e]);
}

inline void WeightedGeneric(const float* p, int64_t ld_p, const float* values, int64_t len,
                            int64_t d_size, int64_t nq, float* out) {
  for (int64_t a = 0; a < nq; ++a)
    for (int64_t j = 0; j < len; ++j) {
      const float pj = p[a * ld_p + j];
      const float* vrow = values + j * d_size;
      float* o = out + a * d_size;
      for (int64_t e = 0; e < d_size; ++e) o[e] += pj * vrow[e];
    }
}

// The value rows (D = DV kW floats) in slices of 4 vectors, each slice taken by blocks of as many
// queries as the registers hold beside it: 4 x 4 accumulators with 32 vector registers, 3 x 4
// with 16. Each slice of a value row loaded serves the block's queries.
template <int DV>
void WeightedD(const float* p, int64_t ld_p, const float* values, int64_t len, int64_t nq,
               float* out) {
  constexpr int sv = DV < 4 ? DV : 4;  // vectors a slice
  constexpr int qb = kRegs == 32 ? 4 : 3;
  constexpr int64_t d = DV * kW;
  static_assert(DV % sv == 0, "the value rows split into whole slices");
  for (int e0 = 0; e0 < DV; e0 += sv) {
    const float* v = values + e0 * kW;
    float* o = out + e0 * kW;
    int64_t a = 0;
    for (; a + qb <= nq; a += qb) WeightedBlock<qb, sv>(p + a * ld_p, ld_p, v, d, len, o + a * d, d);
    switch (nq - a) {
      case 3: WeightedBlock<3, sv>(p + a * ld_p, ld_p, v, d, len, o + a * d, d); break;
      case 2: WeightedBlock<2, sv>(p + a * ld_p, ld_p, v, d, len, o + a * d, d); break;
      case 1: WeightedBlock<1, sv>(p + a * ld_p, ld_p, v, d, len, o + a * d, d); break;
      default: break;  // nq - a < qb <= 4
    }
  }
}

void Weighted(const float* p, int64_t ld_p, const float* values, int64_t len, int64_t d_size,
              int64_t nq, float* out) {
  if (d_size == 64) return WeightedD<64 / kW>(p, ld_p, values, len, nq, out);
  if (d_size == 128) return WeightedD<128 / kW>(p, ld_p, values, len, nq, out);
  WeightedGeneric(p, ld_p, values, len, d_size, nq, out);
}


typedef int32_t IVec __attribute__((vector_size(kW * sizeof(int32_t))));
inline IVec LoadI(const int32_t* p) { IVec v; std::memcpy(&v, p, sizeof(IVec)); return v; }

// x[j] = mask[j] ? x[j] : masked; returns max_j x[j] (masked when len is 0).
inline float MaskAndMax(float* x, const int32_t* mask, int64_t len, float masked) {
  Vec top = Vec{} + masked;
  int64_t j = 0;
  for (; j + kW <= len; j += kW) {
    Vec v = LoadI(mask + j) != 0 ? Load(x + j) : Vec{} + masked;
    Store(x + j, v);
    top = v > top ? v : top;
  }
  float best = masked;
  for (int e = 0; e < kW; ++e) best = std::max(best, top[e]);
  for (; j < len; ++j) {
    x[j] = mask[j] ? x[j] : masked;
    best = std::max(best, x[j]);
  }
  return best;
}

// exp(v) for v <= 0 to a few float ulp (range reduction by ln 2 and a degree-6 polynomial);
// 0 below -87, where float exp leaves the normal range.
inline Vec ExpNonPositive(Vec v) {
  const Vec clamped = v < -87.f ? Vec{} - 87.f : v;
  // k = round(v / ln2) (v <= 0: truncating v / ln2 - 0.5 rounds to nearest).
  const Vec k = __builtin_convertvector(
      __builtin_convertvector(clamped * 1.44269504088896341f - 0.5f, IVec), Vec);
  const Vec r = clamped - k * 0.693359375f + k * 2.12194440e-4f;
  Vec p = Vec{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  IVec bits = (__builtin_convertvector(k, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(Vec));
  const Vec out = p * scale;
  return v < -87.f ? Vec{} : out;
}

// x[j] = exp(x[j] - top); returns the sum.
inline float ExpAndSum(float* x, int64_t len, float top) {
  Vec total = Vec{};
  int64_t j = 0;
  for (; j + kW <= len; j += kW) {
    const Vec e = ExpNonPositive(Load(x + j) - top);
    Store(x + j, e);
    total += e;
  }
  float sum = 0.f;
  for (int e = 0; e < kW; ++e) sum += total[e];
  for (; j < len; ++j) {
    x[j] = std::exp(x[j] - top);
    sum += x[j];
  }
  return sum;
}

struct Problem {
  const float* q;       // [B, KV, G, D]
  const float* pk;      // [N, KV, D, P]
  const float* pv;      // [N, KV, P, D]
  const float* k;       // [B, KV, D, S]
  const float* v;       // [B, KV, S, D]
  const int32_t* pmask; // [B, P]
  const int32_t* mask;  // [B, S]
  float* out;           // [B, KV, G, D]
  int64_t b, kv, g, d, n, p, s;
  float scale, mask_value;
  // CloudJaxDecodeAttentionWrite: q, the new keys and values come from the q/k/v product
  // [(KV G + 2 KV) D, B] before the rotary embedding; the keys and values are written into the
  // caches (k, v: the call's outputs) at slot `start`; the output is [KV G D, B].
  const float* qkv = nullptr;
  const float* cos = nullptr;  // [B, D]
  const float* sin = nullptr;  // [B, D]
  float* k_out = nullptr;
  float* v_out = nullptr;
  int64_t start = 0;
};

// x[e * stride] (e < d) with the rotary embedding of the split-halves layout (layers.apply_rope):
// x * cos + rotate_half(x) * sin.
inline void Rope(const float* x, int64_t stride, int64_t d, const float* cos, const float* sin,
                 float* out) {
  const int64_t half = d / 2;
  for (int64_t e = 0; e < d; ++e) {
    const float rotated = e < half ? -x[(e + half) * stride] : x[(e - half) * stride];
    out[e] = x[e * stride] * cos[e] + rotated * sin[e];
  }
}

// [lo, hi) of the keys a row must score: the span of its attended keys; the keys outside it
// would take exp(mask_value - max) = 0 exactly, so they are not read. A row that attends to no
// key at all keeps every key (the masked scores are then equal and it averages every value).
struct Span {
  int64_t lo, hi;
  int64_t size() const { return std::max<int64_t>(0, hi - lo); }
};

inline Span Attended(const int32_t* mask, int64_t len) {
  int64_t lo = 0, hi = len;
  while (lo < len && mask[lo] == 0) ++lo;
  while (hi > lo && mask[hi - 1] == 0) --hi;
  return {lo, hi};
}

void RunTask(const Problem& pr, int64_t task) {
  const int64_t n = task / pr.kv, kh = task % pr.kv;
  const int64_t r = pr.b / pr.n, nq = r * pr.g, width = pr.p + pr.s, d = pr.d;
  // The group's prefix span (the union of its rows' spans) and each row's own span.
  thread_local std::vector<Span> own;
  own.resize(r);
  Span prefix{pr.p, 0};
  bool all_keys = false;
  for (int64_t ri = 0; ri < r; ++ri) {
    const int64_t row = n * r + ri;
    const Span ps = Attended(pr.pmask + row * pr.p, pr.p);
    own[ri] = Attended(pr.mask + row * pr.s, pr.s);
    if (ps.lo >= ps.hi && own[ri].lo >= own[ri].hi) {  // no key attended: every key counts
      all_keys = true;
      own[ri] = {0, pr.s};
    }
    if (ps.lo < ps.hi) prefix = {std::min(prefix.lo, ps.lo), std::max(prefix.hi, ps.hi)};
  }
  if (all_keys) prefix = {0, pr.p};
  const int64_t plen = prefix.size();

  thread_local std::vector<float> scratch;
  scratch.resize(nq * d + nq * width);
  float* q = scratch.data();
  float* sc = q + nq * d;
  for (int64_t ri = 0; ri < r; ++ri) {
    const int64_t row = n * r + ri;
    if (pr.qkv == nullptr) {
      const float* src = pr.q + ((row * pr.kv + kh) * pr.g) * d;
      for (int64_t e = 0; e < pr.g * d; ++e) q[ri * pr.g * d + e] = src[e] * pr.scale;
      continue;
    }
    // The q/k/v product's column `row`: queries and the new key with the rotary embedding, then
    // the key and value written into this row's cache (read by this task only).
    const float* cos = pr.cos + row * d;
    const float* sin = pr.sin + row * d;
    for (int64_t gi = 0; gi < pr.g; ++gi) {
      float* qa = q + (ri * pr.g + gi) * d;
      Rope(pr.qkv + (kh * pr.g + gi) * d * pr.b + row, pr.b, d, cos, sin, qa);
      for (int64_t e = 0; e < d; ++e) qa[e] *= pr.scale;
    }
    const int64_t heads = pr.kv * pr.g;
    float key[512];
    Rope(pr.qkv + (heads + kh) * d * pr.b + row, pr.b, d, cos, sin, key);
    float* kc = pr.k_out + (row * pr.kv + kh) * d * pr.s + pr.start;
    for (int64_t e = 0; e < d; ++e) kc[e * pr.s] = key[e];
    const float* value = pr.qkv + (heads + pr.kv + kh) * d * pr.b + row;
    float* vc = pr.v_out + ((row * pr.kv + kh) * pr.s + pr.start) * d;
    for (int64_t e = 0; e < d; ++e) vc[e] = value[e * pr.b];
  }
  // Prefix scores: every query of the group against the group's keys in its span.
  const float* pk = pr.pk + (n * pr.kv + kh) * d * pr.p;
  Scores(q, nq, d, pk + prefix.lo, pr.p, plen, pr.p - prefix.lo, sc + prefix.lo, width);
  // Own scores: each row's queries against its own keys in its span.
  for (int64_t ri = 0; ri < r; ++ri) {
    const int64_t row = n * r + ri;
    const float* k = pr.k + (row * pr.kv + kh) * d * pr.s;
    Scores(q + ri * pr.g * d, pr.g, d, k + own[ri].lo, pr.s, own[ri].size(), pr.s - own[ri].lo,
           sc + ri * pr.g * width + pr.p + own[ri].lo, width);
  }
  // Masked softmax numerators and denominators over the two spans.
  thread_local std::vector<float> denom, acc;
  denom.assign(nq, 0.f);
  for (int64_t ri = 0; ri < r; ++ri) {
    const int64_t row = n * r + ri;
    const int32_t* pm = pr.pmask + row * pr.p + prefix.lo;
    const int32_t* m = pr.mask + row * pr.s + own[ri].lo;
    for (int64_t gi = 0; gi < pr.g; ++gi) {
      float* xp = sc + (ri * pr.g + gi) * width + prefix.lo;
      float* xo = sc + (ri * pr.g + gi) * width + pr.p + own[ri].lo;
      const float top = std::max(MaskAndMax(xp, pm, plen, pr.mask_value),
                                 MaskAndMax(xo, m, own[ri].size(), pr.mask_value));
      denom[ri * pr.g + gi] = ExpAndSum(xp, plen, top) + ExpAndSum(xo, own[ri].size(), top);
    }
  }
  // Weighted values into a local buffer, then normalised into the output.
  acc.assign(nq * d, 0.f);
  const float* pv = pr.pv + (n * pr.kv + kh) * pr.p * d;
  Weighted(sc + prefix.lo, width, pv + prefix.lo * d, plen, d, nq, acc.data());
  for (int64_t ri = 0; ri < r; ++ri) {
    const int64_t row = n * r + ri;
    const float* v = pr.v + (row * pr.kv + kh) * pr.s * d;
    Weighted(sc + ri * pr.g * width + pr.p + own[ri].lo, width, v + own[ri].lo * d,
             own[ri].size(), d, pr.g, acc.data() + ri * pr.g * d);
  }
  for (int64_t ri = 0; ri < r; ++ri) {
    const int64_t row = n * r + ri;
    for (int64_t gi = 0; gi < pr.g; ++gi) {
      const float inv = 1.f / denom[ri * pr.g + gi];
      const float* src = acc.data() + (ri * pr.g + gi) * d;
      if (pr.qkv == nullptr) {
        float* dst = pr.out + ((row * pr.kv + kh) * pr.g + gi) * d;
        for (int64_t e = 0; e < d; ++e) dst[e] = src[e] * inv;
      } else {  // [KV G D, B]: this row's column
        float* dst = pr.out + (kh * pr.g + gi) * d * pr.b + row;
        for (int64_t e = 0; e < d; ++e) dst[e * pr.b] = src[e] * inv;
      }
    }
  }
}

// Runs task(0) .. task(count - 1) over XLA's intra-op pool. The calling thread works too, and
// every task is claimed from one counter, so the call finishes even when no pool thread is free;
// a helper that starts late finds no work left (the shared state outlives it).
template <typename Task>
void ParallelFor(ffi::ThreadPool& pool, int64_t count, Task task) {
  struct State {
    State(Task t, int64_t n) : task(std::move(t)), count(n) {}
    Task task;
    int64_t count;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>(std::move(task), count);
  auto drain = [](State& st) {
    for (int64_t t; (t = st.next.fetch_add(1)) < st.count;) {
      st.task(t);
      st.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([state, drain] { drain(*state); });
  drain(*state);
  while (state->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                               ffi::Buffer<ffi::F32> pk, ffi::Buffer<ffi::F32> pv,
                               ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v,
                               ffi::Buffer<ffi::S32> pmask, ffi::Buffer<ffi::S32> mask,
                               ffi::ResultBuffer<ffi::F32> out, float scale,
                               float mask_value) {
  auto qd = q.dimensions(), pkd = pk.dimensions(), pvd = pv.dimensions(), kd = k.dimensions(),
       vd = v.dimensions(), pmd = pmask.dimensions(), md = mask.dimensions();
  if (qd.size() != 4 || pkd.size() != 4 || pvd.size() != 4 || kd.size() != 4 || vd.size() != 4 ||
      pmd.size() != 2 || md.size() != 2)
    return ffi::Error::InvalidArgument(
        "decode attention: expected rank-4 q, keys and values and rank-2 masks");
  Problem pr;
  pr.b = qd[0]; pr.kv = qd[1]; pr.g = qd[2]; pr.d = qd[3];
  pr.n = pkd[0]; pr.p = pkd[3]; pr.s = kd[3];
  const bool consistent =
      pkd[1] == pr.kv && pkd[2] == pr.d && pvd[0] == pr.n && pvd[1] == pr.kv &&
      pvd[2] == pr.p && pvd[3] == pr.d && kd[0] == pr.b && kd[1] == pr.kv && kd[2] == pr.d &&
      vd[0] == pr.b && vd[1] == pr.kv && vd[2] == pr.s && vd[3] == pr.d && pmd[0] == pr.b &&
      pmd[1] == pr.p && md[0] == pr.b && md[1] == pr.s;
  if (!consistent)
    return ffi::Error::InvalidArgument("decode attention: inconsistent shapes");
  if (pr.n <= 0 || pr.b % pr.n != 0)
    return ffi::Error::InvalidArgument(
        "decode attention: the rows do not split into the prefix's groups");
  pr.q = q.typed_data(); pr.pk = pk.typed_data(); pr.pv = pv.typed_data();
  pr.k = k.typed_data(); pr.v = v.typed_data();
  pr.pmask = pmask.typed_data(); pr.mask = mask.typed_data();
  pr.out = out->typed_data(); pr.scale = scale;
  pr.mask_value = mask_value;
  ParallelFor(pool, pr.n * pr.kv, [pr](int64_t task) { RunTask(pr, task); });
  return ffi::Error::Success();
}

ffi::Error DecodeAttentionWriteImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                                    ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                                    ffi::Buffer<ffi::S32> start, ffi::Buffer<ffi::F32> pk,
                                    ffi::Buffer<ffi::F32> pv, ffi::Buffer<ffi::F32> k,
                                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> pmask,
                                    ffi::Buffer<ffi::S32> mask, ffi::ResultBuffer<ffi::F32> out,
                                    ffi::ResultBuffer<ffi::F32> k_out,
                                    ffi::ResultBuffer<ffi::F32> v_out, float scale,
                                    float mask_value) {
  auto qd = qkv.dimensions(), cd = cos.dimensions(), sd = sin.dimensions(),
       pkd = pk.dimensions(), pvd = pv.dimensions(), kd = k.dimensions(), vd = v.dimensions(),
       pmd = pmask.dimensions(), md = mask.dimensions(), od = out->dimensions();
  if (qd.size() != 2 || cd.size() != 2 || sd.size() != 2 || pkd.size() != 4 ||
      pvd.size() != 4 || kd.size() != 4 || vd.size() != 4 || pmd.size() != 2 ||
      md.size() != 2 || od.size() != 2 || start.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "decode attention write: expected a 2-D q/k/v product, rope rows and output, rank-4 "
        "keys and values, rank-2 masks and one start slot");
  Problem pr;
  pr.b = qd[1]; pr.kv = kd[1]; pr.d = kd[2]; pr.s = kd[3];
  pr.n = pkd[0]; pr.p = pkd[3];
  const int64_t heads = pr.d > 0 && pr.kv > 0 ? od[0] / pr.d : 0;
  pr.g = pr.kv > 0 ? heads / pr.kv : 0;
  const bool consistent =
      pr.d <= 512 && pr.d % 2 == 0 && od[1] == pr.b && od[0] == pr.kv * pr.g * pr.d &&
      qd[0] == (pr.kv * pr.g + 2 * pr.kv) * pr.d && cd[0] == pr.b && cd[1] == pr.d &&
      sd[0] == pr.b && sd[1] == pr.d && pkd[1] == pr.kv && pkd[2] == pr.d && pvd[0] == pr.n &&
      pvd[1] == pr.kv && pvd[2] == pr.p && pvd[3] == pr.d && kd[0] == pr.b && vd[0] == pr.b &&
      vd[1] == pr.kv && vd[2] == pr.s && vd[3] == pr.d && pmd[0] == pr.b && pmd[1] == pr.p &&
      md[0] == pr.b && md[1] == pr.s && pr.s > 0;
  if (!consistent)
    return ffi::Error::InvalidArgument("decode attention write: inconsistent shapes");
  if (pr.n <= 0 || pr.b % pr.n != 0)
    return ffi::Error::InvalidArgument(
        "decode attention write: the rows do not split into the prefix's groups");
  // The caches are aliased to the outputs; were they not, the outputs start as copies.
  if (k_out->typed_data() != k.typed_data())
    std::memcpy(k_out->typed_data(), k.typed_data(), k.size_bytes());
  if (v_out->typed_data() != v.typed_data())
    std::memcpy(v_out->typed_data(), v.typed_data(), v.size_bytes());
  pr.qkv = qkv.typed_data(); pr.cos = cos.typed_data(); pr.sin = sin.typed_data();
  // As dynamic_update_slice: a start past the end writes the last slot.
  pr.start = std::min<int64_t>(std::max<int64_t>(start.typed_data()[0], 0), pr.s - 1);
  pr.pk = pk.typed_data(); pr.pv = pv.typed_data();
  pr.k_out = k_out->typed_data(); pr.v_out = v_out->typed_data();
  pr.k = pr.k_out; pr.v = pr.v_out;
  pr.pmask = pmask.typed_data(); pr.mask = mask.typed_data();
  pr.out = out->typed_data(); pr.scale = scale;
  pr.mask_value = mask_value;
  ParallelFor(pool, pr.n * pr.kv, [pr](int64_t task) { RunTask(pr, task); });
  return ffi::Error::Success();
}

// ---- CloudJaxDecodeMatmul ----

struct Matmul {
  const float* w;  // [O, I]
  const float* x;  // [I, NP]: the product's input, its columns padded to a multiple of kW
  const float* r;  // the residual added to the output (its layout), or null
  float* y;        // [O, N], or [N, O] when transposed
  int64_t o, i, n, np, chunk;
  bool transposed;
};

constexpr int64_t kPrefetch = 64;  // floats ahead in each weight row (4 cache lines)

// y[o0 + r][c0 + c * kW + e] for R rows and NV vectors of columns.
template <int R, int NV>
inline void MatmulBlock(const Matmul& m, int64_t o0, int64_t c0) {
  Vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) acc[r][c] = Vec{};
  const float* w = m.w + o0 * m.i;
  const float* x = m.x + c0;
  const int64_t ni = m.i, np = m.np;
#pragma GCC unroll 4
  for (int64_t i = 0; i < ni; ++i) {
    Vec xv[NV];
    for (int c = 0; c < NV; ++c) xv[c] = Load(x + i * np + c * kW);
    for (int r = 0; r < R; ++r) {
      // One prefetch a cache line of each weight row; past the row's end it is a harmless hint.
      if ((i & 15) == 0) __builtin_prefetch(w + r * ni + i + kPrefetch);
      const float s = w[r * ni + i];
      for (int c = 0; c < NV; ++c) acc[r][c] += s * xv[c];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < NV; ++c) {
      const int64_t col = c0 + c * kW, left = std::min<int64_t>(kW, m.n - col);
      if (left <= 0) continue;
      if (m.transposed) {  // y[n][o]: one scalar a column
        for (int64_t e = 0; e < left; ++e) {
          const int64_t at = (col + e) * m.o + o0 + r;
          m.y[at] = (m.r ? m.r[at] : 0.f) + acc[r][c][e];
        }
        continue;
      }
      const int64_t at = (o0 + r) * m.n + col;
      if (left == kW) {
        Store(m.y + at, m.r ? Load(m.r + at) + acc[r][c] : acc[r][c]);
      } else {
        float part[kW];
        Store(part, acc[r][c]);
        for (int64_t e = 0; e < left; ++e) m.y[at + e] = (m.r ? m.r[at + e] : 0.f) + part[e];
      }
    }
  }
}

// Rows a block: as many accumulators as the registers hold beside the inputs (12 x 1 or 2
// vectors with AVX-512; 12 x 1 or 6 x 2 with 16 registers). Measured on a 2-core AVX-512 host,
// 12 rows beat 8, 10, 14, 16 and 24 (docs/BENCHMARKS.md).
template <int NV>
constexpr int MatmulRows() { return NV == 1 ? 12 : (kRegs == 32 ? 12 : 6); }

template <int NV>
void MatmulRowRange(const Matmul& m, int64_t o0, int64_t o1, int64_t c0) {
  constexpr int R = MatmulRows<NV>();
  int64_t o = o0;
  for (; o + R <= o1; o += R) MatmulBlock<R, NV>(m, o, c0);
  for (; o + 4 <= o1; o += 4) MatmulBlock<4, NV>(m, o, c0);
  for (; o < o1; ++o) MatmulBlock<1, NV>(m, o, c0);
}

void MatmulTask(const Matmul& m, int64_t task) {
  const int64_t o0 = task * m.chunk, o1 = std::min(m.o, o0 + m.chunk);
  int64_t c0 = 0;
  for (; c0 + 2 * kW <= m.np; c0 += 2 * kW) MatmulRowRange<2>(m, o0, o1, c0);
  if (c0 < m.np) MatmulRowRange<1>(m, o0, o1, c0);
}

// v * sigmoid(v), the SiLU, over a vector (ExpNonPositive of -|v|: no overflow).
inline Vec Silu(Vec v) {
  const Vec neg = v < 0.f ? v : Vec{} - v;  // -|v|
  const Vec e = ExpNonPositive(neg);
  const Vec sig = v < 0.f ? e / (1.f + e) : 1.f / (1.f + e);
  return v * sig;
}

// The product's input, [I, NP] with its columns padded by zeros, from x [IX, N]:
//   prologue 0: x (IX = I);
//   prologue 1: the RMS norm over the features, x * rsqrt(mean_i x^2 + eps) * norm[i];
//   prologue 2: the gated unit silu(x[:I]) * x[I:] (IX = 2I).
void Prologue(const float* x, int64_t ix, int64_t n, int64_t np, int prologue,
              const float* norm, float eps, float* out) {
  const int64_t ni = prologue == 2 ? ix / 2 : ix;  // the product's inputs
  for (int64_t i = 0; i < ni; ++i) {  // the padded copy first: whole vectors below
    std::memcpy(out + i * np, x + i * n, n * sizeof(float));
    std::fill(out + i * np + n, out + (i + 1) * np, 0.f);
  }
  if (prologue == 1) {
    std::vector<float> inv(np, 0.f);
    for (int64_t c = 0; c < np; c += kW) {
      Vec total = Vec{};
      for (int64_t i = 0; i < ni; ++i) {
        const Vec v = Load(out + i * np + c);
        total += v * v;
      }
      Store(inv.data() + c, total);
    }
    for (int64_t c = 0; c < np; ++c)
      inv[c] = 1.f / std::sqrt(inv[c] / static_cast<float>(ni) + eps);
    for (int64_t i = 0; i < ni; ++i)
      for (int64_t c = 0; c < np; c += kW)
        Store(out + i * np + c, Load(out + i * np + c) * Load(inv.data() + c) * norm[i]);
  } else if (prologue == 2) {
    std::vector<float> up(np, 0.f);
    for (int64_t i = 0; i < ni; ++i) {
      std::memcpy(up.data(), x + (ni + i) * n, n * sizeof(float));
      for (int64_t c = 0; c < np; c += kW)
        Store(out + i * np + c, Silu(Load(out + i * np + c)) * Load(up.data() + c));
    }
  }
}

ffi::Error DecodeMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> norm,
                            ffi::Buffer<ffi::F32> residual, ffi::ResultBuffer<ffi::F32> y,
                            int32_t prologue, float eps, int32_t transposed) {
  auto wd = w.dimensions(), xd = x.dimensions(), yd = y->dimensions();
  if (wd.size() != 2 || xd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("decode matmul: expected w [O, I], x [I, N], y 2-D");
  if (prologue < 0 || prologue > 2)
    return ffi::Error::InvalidArgument("decode matmul: prologue must be 0, 1 or 2");
  Matmul m;
  m.o = wd[0];
  m.i = wd[1];
  m.n = xd[1];
  m.transposed = transposed != 0;
  const int64_t ix = prologue == 2 ? 2 * m.i : m.i;
  const int64_t yo = m.transposed ? yd[1] : yd[0], yn = m.transposed ? yd[0] : yd[1];
  if (xd[0] != ix || yo != m.o || yn != m.n)
    return ffi::Error::InvalidArgument(
        "decode matmul: expected x [I, N] (the gated unit: [2 I, N]) and y [O, N] ([N, O] "
        "transposed) for w [O, I]");
  if (prologue == 1 && norm.element_count() != static_cast<size_t>(m.i))
    return ffi::Error::InvalidArgument("decode matmul: the norm's scale must have I entries");
  const bool has_residual = residual.element_count() != 0;
  if (has_residual && residual.element_count() != static_cast<size_t>(m.o * m.n))
    return ffi::Error::InvalidArgument("decode matmul: the residual must have the output's size");
  m.w = w.typed_data();
  m.y = y->typed_data();
  m.r = has_residual ? residual.typed_data() : nullptr;
  m.np = (m.n + kW - 1) / kW * kW;
  if (m.o == 0 || m.n == 0) return ffi::Error::Success();
  std::vector<float> input;  // outlives every task: ParallelFor returns after all of them
  if (m.np != m.n || prologue != 0) {
    input.resize(m.i * m.np);
    Prologue(x.typed_data(), ix, m.n, m.np, prologue, norm.typed_data(), eps, input.data());
    m.x = input.data();
  } else {
    m.x = x.typed_data();
  }
  // About 8 tasks a thread, a multiple of 16 rows each.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t chunk = (m.o + 8 * threads - 1) / (8 * threads);
  m.chunk = std::max<int64_t>(16, (chunk + 15) / 16 * 16);
  ParallelFor(pool, (m.o + m.chunk - 1) / m.chunk, [m](int64_t task) { MatmulTask(m, task); });
  return ffi::Error::Success();
}

}  // namespace

// The floats a vector holds in this build (16 with AVX-512, else 8): what the library was
// compiled for, which `-march` decides (cpu_kernels.py, CLOUD_JAX_KERNEL_ARCH).
extern "C" int CloudJaxKernelVectorFloats() { return kW; }

// The x86 extensions this build's code may use (the compiler's target): 1 AVX2, 2 FMA, 4 AVX-512F.
// A library built for a -march this CPU lacks would stop the process with an illegal
// instruction; cpu_kernels.py compares these with the CPU's flags before registering it.
extern "C" int CloudJaxKernelExtensions() {
  int bits = 0;
#if defined(__AVX2__)
  bits |= 1;
#endif
#if defined(__FMA__)
  bits |= 2;
#endif
#if defined(__AVX512F__)
  bits |= 4;
#endif
  return bits;
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CloudJaxDecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<float>("mask_value"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CloudJaxDecodeAttentionWrite, DecodeAttentionWriteImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // qkv
                                  .Arg<ffi::Buffer<ffi::F32>>()  // cos
                                  .Arg<ffi::Buffer<ffi::F32>>()  // sin
                                  .Arg<ffi::Buffer<ffi::S32>>()  // start
                                  .Arg<ffi::Buffer<ffi::F32>>()  // prefix keys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // prefix values
                                  .Arg<ffi::Buffer<ffi::F32>>()  // keys
                                  .Arg<ffi::Buffer<ffi::F32>>()  // values
                                  .Arg<ffi::Buffer<ffi::S32>>()  // prefix mask
                                  .Arg<ffi::Buffer<ffi::S32>>()  // mask
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out
                                  .Ret<ffi::Buffer<ffi::F32>>()  // keys (aliased)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // values (aliased)
                                  .Attr<float>("scale")
                                  .Attr<float>("mask_value"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CloudJaxDecodeMatmul, DecodeMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("prologue")
                                  .Attr<float>("eps")
                                  .Attr<int32_t>("transposed"));
