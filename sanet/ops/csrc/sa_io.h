// Loads and stores of the fused Shuffle Attention CPU kernels (see shuffle_attention.cpp).
//
// A tensor's storage type S (float, double, BFloat16, Half) and the type the kernels compute
// in, compute_t<S>: S itself, or float for the 16-bit types. A 16-bit tensor is read into
// Vectorized<float> lanes (exact) and written back rounded once to nearest even, as
// Tensor.to(dtype) rounds, so the results are the float kernel's on the same values rounded
// once, without the fp32 copies of the tensors (which cost a bf16 layer more time than the
// kernel itself). For float and double these are the plain Vectorized<T> loads and stores.

#pragma once

#include <torch/extension.h>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace {

using at::vec::Vectorized;

template <typename S>
struct ComputeType { using type = S; };
template <>
struct ComputeType<at::BFloat16> { using type = float; };
template <>
struct ComputeType<at::Half> { using type = float; };
template <typename S>
using compute_t = typename ComputeType<S>::type;

template <typename S>
constexpr bool is_16bit = !std::is_same_v<S, compute_t<S>>;

constexpr int64_t kFloatLanes = Vectorized<float>::size();

// One vector of 16-bit values (kFloatLanes of them) as the hardware converts it to and from
// float lanes; ATen's converters (at::vec::cvt_to_fp32, cvtfp32_bf16, cvtfp32_fp16) round to
// nearest even and keep NaN a NaN.
#if defined(CPU_CAPABILITY_AVX512)
using Bits16 = __m256i;
using FloatReg = __m512;
#elif defined(CPU_CAPABILITY_AVX2)
using Bits16 = __m128i;
using FloatReg = __m256;
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
template <typename S>
inline Vectorized<float> widen(const Bits16& b) {
  FloatReg o;
  at::vec::cvt_to_fp32<S>(b, o);
  return Vectorized<float>(o);
}
template <typename S>
inline Bits16 narrow(const Vectorized<float>& v) {
  if constexpr (std::is_same_v<S, at::BFloat16>) return at::vec::cvtfp32_bf16(v);
  else return at::vec::cvtfp32_fp16(v);
}
#endif

// The first n <= kFloatLanes values of p, zero-filled, and back.
template <typename S>
inline Vectorized<float> load16_partial(const S* p, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  return widen<S>(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
#else
  float buf[kFloatLanes] = {};
  for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<float>(p[k]);
  return Vectorized<float>::loadu(buf);
#endif
}

template <typename S>
inline void store16_partial(S* p, const Vectorized<float>& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), narrow<S>(v));
#elif defined(CPU_CAPABILITY_AVX2)
  alignas(16) S buf[kFloatLanes];
  _mm_store_si128(reinterpret_cast<__m128i*>(buf), narrow<S>(v));
  std::memcpy(p, buf, n * sizeof(S));
#else
  float buf[kFloatLanes];
  v.store(buf);
  for (int64_t k = 0; k < n; ++k) p[k] = static_cast<S>(buf[k]);  // c10's rounding: to nearest even
#endif
}

// Vectorized<compute_t<S>>::size() values from p.
template <typename S>
inline Vectorized<compute_t<S>> vload(const S* p) {
  if constexpr (!is_16bit<S>) {
    return Vectorized<S>::loadu(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    Bits16 b;
    std::memcpy(&b, p, sizeof(b));  // an unaligned load
    return widen<S>(b);
#else
    return load16_partial(p, kFloatLanes);
#endif
  }
}

// The first n values from p (at most a vector), the other lanes 0.
template <typename S>
inline Vectorized<compute_t<S>> vload(const S* p, int64_t n) {
  if constexpr (!is_16bit<S>) {
    return Vectorized<S>::loadu(p, n);
  } else {
    return n == kFloatLanes ? vload(p) : load16_partial(p, n);
  }
}

// The first n lanes of v to p.
template <typename S>
inline void vstore(S* p, const Vectorized<compute_t<S>>& v, int64_t n) {
  if constexpr (!is_16bit<S>) {
    v.store(p, n);
  } else if (n == kFloatLanes) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    const Bits16 b = narrow<S>(v);
    std::memcpy(p, &b, sizeof(b));  // an unaligned store
#else
    store16_partial(p, v, n);
#endif
  } else {
    store16_partial(p, v, n);
  }
}

// A whole vector to p, aligned to the vector's size, around the cache.
template <typename S>
inline void stream_store(S* p, const Vectorized<compute_t<S>>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<S, float>) _mm512_stream_ps(p, v);
  else if constexpr (std::is_same_v<S, double>) _mm512_stream_pd(p, v);
  else _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow<S>(v));
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<S, float>) _mm256_stream_ps(p, v);
  else if constexpr (std::is_same_v<S, double>) _mm256_stream_pd(p, v);
  else _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow<S>(v));
#else
  vstore(p, v, Vectorized<compute_t<S>>::size());
#endif
}

}  // namespace
