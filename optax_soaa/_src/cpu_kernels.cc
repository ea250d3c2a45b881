// Fused CPU kernels for optax_soaa's passes over memory (XLA FFI handlers).
//
// XLA:CPU evaluates a pass that both updates state arrays and sums over them
// either as several kernels that re-read the arrays (it has no multi-output
// reduction fusion) or, in the slice loops optax_soaa falls back to, on one
// core. These handlers do one such pass in one read of each array, split
// into blocks over XLA's intra-op thread pool. Each state is updated in
// place: the Python side aliases it to its output (`input_output_aliases`).
//
// The arithmetic is the Python code's, operation for operation, in the
// arrays' dtype (float or double): the states match the XLA path up to the
// compiler's rounding choices (built with -ffp-contract=off). Sums add each
// block in the dtype, lane by lane, and the blocks' totals in double, in
// block order (the result does not depend on thread timing).
//
// Built at first use by native.py (beside this file); see there for the flags.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 4096;

// Runs body(block) for block in [0, num_blocks) on the caller and on the
// intra-op pool's threads. Helpers take blocks from a shared counter; the
// caller returns once every block has finished. A helper that starts late
// finds no block left and never touches `body`.
template <typename F>
void ParallelBlocks(ffi::ThreadPool& pool, int64_t num_blocks, F& body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto shared = std::make_shared<Shared>();
  F* fn = &body;
  auto work = [shared, fn, num_blocks]() {
    for (int64_t i; (i = shared->next.fetch_add(1)) < num_blocks;) {
      (*fn)(i);
      shared->done.fetch_add(1, std::memory_order_release);
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), num_blocks) - 1;
  for (int64_t k = 0; k < helpers; ++k) pool.Schedule(decltype(work)(work));
  work();
  while (shared->done.load(std::memory_order_acquire) < num_blocks) {
    std::this_thread::yield();
  }
}

// jnp.maximum: NaN if either operand is NaN (selects, no branches, so
// loops using it vectorise).
template <typename T>
inline T MaxNaN(T a, T b) {
  const T larger = a > b ? a : b;
  return a != a ? a : larger;
}

// Calls f with `flag` as a compile-time constant (std::bool_constant), so
// that each value gets its own loop: GCC does not vectorise a loop that
// selects on a run-time bool.
template <typename F>
void WithFlag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The state's output aliases its input; copies the input over when XLA did
// not alias them (then the kernel works on the output in place).
template <typename B, typename R>
auto* InPlace(const B& in, R& out) {
  auto* dst = out->typed_data();
  const auto* src = in.typed_data();
  if (static_cast<const void*>(dst) != static_cast<const void*>(src)) {
    std::memcpy(dst, src, in.size_bytes());
  }
  return dst;
}

template <typename T>
void WriteSums(const std::vector<double>& partial, int64_t num_blocks,
               int64_t k_count, T* out) {
  for (int64_t k = 0; k < k_count; ++k) {
    double total = 0;
    for (int64_t i = 0; i < num_blocks; ++i) total += partial[i * k_count + k];
    out[k] = static_cast<T>(total);
  }
}

// ½-less KL terms λ (θ - μ_new(η))² over one block, for each η in `etas`,
// added to partial[k]. μ_new(η) = (η λ θ - b) / (c + η λ), c = h + ρ p0.
template <typename T, bool kClip, bool kDecay>
inline void KlBlock(int64_t lo, int64_t hi, const T* __restrict p,
                    const T* __restrict b, const T* __restrict h,
                    const T* __restrict lam, const T* etas, int64_t k_count,
                    T reg_prior, T decay, double* partial) {
  for (int64_t k = 0; k < k_count; ++k) {
    const T eta = etas[k];
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = lo; i < hi; ++i) {
      T theta = p[i];
      if constexpr (kDecay) theta = theta - theta * decay;
      const T hh = kClip ? MaxNaN(h[i], T(0)) : h[i];
      const T temp = lam[i] * eta;
      const T mu = (temp * theta - b[i]) / (hh + reg_prior + temp);
      const T d = theta - mu;
      acc += d * d * lam[i];
    }
    partial[k] = static_cast<double>(acc);
  }
}

