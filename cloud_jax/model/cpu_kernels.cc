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
// CloudJaxDecodeMatmul: y [O, N] = w [O, I] . x [I, N] in fp32 for a few columns N (the decode's
// rows): each output row's N values are held in vector registers, a block of output rows at a
// time, and each weight is read once, as one broadcast multiply-add, streaming the weight rows
// from memory with a software prefetch ahead. Blocks of output rows are split over XLA's
// intra-op thread pool.

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

// out[a][j] = sum_d q[a][d] * keys_t[d][j] for QB queries over KB * kW keys from j0; keys
// [D, len]. QB * KB accumulators: enough independent chains to keep both FMA units busy.
template <int QB, int KB>
inline void ScoreBlock(const float* q, int64_t d_size, const float* keys_t, int64_t len,
                       int64_t j0, float* out, int64_t ld_out) {
  Vec acc[QB][KB];
  for (int a = 0; a < QB; ++a)
    for (int c = 0; c < KB; ++c) acc[a][c] = Vec{};
  for (int64_t d = 0; d < d_size; ++d) {
    Vec k[KB];
    for (int c = 0; c < KB; ++c) k[c] = Load(keys_t + d * len + j0 + c * kW);
    for (int a = 0; a < QB; ++a) {
      const float qd = q[a * d_size + d];
      for (int c = 0; c < KB; ++c) acc[a][c] += qd * k[c];
    }
  }
  for (int a = 0; a < QB; ++a)
    for (int c = 0; c < KB; ++c) Store(out + a * ld_out + j0 + c * kW, acc[a][c]);
}

template <int QB>
void ScoresQB(const float* q, int64_t d_size, const float* keys_t, int64_t len, float* out,
              int64_t ld_out) {
  int64_t j0 = 0;
  for (; j0 + 2 * kW <= len; j0 += 2 * kW)
    ScoreBlock<QB, 2>(q, d_size, keys_t, len, j0, out, ld_out);
  for (; j0 + kW <= len; j0 += kW) ScoreBlock<QB, 1>(q, d_size, keys_t, len, j0, out, ld_out);
  for (int a = 0; a < QB; ++a)
    for (int64_t j = j0; j < len; ++j) {
      float total = 0.f;
      for (int64_t d = 0; d < d_size; ++d) total += q[a * d_size + d] * keys_t[d * len + j];
      out[a * ld_out + j] = total;
    }
}

constexpr int kQB = 4;  // queries a score block; with 2 key vectors, 8 accumulators

void Scores(const float* q, int64_t nq, int64_t d_size, const float* keys_t, int64_t len,
            float* out, int64_t ld_out) {
  int64_t a = 0;
  for (; a + kQB <= nq; a += kQB)
    ScoresQB<kQB>(q + a * d_size, d_size, keys_t, len, out + a * ld_out, ld_out);
  switch (nq - a) {
    case 3: ScoresQB<3>(q + a * d_size, d_size, keys_t, len, out + a * ld_out, ld_out); break;
    case 2: ScoresQB<2>(q + a * d_size, d_size, keys_t, len, out + a * ld_out, ld_out); break;
    case 1: ScoresQB<1>(q + a * d_size, d_size, keys_t, len, out + a * ld_out, ld_out); break;
    default: for (; a < nq; ++a) ScoresQB<1>(q + a * d_size, d_size, keys_t, len, out + a * ld_out, ld_out);
  }
}

