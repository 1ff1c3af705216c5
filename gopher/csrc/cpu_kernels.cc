// XLA FFI kernels for the CPU (loaded and registered by gopher/cpu_kernels.py):
// Transformer-XL relative attention fused per head and sequence, forward and backward,
// an fp32 matmul through the BLAS (plain, or adding into its output) for the MLP, the
// projections and the output layer, and the loss's softmax cross-entropy over the logits.
//
//   score(i, j) = (q_i + u) . k_j + (q_i + v) . R_{i-j}      (q pre-scaled by 1/sqrt(K))
//
// The attention reads q, k and v where their projection left them (packed [B, T, 3, H*K],
// a row stride of 3*H*K) and writes its output and gradients in the same layouts, so no
// head transposes are made. One query chunk of one (head, sequence) at a time: its
// content and position scores are two BLAS calls, the skew, causal mask and softmax one
// pass over the chunk's scores in cache, and the backward recomputes the probabilities
// from the saved log-sum-exp (flash attention's way). XLA CPU runs the same maths as a
// dozen separate passes over memory per chunk (gopher/attention_xla.py).
//
// The BLAS is given at run time (a cblas_sgemm pointer, LP64 or ILP64) and must be
// single-threaded: the work is split over XLA's own intra-op thread pool.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using Buf3 = ffi::Buffer<ffi::F32, 3>;
using Buf4 = ffi::Buffer<ffi::F32, 4>;
using Res3 = ffi::ResultBuffer<ffi::F32, 3>;
using Res4 = ffi::ResultBuffer<ffi::F32, 4>;

namespace {

using Sgemm32 = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t,
                         const float*, int32_t, float, float*, int32_t);
using Sgemm64 = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t,
                         const float*, int64_t, float, float*, int64_t);
void* g_sgemm = nullptr;
int g_ilp64 = 0;
int g_threads = 0;

constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

// C[m, n] = alpha op(A) op(B) + beta C, row-major.
void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.f ? 0.f : beta * c[i * ldc + j];
    return;
  }
  int ta_ = ta ? kTrans : kNoTrans, tb_ = tb ? kTrans : kNoTrans;
  if (g_ilp64)
    reinterpret_cast<Sgemm64>(g_sgemm)(kRowMajor, ta_, tb_, m, n, k, 1.f, a, lda, b, ldb, beta, c,
                                       ldc);
  else
    reinterpret_cast<Sgemm32>(g_sgemm)(kRowMajor, ta_, tb_, m, n, k, 1.f, a, lda, b, ldb, beta, c,
                                       ldc);
}