// The Kalman filter over one block, states in place (see `ArturoFilterImpl`).
template <typename T, bool kFirst, bool kClip, bool kDecay>
inline void FilterBlock(int64_t lo, int64_t hi, const T* __restrict gp,
                        const T* __restrict pp, T* __restrict lam,
                        T* __restrict b, T* __restrict h, T* __restrict p00,
                        T* __restrict p01, T* __restrict p11, T q, T meas, T reg_prior, T nu, T nu_rho, T decay) {
#pragma omp simd
  for (int64_t i = lo; i < hi; ++i) {
    const T l = lam[i], hh = h[i];
    const T c = (kClip ? MaxNaN(hh, T(0)) : hh) + reg_prior;
    const T l_new = kFirst ? l : (c + l * nu) / nu_rho;
    T theta = pp[i];
    if constexpr (kDecay) theta = theta - theta * decay;
    const T gg = gp[i];
    const T bb = kFirst ? gg : b[i];
    const T a00 = p00[i] + q, a01 = p01[i], a11 = p11[i] + q;
    const T k0 = a00 + a01 * theta;
    const T k1 = a01 + a11 * theta;
    const T sv = k0 + k1 * theta + meas;
    const T inv_s = T(1) / sv;
    const T gain0 = k0 * inv_s, gain1 = k1 * inv_s;
    const T innovation = (gg - theta * hh - bb) / sv;
    lam[i] = l_new;
    b[i] = bb + k0 * innovation;
    h[i] = hh + k1 * innovation;
    p00[i] = a00 - gain0 * (sv * gain0);
    p01[i] = a01 - gain0 * (sv * gain1);
    p11[i] = a11 - gain1 * (sv * gain1);
  }
}

// arTuRO's filter pass over one leaf (see arturo.py, `filter_leaf`):
// λ ← λ_new of the last step (not at t = 1), the Kalman filter of (b, h)
// with covariance (P00, P01, P11), and the KL terms at `etas` from the
// filtered state.
// scalars: [first, q, R, ρ p0, ν, ρ, decay, clip, use_decay]
template <ffi::DataType DT>
ffi::Error ArturoFilterImpl(
    ffi::ThreadPool pool, ffi::Buffer<DT> g, ffi::Buffer<DT> p,
    ffi::Buffer<DT> lam_in, ffi::Buffer<DT> b_in, ffi::Buffer<DT> h_in,
    ffi::Buffer<DT> p00_in, ffi::Buffer<DT> p01_in, ffi::Buffer<DT> p11_in,
    ffi::Buffer<DT> scalars, ffi::Buffer<DT> etas_buf,
    ffi::ResultBuffer<DT> lam_out, ffi::ResultBuffer<DT> b_out,
    ffi::ResultBuffer<DT> h_out, ffi::ResultBuffer<DT> p00_out,
    ffi::ResultBuffer<DT> p01_out, ffi::ResultBuffer<DT> p11_out,
    ffi::ResultBuffer<DT> sums) {
  using T = ffi::NativeType<DT>;
  const int64_t n = g.element_count();
  const T* s = scalars.typed_data();
  const bool first = s[0] != T(0);
  const T q = s[1], meas = s[2], reg_prior = s[3], nu = s[4], rho = s[5],
          decay = s[6];
  const bool clip = s[7] != T(0), use_decay = s[8] != T(0);
  const T nu_rho = rho + nu;
  const int64_t k_count = etas_buf.element_count();
  const T* etas = etas_buf.typed_data();
  const T* __restrict gp = g.typed_data();
  const T* __restrict pp = p.typed_data();
  T* __restrict lam = InPlace(lam_in, lam_out);
  T* __restrict b = InPlace(b_in, b_out);
  T* __restrict h = InPlace(h_in, h_out);
  T* __restrict p00 = InPlace(p00_in, p00_out);
  T* __restrict p01 = InPlace(p01_in, p01_out);
  T* __restrict p11 = InPlace(p11_in, p11_out);
  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(num_blocks * k_count);
  WithFlag(first, [&](auto first_c) {
    WithFlag(clip, [&](auto clip_c) {
      WithFlag(use_decay, [&](auto decay_c) {
        constexpr bool kClip = decltype(clip_c)::value;
        constexpr bool kDecay = decltype(decay_c)::value;
        auto body = [&](int64_t blk) {
          const int64_t lo = blk * kBlock, hi = std::min(n, lo + kBlock);
          FilterBlock<T, decltype(first_c)::value, kClip, kDecay>(
              lo, hi, gp, pp, lam, b, h, p00, p01, p11, q, meas, reg_prior,
              nu, nu_rho, decay);
          KlBlock<T, kClip, kDecay>(lo, hi, pp, b, h, lam, etas, k_count,
                                    reg_prior, decay,
                                    &partial[blk * k_count]);
        };
        ParallelBlocks(pool, num_blocks, body);
      });
    });
  });
  WriteSums(partial, num_blocks, k_count, sums->typed_data());
  return ffi::Error::Success();
}