// out[a][:] += sum_j p[a][j] * values[j][:] for QB queries; values [len, D], D = DV * kW.
template <int QB, int DV>
inline void WeightedBlock(const float* p, int64_t ld_p, const float* values, int64_t len,
                          float* out) {
  Vec acc[QB][DV];
  for (int a = 0; a < QB; ++a)
    for (int e = 0; e < DV; ++e) acc[a][e] = Vec{};
  for (int64_t j = 0; j < len; ++j) {
    Vec row[DV];
    for (int e = 0; e < DV; ++e) row[e] = Load(values + j * DV * kW + e * kW);
    for (int a = 0; a < QB; ++a) {
      const float pj = p[a * ld_p + j];
      for (int e = 0; e < DV; ++e) acc[a][e] += pj * row[e];
    }
  }
  for (int a = 0; a < QB; ++a)
    for (int e = 0; e < DV; ++e)
      Store(out + a * DV * kW + e * kW, Load(out + a * DV * kW + e * kW) + acc[a][e]);
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

template <int DV>
void WeightedD(const float* p, int64_t ld_p, const float* values, int64_t len, int64_t nq,
               float* out) {
  constexpr int qb = DV <= 4 ? 4 : 1;  // at most 16 accumulators
  int64_t a = 0;
  for (; a + qb <= nq; a += qb)
    WeightedBlock<qb, DV>(p + a * ld_p, ld_p, values, len, out + a * DV * kW);
  switch (nq - a) {
    case 3: WeightedBlock<3, DV>(p + a * ld_p, ld_p, values, len, out + a * DV * kW); break;
    case 2: WeightedBlock<2, DV>(p + a * ld_p, ld_p, values, len, out + a * DV * kW); break;
    case 1: WeightedBlock<1, DV>(p + a * ld_p, ld_p, values, len, out + a * DV * kW); break;
    default: for (; a < nq; ++a) WeightedBlock<1, DV>(p + a * ld_p, ld_p, values, len, out + a * DV * kW);
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
};

void RunTask(const Problem& pr, int64_t task) {
  const int64_t n = task / pr.kv, kh = task % pr.kv;
  const int64_t r = pr.b / pr.n, nq = r * pr.g, width = pr.p + pr.s, d = pr.d;
  thread_local std::vector<float> scratch;
  scratch.resize(nq * d + nq * width);
  float* q = scratch.data();
  float* sc = q + nq * d;
  for (int64_t ri = 0; ri < r; ++ri) {
    const float* src = pr.q + (((n * r + ri) * pr.kv + kh) * pr.g) * d;
    for (int64_t e = 0; e < pr.g * d; ++e) q[ri * pr.g * d + e] = src[e] * pr.scale;
  }
  // Prefix scores: every query of the group against the group's keys.
  const float* pk = pr.pk + (n * pr.kv + kh) * d * pr.p;
  Scores(q, nq, d, pk, pr.p, sc, width);
  // Own scores: each row's queries against its own keys.
  for (int64_t ri = 0; ri < r; ++ri) {
    const int64_t row = n * r + ri;
    const float* k = pr.k + (row * pr.kv + kh) * d * pr.s;
    Scores(q + ri * pr.g * d, pr.g, d, k, pr.s, sc + ri * pr.g * width + pr.p, width);
  }
  // Masked softmax numerators and denominators.
  thread_local std::vector<float> denom, acc;
  denom.assign(nq, 0.f);
  for (int64_t ri = 0; ri < r; ++ri) {
    const int64_t row = n * r + ri;
    const int32_t* pm = pr.pmask + row * pr.p;
    const int32_t* m = pr.mask + row * pr.s;
    for (int64_t gi = 0; gi < pr.g; ++gi) {
      float* x = sc + (ri * pr.g + gi) * width;
      const float top = std::max(MaskAndMax(x, pm, pr.p, pr.mask_value),
                                 MaskAndMax(x + pr.p, m, pr.s, pr.mask_value));
      denom[ri * pr.g + gi] = ExpAndSum(x, width, top);
    }
  }
  // Weighted values into a local buffer, then normalised into the output.
  acc.assign(nq * d, 0.f);
  const float* pv = pr.pv + (n * pr.kv + kh) * pr.p * d;
  Weighted(sc, width, pv, pr.p, d, nq, acc.data());
  for (int64_t ri = 0; ri < r; ++ri) {
    const int64_t row = n * r + ri;
    const float* v = pr.v + (row * pr.kv + kh) * pr.s * d;
    Weighted(sc + ri * pr.g * width + pr.p, width, v, pr.s, d, pr.g, acc.data() + ri * pr.g * d);
  }
  for (int64_t ri = 0; ri < r; ++ri) {
    float* dst = pr.out + (((n * r + ri) * pr.kv + kh) * pr.g) * d;
    for (int64_t gi = 0; gi < pr.g; ++gi) {
      const float inv = 1.f / denom[ri * pr.g + gi];
      for (int64_t e = 0; e < d; ++e) dst[gi * d + e] = acc[(ri * pr.g + gi) * d + e] * inv;
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

// ---- CloudJaxDecodeMatmul ----

struct Matmul {
  const float* w;  // [O, I]
  const float* x;  // [I, NP]: the input, its columns padded to a multiple of kW
  float* y;        // [O, N]
  int64_t o, i, n, np, chunk;
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
    float* dst = m.y + (o0 + r) * m.n + c0;
    for (int c = 0; c < NV; ++c) {
      const int64_t left = m.n - c0 - c * kW;
      if (left >= kW)
        Store(dst + c * kW, acc[r][c]);
      else if (left > 0)
        std::memcpy(dst + c * kW, &acc[r][c], left * sizeof(float));
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

ffi::Error DecodeMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> w,
                            ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions(), xd = x.dimensions(), yd = y->dimensions();
  if (wd.size() != 2 || xd.size() != 2 || yd.size() != 2 || wd[1] != xd[0] ||
      yd[0] != wd[0] || yd[1] != xd[1])
    return ffi::Error::InvalidArgument(
        "decode matmul: expected w [O, I], x [I, N] and an output [O, N]");
  Matmul m;
  m.w = w.typed_data();
  m.y = y->typed_data();
  m.o = wd[0];
  m.i = wd[1];
  m.n = xd[1];
  m.np = (m.n + kW - 1) / kW * kW;
  if (m.o == 0 || m.n == 0) return ffi::Error::Success();
  std::vector<float> padded;  // outlives every task: ParallelFor returns after all of them
  if (m.np != m.n) {
    padded.assign(m.i * m.np, 0.f);
    for (int64_t i = 0; i < m.i; ++i)
      std::memcpy(padded.data() + i * m.np, x.typed_data() + i * m.n, m.n * sizeof(float));
    m.x = padded.data();
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(CloudJaxDecodeMatmul, DecodeMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