// exp(x) for x <= 0 (softmax's shifted scores), vectorizable: 2^n * p(r) with
// x = n ln2 + r, |r| <= ln2/2, p a degree-6 Taylor polynomial (relative error < 2e-7);
// below -87.3 the result is 0.
inline float ExpNonPositive(float x) {
  x = std::max(x, -87.3f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Row-wise: row[j] = exp(row[j] - m) for j < n; returns their sum.
inline float ExpRow(float* row, int64_t n, float m) {
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    row[j] = ExpNonPositive(row[j] - m);
    total += row[j];
  }
  return total;
}

// (a compare and select, not std::max: GCC left std::max's reduction scalar, 4x slower)
inline float MaxRow(const float* row, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = row[j] > m ? row[j] : m;
  return m;
}

struct ForState {
  std::atomic<int64_t> next{0}, done{0};
  int64_t n = 0;
  std::function<void(int64_t)> fn;
  std::mutex mu;
  std::condition_variable cv;
};

void RunItems(ForState* s) {
  for (int64_t i; (i = s->next.fetch_add(1)) < s->n;) {
    s->fn(i);
    if (s->done.fetch_add(1) + 1 == s->n) {
      std::lock_guard<std::mutex> lock(s->mu);
      s->cv.notify_all();
    }
  }
}

// fn(0) ... fn(n-1) over the caller and XLA's intra-op pool; the caller takes items too,
// so it finishes even when no pool thread is free.
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t workers,
                 std::function<void(int64_t)> fn) {
  workers = std::min<int64_t>({workers, pool.num_threads(), n - 1});
  if (workers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  auto state = std::make_shared<ForState>();
  state->n = n;
  state->fn = std::move(fn);
  for (int64_t w = 0; w < workers; ++w) pool.Schedule([state] { RunItems(state.get()); });
  RunItems(state.get());
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

int64_t Workers() {
  return g_threads > 0 ? g_threads - 1 : int64_t(std::thread::hardware_concurrency()) - 1;
}

ffi::Error NoBlas() { return ffi::Error::InvalidArgument("gopher_cpu: no BLAS set"); }

// The number of parts ParallelParts splits [0, n) into.
int64_t Parts(int64_t n, int64_t grain) {
  return std::max<int64_t>(1, std::min<int64_t>(Workers() + 1, n / grain));
}

// fn(part, begin, end) over [0, n) in Parts(n, grain) contiguous parts, one per thread, each
// of `grain` or more (fewer parts when n is small).
void ParallelParts(ffi::ThreadPool& pool, int64_t n, int64_t grain,
                   const std::function<void(int64_t, int64_t, int64_t)>& fn) {
  const int64_t parts = Parts(n, grain);
  const int64_t step = (n + parts - 1) / parts;
  ParallelFor(pool, parts, Workers(), [&](int64_t p) {
    const int64_t i0 = p * step, i1 = std::min(n, i0 + step);
    if (i0 < i1) fn(p, i0, i1);
  });
}

void ParallelRange(ffi::ThreadPool& pool, int64_t n, int64_t grain,
                   const std::function<void(int64_t, int64_t)>& fn) {
  ParallelParts(pool, n, grain, [&](int64_t, int64_t i0, int64_t i1) { fn(i0, i1); });
}

// c = op(a) @ op(b) + beta c, rows of the result split over the threads.
ffi::Error MatmulInto(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& a, ffi::Buffer<ffi::F32>& b,
                      float* cp, float beta, int32_t ta, int32_t tb) {
  if (g_sgemm == nullptr) return NoBlas();
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2) return ffi::Error::InvalidArgument("matmul: rank 2 only");
  int64_t m = ta ? ad[1] : ad[0], k = ta ? ad[0] : ad[1], n = tb ? bd[0] : bd[1];
  const float* ap = a.typed_data();
  const float* bp = b.typed_data();
  ParallelRange(pool, m, 64, [&](int64_t r0, int64_t r1) {
    const float* a0 = ta ? ap + r0 : ap + r0 * ad[1];
    Gemm(ta, tb, r1 - r0, n, k, a0, ad[1], bp, bd[1], beta, cp + r0 * n, n);
  });
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                  ffi::ResultBuffer<ffi::F32> c, int32_t ta, int32_t tb) {
  return MatmulInto(pool, a, b, c->typed_data(), 0.f, ta, tb);
}

// c_out = c + op(a) @ op(b), c_out aliasing c (the loss's d E^T summed over its chunks in
// the BLAS call instead of in a pass of its own).
ffi::Error MatmulAdd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                     ffi::Buffer<ffi::F32> c, ffi::ResultBuffer<ffi::F32> out, int32_t ta,
                     int32_t tb) {
  float* op = out->typed_data();
  if (op != c.typed_data()) std::memcpy(op, c.typed_data(), c.size_bytes());
  return MatmulInto(pool, a, b, op, 1.f, ta, tb);
}

// Softmax cross-entropy's value and gradient in the logits, one pass over each row in
// cache: logits [N, V], targets [N] -> nll [N] (log-sum-exp minus the target's logit) and
// g [N, V] = (softmax - onehot(target)) * scale, g aliasing the logits. A target outside
// [0, V) gives a NaN loss (and no onehot). XLA CPU made the same as five passes over the
// chunk's logits (max, exp, sum, scale, the onehot) and a gather.
ffi::Error SoftmaxXent(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits,
                       ffi::Buffer<ffi::S32> targets, ffi::ResultBuffer<ffi::F32> g,
                       ffi::ResultBuffer<ffi::F32> nll, float scale) {
  auto d = logits.dimensions();
  if (d.size() != 2) return ffi::Error::InvalidArgument("softmax_xent: rank-2 logits only");
  const int64_t n = d[0], v = d[1];
  const float* in = logits.typed_data();
  float* out = g->typed_data();
  const int32_t* tgt = targets.typed_data();
  float* loss = nll->typed_data();
  ParallelRange(pool, n, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* x = in + i * v;
      float* y = out + i * v;
      const int64_t t = tgt[i];
      const bool ok = t >= 0 && t < v;
      const float target_logit = ok ? x[t] : 0.f;  // before y, which may be x, is written
      const float m = MaxRow(x, v);
      float total = 0.f;
#pragma omp simd reduction(+ : total)
      for (int64_t j = 0; j < v; ++j) {
        y[j] = ExpNonPositive(x[j] - m);
        total += y[j];
      }
      loss[i] = ok ? m + std::log(total) - target_logit : std::numeric_limits<float>::quiet_NaN();
      const float s = scale / total;
#pragma omp simd
      for (int64_t j = 0; j < v; ++j) y[j] *= s;
      if (ok) y[t] -= scale;
    }
  });
  return ffi::Error::Success();
}