// arTuRO's KL at several η (a bisection pass): read-only.
// scalars: [ρ p0, decay, clip, use_decay]
template <ffi::DataType DT>
ffi::Error ArturoKlImpl(ffi::ThreadPool pool, ffi::Buffer<DT> p,
                        ffi::Buffer<DT> b, ffi::Buffer<DT> h,
                        ffi::Buffer<DT> lam, ffi::Buffer<DT> scalars,
                        ffi::Buffer<DT> etas_buf, ffi::ResultBuffer<DT> sums) {
  using T = ffi::NativeType<DT>;
  const int64_t n = p.element_count();
  const T* s = scalars.typed_data();
  const T reg_prior = s[0], decay = s[1];
  const bool clip = s[2] != T(0), use_decay = s[3] != T(0);
  const int64_t k_count = etas_buf.element_count();
  const T* etas = etas_buf.typed_data();
  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(num_blocks * k_count);
  WithFlag(clip, [&](auto clip_c) {
    WithFlag(use_decay, [&](auto decay_c) {
      auto body = [&](int64_t blk) {
        const int64_t lo = blk * kBlock, hi = std::min(n, lo + kBlock);
        KlBlock<T, decltype(clip_c)::value, decltype(decay_c)::value>(
            lo, hi, p.typed_data(), b.typed_data(), h.typed_data(),
            lam.typed_data(), etas, k_count, reg_prior, decay,
            &partial[blk * k_count]);
      };
      ParallelBlocks(pool, num_blocks, body);
    });
  });
  WriteSums(partial, num_blocks, k_count, sums->typed_data());
  return ffi::Error::Success();
}

// SOAA's moments over one block, in place; adds Σ m² and Σ v to partial.
template <typename T, bool kVariance, bool kFirst>
inline void MomentsBlock(int64_t lo, int64_t hi, const T* __restrict gp,
                         T* __restrict m, T* __restrict s, T* __restrict v,
                         T c1, T b1, T c2, T b2, T bc1, double* partial) {
  T acc_m = 0, acc_v = 0;
#pragma omp simd reduction(+ : acc_m, acc_v)
  for (int64_t i = lo; i < hi; ++i) {
    const T gg = gp[i];
    const T mm = c1 * gg + b1 * m[i];
    const T ss = c2 * (gg * gg) + b2 * s[i];
    m[i] = mm;
    s[i] = ss;
    acc_m += mm * mm;
    if constexpr (kVariance) {
      const T dev = kFirst ? T(0) : gg - mm / bc1;
      const T vv = b2 * v[i] + c2 * (dev * dev);
      v[i] = vv;
      acc_v += vv;
    } else {
      acc_v += ss;
    }
  }
  partial[0] = static_cast<double>(acc_m);
  partial[1] = static_cast<double>(acc_v);
}

// Σ u (m̂ - ½ v̂ u) over one block (see `SoaaPredictedReductionImpl`).
template <typename T>
inline double PredictedReductionBlock(int64_t lo, int64_t hi,
                                      const T* __restrict mp,
                                      const T* __restrict sp,
                                      const T* __restrict vp, T inv_bc1,
                                      T inv_bc2, T one_plus_r, T dt, T eps) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = lo; i < hi; ++i) {
    const T m_hat = mp[i] * inv_bc1;
    const T s_hat = sp[i] * inv_bc2;
    const T v_hat = vp[i] * inv_bc2;
    const T scale = MaxNaN(dt * (one_plus_r * v_hat), std::sqrt(s_hat));
    const T u = m_hat * dt / (scale + eps);
    acc += u * (m_hat - T(0.5) * v_hat * u);
  }
  return static_cast<double>(acc);
}