// gelu in its tanh form, 0.5 x (1 + tanh(u)), u = c (x + 0.044715 x^3), c = sqrt(2 / pi),
// through 1 + tanh u and 1 - tanh u written with e = exp(-2 |u|): 2 / (1 + e) on u's side,
// 2 e / (1 + e) on the other, so neither cancels where tanh saturates.
constexpr float kGeluC = 0.7978845608028654f, kGeluK = 0.044715f;

struct OneTanh {
  float plus, minus;  // 1 + tanh u, 1 - tanh u
};

inline OneTanh OnePlusMinusTanh(float u) {
  const float e = ExpNonPositive(-2.f * std::fabs(u));
  const float big = 2.f / (1.f + e), small = e * big;
  return u >= 0.f ? OneTanh{big, small} : OneTanh{small, big};
}

// act = gelu(pre), one pass (XLA CPU: one fusion, but a slower tanh).
ffi::Error Gelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> pre, ffi::ResultBuffer<ffi::F32> act) {
  const float* x = pre.typed_data();
  float* y = act->typed_data();
  ParallelRange(pool, pre.element_count(), 4096, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i];
      y[i] = 0.5f * v * OnePlusMinusTanh(kGeluC * v * (1.f + kGeluK * v * v)).plus;
    }
  });
  return ffi::Error::Success();
}

// The MLP's backward at the gelu, one pass: act = gelu(pre) recomputed (for d w_out) and
// d_pre = g gelu'(pre), d_pre aliasing g (XLA CPU: three fusions over [B*T, F]).
ffi::Error GeluBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> pre, ffi::Buffer<ffi::F32> g,
                   ffi::ResultBuffer<ffi::F32> act, ffi::ResultBuffer<ffi::F32> d_pre) {
  const float* x = pre.typed_data();
  const float* gp = g.typed_data();
  float* y = act->typed_data();
  float* d = d_pre->typed_data();
  ParallelRange(pool, pre.element_count(), 4096, [&](int64_t i0, int64_t i1) {
#pragma omp simd
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i], v2 = v * v;
      const OneTanh t = OnePlusMinusTanh(kGeluC * v * (1.f + kGeluK * v2));
      y[i] = 0.5f * v * t.plus;
      const float du = kGeluC * (1.f + 3.f * kGeluK * v2);  // d u / d v
      d[i] = gp[i] * 0.5f * t.plus * (1.f + v * t.minus * du);
    }
  });
  return ffi::Error::Success();
}

// Adam's step for one parameter, one pass over its gradient, moments and value, where
// XLA CPU made four (the two moments, the update, its addition) and clipped in each:
//   g' = norm < max_norm ? g : (g / norm) * max_norm      (clip_by_global_norm)
//   mu = (1 - b1) g' + b1 mu;  nu = (1 - b2) g'^2 + b2 nu
//   u  = (mu / bc1) / (sqrt(nu / bc2 + eps_root) + eps) + weight_decay p
//   p  = p + step u                               (step = -lr)
// optax's order of operations (1 - b taken in double, as there); mu, nu and p are written
// over their inputs' buffers.
// s = [norm, max_norm, bc1, bc2, step] (bc = 1 - b^count, optax's bias corrections).
struct AdamScalars {
  float norm, max_norm, bc1, bc2, step, b1, omb1, b2, omb2, eps, eps_root, weight_decay;
};

// Elements [i0, i1); clipping a template argument, so that the loop has no branch to keep
// it from vectorizing. mu and p may be mo and po (updated in place).
template <bool kClip>
void AdamRange(const AdamScalars c, int64_t i0, int64_t i1, const float* gp, const float* mi,
               const float* ni, const float* pi, float* mo, float* no, float* po) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const float x = kClip ? (gp[i] / c.norm) * c.max_norm : gp[i];
    const float m = c.omb1 * x + c.b1 * mi[i];
    const float v = c.omb2 * (x * x) + c.b2 * ni[i];
    const float u = (m / c.bc1) / (std::sqrt(v / c.bc2 + c.eps_root) + c.eps) +
                    c.weight_decay * pi[i];
    mo[i] = m;
    no[i] = v;
    po[i] = pi[i] + c.step * u;
  }
}

ffi::Error Adam(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> mu,
                ffi::Buffer<ffi::F32> nu, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> s,
                ffi::ResultBuffer<ffi::F32> mu_out, ffi::ResultBuffer<ffi::F32> nu_out,
                ffi::ResultBuffer<ffi::F32> p_out, float b1, float omb1, float b2, float omb2,
                float eps, float eps_root, float weight_decay) {
  if (s.element_count() != 5) return ffi::Error::InvalidArgument("adam: 5 scalars");
  const float* sc = s.typed_data();
  const AdamScalars c{sc[0], sc[1], sc[2], sc[3], sc[4], b1, omb1, b2, omb2, eps, eps_root,
                      weight_decay};
  const bool clip = !(c.norm < c.max_norm);
  const float *gp = g.typed_data(), *mi = mu.typed_data(), *ni = nu.typed_data();
  const float* pi = p.typed_data();
  float *mo = mu_out->typed_data(), *no = nu_out->typed_data(), *po = p_out->typed_data();
  ParallelRange(pool, g.element_count(), 16384, [&](int64_t i0, int64_t i1) {
    if (clip)
      AdamRange<true>(c, i0, i1, gp, mi, ni, pi, mo, no, po);
    else
      AdamRange<false>(c, i0, i1, gp, mi, ni, pi, mo, no, po);
  });
  return ffi::Error::Success();
}

// RMSNorm over rows of x [N, D]: y = x * scale * inv, inv = 1 / sqrt(mean(x^2) + eps)
// per row (kept [N] for the backward), one pass over each row in cache where XLA CPU made
// a reduction and a pass of its own.
ffi::Error RmsNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                   ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::F32> inv, float eps) {
  const int64_t d = scale.element_count(), n = x.element_count() / d;
  const float *xp = x.typed_data(), *sp = scale.typed_data();
  float *yp = y->typed_data(), *ip = inv->typed_data();
  ParallelRange(pool, n, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const float* row = xp + i * d;
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < d; ++j) ss += row[j] * row[j];
      const float r = 1.f / std::sqrt(ss / float(d) + eps);
      ip[i] = r;
      float* out = yp + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) out[j] = row[j] * sp[j] * r;
    }
  });
  return ffi::Error::Success();
}

// RMSNorm's backward from x, scale, inv and dy, one pass over each row: g = dy scale,
// dx = inv g - inv^3 mean(g x) x (written over dy's buffer), and d scale = sum over rows of
// dy x inv, summed per thread and then across them (XLA CPU: five passes and a reduction).
ffi::Error RmsNormBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> inv, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale) {
  const int64_t d = scale.element_count(), n = x.element_count() / d;
  const float *xp = x.typed_data(), *sp = scale.typed_data(), *ip = inv.typed_data();
  const float* gp = dy.typed_data();
  float* dxp = dx->typed_data();
  constexpr int64_t kGrain = 16;
  std::vector<float> partial(Parts(n, kGrain) * d, 0.f);
  ParallelParts(pool, n, kGrain, [&](int64_t part, int64_t r0, int64_t r1) {
    float* acc = partial.data() + part * d;
    for (int64_t i = r0; i < r1; ++i) {
      const float *row = xp + i * d, *g = gp + i * d;
      const float r = ip[i];
      float gx = 0.f;
#pragma omp simd reduction(+ : gx)
      for (int64_t j = 0; j < d; ++j) {
        gx += g[j] * sp[j] * row[j];
        acc[j] += g[j] * row[j] * r;
      }
      const float c = r * r * r * (gx / float(d));
      float* out = dxp + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) out[j] = r * (g[j] * sp[j]) - c * row[j];
    }
  });
  float* ds = dscale->typed_data();
  for (int64_t j = 0; j < d; ++j) ds[j] = 0.f;
  for (size_t p = 0; p < partial.size(); p += d)
    for (int64_t j = 0; j < d; ++j) ds[j] += partial[p + j];
  return ffi::Error::Success();
}