// SOAA's first pass over one leaf (see soaa.py): the moments in place and
// the sums Σ m² and Σ v (v = s for curvature="second_moment").
// scalars: [1 - b1, b1, 1 - b2, b2, bc1, first, variance]
template <ffi::DataType DT>
ffi::Error SoaaMomentsImpl(ffi::ThreadPool pool, ffi::Buffer<DT> g,
                           ffi::Buffer<DT> m_in, ffi::Buffer<DT> s_in,
                           ffi::Buffer<DT> v_in, ffi::Buffer<DT> scalars,
                           ffi::ResultBuffer<DT> m_out,
                           ffi::ResultBuffer<DT> s_out,
                           ffi::ResultBuffer<DT> v_out,
                           ffi::ResultBuffer<DT> sums) {
  using T = ffi::NativeType<DT>;
  const int64_t n = g.element_count();
  const T* c = scalars.typed_data();
  const T c1 = c[0], b1 = c[1], c2 = c[2], b2 = c[3], bc1 = c[4];
  const bool first = c[5] != T(0), variance = c[6] != T(0);
  const T* __restrict gp = g.typed_data();
  T* __restrict m = InPlace(m_in, m_out);
  T* __restrict s = InPlace(s_in, s_out);
  // With curvature="second_moment" v is a one-element placeholder.
  T* __restrict v = variance ? InPlace(v_in, v_out) : nullptr;
  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(num_blocks * 2);
  WithFlag(variance, [&](auto variance_c) {
    WithFlag(first, [&](auto first_c) {
      auto body = [&](int64_t blk) {
        const int64_t lo = blk * kBlock, hi = std::min(n, lo + kBlock);
        MomentsBlock<T, decltype(variance_c)::value, decltype(first_c)::value>(
            lo, hi, gp, m, s, v, c1, b1, c2, b2, bc1, &partial[2 * blk]);
      };
      ParallelBlocks(pool, num_blocks, body);
    });
  });
  WriteSums(partial, num_blocks, 2, sums->typed_data());
  return ffi::Error::Success();
}

// SOAA's predicted-reduction sum Σ u (m̂ - ½ v̂ u) over one leaf, with the
// step's direction u = m̂ dt / (max(dt (1 + r) v̂, sqrt(ŝ)) + eps).
// scalars: [1/bc1, 1/bc2, 1 + r, dt, eps]
template <ffi::DataType DT>
ffi::Error SoaaPredictedReductionImpl(ffi::ThreadPool pool,
                                      ffi::Buffer<DT> m, ffi::Buffer<DT> s,
                                      ffi::Buffer<DT> v,
                                      ffi::Buffer<DT> scalars,
                                      ffi::ResultBuffer<DT> sums) {
  using T = ffi::NativeType<DT>;
  const int64_t n = m.element_count();
  const T* c = scalars.typed_data();
  const T inv_bc1 = c[0], inv_bc2 = c[1], one_plus_r = c[2], dt = c[3],
          eps = c[4];
  const T* __restrict mp = m.typed_data();
  const T* __restrict sp = s.typed_data();
  const T* __restrict vp = v.typed_data();
  const int64_t num_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> partial(num_blocks);
  auto body = [&](int64_t blk) {
    const int64_t lo = blk * kBlock, hi = std::min(n, lo + kBlock);
    partial[blk] = PredictedReductionBlock<T>(lo, hi, mp, sp, vp, inv_bc1,
                                              inv_bc2, one_plus_r, dt, eps);
  };
  ParallelBlocks(pool, num_blocks, body);
  WriteSums(partial, num_blocks, 1, sums->typed_data());
  return ffi::Error::Success();
}

}  // namespace

// A handler's binding: the thread pool, then `kArgs` buffers in and `kRets`
// out, all of dtype DT (`XLA_FFI_DEFINE_HANDLER_SYMBOL` calls `To(impl)`).
template <ffi::DataType DT, int kArgs, int kRets, typename B, typename Fn>
auto BindBuffers(B&& binding, Fn fn) {
  if constexpr (kArgs > 0) {
    return BindBuffers<DT, kArgs - 1, kRets>(
        std::move(binding).template Arg<ffi::Buffer<DT>>(), fn);
  } else if constexpr (kRets > 0) {
    return BindBuffers<DT, 0, kRets - 1>(
        std::move(binding).template Ret<ffi::Buffer<DT>>(), fn);
  } else {
    return std::move(binding).To(fn);
  }
}

template <ffi::DataType DT, int kArgs, int kRets>
struct Buffers {
  template <typename Fn>
  auto To(Fn fn) const {
    return BindBuffers<DT, kArgs, kRets>(
        ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(), fn);
  }
};

#define OPTAX_SOAA_DEFINE(SUFFIX, DT)                                     \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxSoaaArturoFilter##SUFFIX,            \
                                ArturoFilterImpl<DT>, (Buffers<DT, 10, 7>{})); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxSoaaArturoKl##SUFFIX, ArturoKlImpl<DT>, \
                                (Buffers<DT, 6, 1>{}));                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxSoaaSoaaMoments##SUFFIX,             \
                                SoaaMomentsImpl<DT>, (Buffers<DT, 5, 4>{})); \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(OptaxSoaaSoaaPredictedReduction##SUFFIX,  \
                                SoaaPredictedReductionImpl<DT>,           \
                                (Buffers<DT, 4, 1>{}));

OPTAX_SOAA_DEFINE(F32, ffi::DataType::F32)
OPTAX_SOAA_DEFINE(F64, ffi::DataType::F64)