struct Dims {
  int64_t b, t, h, k, d;
};

// Scores of queries a..s-1 (one head, one sequence) against keys 0..s-1, causal:
// content (q+u) k^T plus the position term (q+v) R^T skewed so that column j is
// distance (a+i)-j. Fills qu, qv [c, K] and scores [c, s]; entries above the diagonal
// are left as they are (callers read j <= a+i only).
void ChunkScores(const Dims& g, const float* q, const float* k, const float* rh, const float* u,
                 const float* vb, int64_t a, int64_t s, float* qu, float* qv, float* sc,
                 float* pos) {
  const int64_t c = s - a, K = g.k, ld = 3 * g.d;
  for (int64_t i = 0; i < c; ++i)
    for (int64_t x = 0; x < K; ++x) {
      float qq = q[(a + i) * ld + x];
      qu[i * K + x] = qq + u[x];
      qv[i * K + x] = qq + vb[x];
    }
  Gemm(false, true, c, s, K, qu, K, k, ld, 0.f, sc, s);
  Gemm(false, true, c, s + 1, K, qv, K, rh + (g.t - s) * K, K, 0.f, pos, s + 1);
  for (int64_t i = 0; i < c; ++i) {
    float* row = sc + i * s;
    const float* prow = pos + i * (s + 1) + (c - i);
    const int64_t last = a + i;
    for (int64_t j = 0; j <= last; ++j) row[j] += prow[j];
  }
}

struct Scratch {
  std::vector<float> qu, qv, sc, pos, dp, tmp;
  void Reserve(int64_t chunk, int64_t t, int64_t k) {
    qu.resize(chunk * k);
    qv.resize(chunk * k);
    sc.resize(chunk * t);
    pos.resize(chunk * (t + 1));
    dp.resize(chunk * t);
    tmp.resize(chunk * k);
  }
};

ffi::Error AttentionFwd(ffi::ThreadPool pool, Buf4 qkv, Buf3 r, Buf3 u, Buf3 vb, Res3 out,
                        Res3 lse, int64_t chunk) {
  if (g_sgemm == nullptr) return NoBlas();
  auto qd = qkv.dimensions(), rd = r.dimensions();
  Dims g{qd[0], qd[1], rd[0], rd[2], qd[3]};
  const float* base = qkv.typed_data();
  float* o = out->typed_data();
  float* l = lse->typed_data();
  ParallelFor(pool, g.h * g.b, Workers(), [&](int64_t item) {
    const int64_t h = item / g.b, b = item % g.b, K = g.k, ld = 3 * g.d;
    thread_local Scratch w;
    w.Reserve(chunk, g.t, K);
    const float* q = base + b * g.t * ld + h * K;
    const float* kk = q + g.d;
    const float* v = q + 2 * g.d;
    const float* rh = r.typed_data() + h * (g.t + 1) * K;
    float* oh = o + b * g.t * g.d + h * K;
    float* lh = l + (h * g.b + b) * g.t;
    for (int64_t a = 0; a < g.t; a += chunk) {
      const int64_t s = std::min(a + chunk, g.t), c = s - a;
      ChunkScores(g, q, kk, rh, u.typed_data() + h * K, vb.typed_data() + h * K, a, s,
                  w.qu.data(), w.qv.data(), w.sc.data(), w.pos.data());
      std::vector<float>& sum = w.tmp;  // c sums (tmp holds c*K >= c floats)
      for (int64_t i = 0; i < c; ++i) {
        float* row = w.sc.data() + i * s;
        const int64_t last = a + i;
        const float m = MaxRow(row, last + 1);
        const float total = ExpRow(row, last + 1, m);
        for (int64_t j = last + 1; j < s; ++j) row[j] = 0.f;
        sum[i] = total;
        lh[a + i] = m + std::log(total);
      }
      Gemm(false, false, c, K, s, w.sc.data(), s, v, ld, 0.f, oh + a * g.d, g.d);
      for (int64_t i = 0; i < c; ++i) {
        const float inv = 1.f / sum[i];
        float* row = oh + (a + i) * g.d;
        for (int64_t x = 0; x < K; ++x) row[x] *= inv;
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error AttentionBwd(ffi::ThreadPool pool, Buf4 qkv, Buf3 r, Buf3 u, Buf3 vb, Buf3 out,
                        Buf3 lse, Buf3 dout, Res4 dqkv, Res3 dr, Res3 du, Res3 dvb,
                        int64_t chunk) {
  if (g_sgemm == nullptr) return NoBlas();
  auto qd = qkv.dimensions(), rd = r.dimensions();
  Dims g{qd[0], qd[1], rd[0], rd[2], qd[3]};
  const float* base = qkv.typed_data();
  float* dbase = dqkv->typed_data();
  // Heads split over the threads: each owns its rows of dr, du, dvb.
  ParallelFor(pool, g.h, Workers(), [&](int64_t h) {
    const int64_t K = g.k, ld = 3 * g.d;
    thread_local Scratch w;
    w.Reserve(chunk, g.t, K);
    std::vector<float> delta(g.t);
    const float* rh = r.typed_data() + h * (g.t + 1) * K;
    float* drh = dr->typed_data() + h * (g.t + 1) * K;
    float* duh = du->typed_data() + h * K;
    float* dvbh = dvb->typed_data() + h * K;
    std::memset(drh, 0, sizeof(float) * (g.t + 1) * K);
    std::memset(duh, 0, sizeof(float) * K);
    std::memset(dvbh, 0, sizeof(float) * K);
    for (int64_t b = 0; b < g.b; ++b) {
      const float* q = base + b * g.t * ld + h * K;
      const float* kk = q + g.d;
      const float* v = q + 2 * g.d;
      const float* oh = out.typed_data() + b * g.t * g.d + h * K;
      const float* doh = dout.typed_data() + b * g.t * g.d + h * K;
      const float* lh = lse.typed_data() + (h * g.b + b) * g.t;
      float* dq = dbase + b * g.t * ld + h * K;
      float* dk = dq + g.d;
      float* dv = dq + 2 * g.d;
      for (int64_t i = 0; i < g.t; ++i) {
        float acc = 0.f;
        for (int64_t x = 0; x < K; ++x) acc += oh[i * g.d + x] * doh[i * g.d + x];
        delta[i] = acc;
        std::memset(dk + i * ld, 0, sizeof(float) * K);
        std::memset(dv + i * ld, 0, sizeof(float) * K);
      }
      for (int64_t a = 0; a < g.t; a += chunk) {
        const int64_t s = std::min(a + chunk, g.t), c = s - a;
        ChunkScores(g, q, kk, rh, u.typed_data() + h * K, vb.typed_data() + h * K, a, s,
                    w.qu.data(), w.qv.data(), w.sc.data(), w.pos.data());
        float* p = w.sc.data();
        for (int64_t i = 0; i < c; ++i) {
          float* row = p + i * s;
          const int64_t last = a + i;
          const float m = lh[a + i];
          ExpRow(row, last + 1, m);
          for (int64_t j = last + 1; j < s; ++j) row[j] = 0.f;
        }
        // dv[:s] += p^T do;  dp = do v[:s]^T
        Gemm(true, false, s, K, c, p, s, doh + a * g.d, g.d, 1.f, dv, ld);
        float* dp = w.dp.data();
        Gemm(false, true, c, s, K, doh + a * g.d, g.d, v, ld, 0.f, dp, s);
        for (int64_t i = 0; i < c; ++i) {
          float* drow = dp + i * s;
          const float* prow = p + i * s;
          const float dl = delta[a + i];
          for (int64_t j = 0; j < s; ++j) drow[j] = prow[j] * (drow[j] - dl);
        }
        // dq (content) = ds k[:s];  dk[:s] += ds^T (q+u)
        float* dqa = dq + a * ld;
        Gemm(false, false, c, K, s, dp, s, kk, ld, 0.f, dqa, ld);
        for (int64_t i = 0; i < c; ++i)
          for (int64_t x = 0; x < K; ++x) duh[x] += dqa[i * ld + x];
        Gemm(true, false, s, K, c, dp, s, w.qu.data(), K, 1.f, dk, ld);
        // The position term: unskew ds into [c, s+1] (column j+c-i), then
        // dq += dpos R_s;  dR_s += dpos^T (q+v).
        float* dpos = w.pos.data();
        std::memset(dpos, 0, sizeof(float) * c * (s + 1));
        for (int64_t i = 0; i < c; ++i) {
          const int64_t last = a + i;
          std::memcpy(dpos + i * (s + 1) + (c - i), dp + i * s, sizeof(float) * (last + 1));
        }
        float* t = w.tmp.data();
        Gemm(false, false, c, K, s + 1, dpos, s + 1, rh + (g.t - s) * K, K, 0.f, t, K);
        for (int64_t i = 0; i < c; ++i)
          for (int64_t x = 0; x < K; ++x) {
            dqa[i * ld + x] += t[i * K + x];
            dvbh[x] += t[i * K + x];
          }
        Gemm(true, false, s + 1, K, c, dpos, s + 1, w.qv.data(), K, 1.f, drh + (g.t - s) * K, K);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

extern "C" void gopher_cpu_set_sgemm(void* fn, int ilp64, int threads) {
  g_sgemm = fn;
  g_ilp64 = ilp64;
  g_threads = threads;
}

// The thread pool, then kArgs fp32 buffers as arguments and kRets as results (in
// parentheses where a macro's argument, for the comma).
using F32Buffer = ffi::Buffer<ffi::F32>;
template <int kArgs, int kRets>
auto F32Io() {
  if constexpr (kRets > 0)
    return F32Io<kArgs, kRets - 1>().template Ret<F32Buffer>();
  else if constexpr (kArgs > 0)
    return F32Io<kArgs - 1, 0>().template Arg<F32Buffer>();
  else
    return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>();
}

// Both attention passes take q, k, v packed [B, T, 3, H*K], W_R R [H, T+1, K], u and v [H, 1, K].
auto AttentionInputs() {
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Buf4>().Arg<Buf3>().Arg<Buf3>().Arg<Buf3>();
}

// -> out [B, T, H*K], log-sum-exp [H, B, T]
XLA_FFI_DEFINE_HANDLER_SYMBOL(GopherAttentionFwd, AttentionFwd,
                              AttentionInputs().Ret<Buf3>().Ret<Buf3>().Attr<int64_t>("chunk"));

// (+ out, log-sum-exp, d out) -> d qkv, d W_R R, d u, d v
XLA_FFI_DEFINE_HANDLER_SYMBOL(GopherAttentionBwd, AttentionBwd,
                              AttentionInputs()
                                  .Arg<Buf3>()
                                  .Arg<Buf3>()
                                  .Arg<Buf3>()
                                  .Ret<Buf4>()
                                  .Ret<Buf3>()
                                  .Ret<Buf3>()
                                  .Ret<Buf3>()
                                  .Attr<int64_t>("chunk"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GopherMatmul, Matmul,
                              (F32Io<2, 1>()).Attr<int32_t>("transa").Attr<int32_t>("transb"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GopherMatmulAdd, MatmulAdd,
                              (F32Io<3, 1>()).Attr<int32_t>("transa").Attr<int32_t>("transb"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GopherSoftmaxXent, SoftmaxXent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32Buffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<F32Buffer>()
                                  .Ret<F32Buffer>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GopherGelu, Gelu, (F32Io<1, 1>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GopherGeluBwd, GeluBwd, (F32Io<2, 2>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GopherAdam, Adam,
                              (F32Io<5, 3>())
                                  .Attr<float>("b1")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root")
                                  .Attr<float>("weight_decay"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GopherRmsNorm, RmsNorm, (F32Io<2, 2>()).Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GopherRmsNormBwd, RmsNormBwd, (F32Io<4, 2>()));
