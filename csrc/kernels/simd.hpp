// A minimal SIMD vocabulary, one definition per instruction set. Each ISA
// translation unit defines exactly one PYAD_TARGET_* macro before including
// this file and is compiled with that ISA's flags (see CMakeLists.txt), so the
// same kernel source (impl.hpp) is instantiated once per instruction set.
//
// Only what the kernels need: float vectors (load, fp16 load, arithmetic,
// horizontal reductions) and one int8 primitive (squared distance).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(PYAD_TARGET_AVX512) || defined(PYAD_TARGET_AVX2) || defined(PYAD_TARGET_SSE)
#include <immintrin.h>
#elif defined(PYAD_TARGET_NEON)
#include <arm_neon.h>
#endif

namespace PYAD_NS {

// IEEE half -> float without hardware support (denormals, inf and nan kept):
// shift exponent+mantissa into place and rescale by 2^112 (F. Giesen's method).
static inline float half_to_float(uint16_t h) {
    uint32_t expmant = h & 0x7fffu;
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t shifted = expmant << 13;
    float f, magic;
    uint32_t magic_bits = (254u - 15u) << 23;
    std::memcpy(&f, &shifted, 4);
    std::memcpy(&magic, &magic_bits, 4);
    f *= magic;
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    if (expmant > 0x7bffu) bits |= 255u << 23;  // inf / nan
    bits |= sign;
    std::memcpy(&f, &bits, 4);
    return f;
}

static inline int32_t sqdist_i8_scalar(const int8_t* a, const int8_t* b, int64_t n) {
    int32_t s = 0;
    for (int64_t i = 0; i < n; ++i) {
        int32_t t = int32_t(a[i]) - int32_t(b[i]);
        s += t * t;
    }
    return s;
}

// One float lane: the scalar ISA's vector, and every ISA's channel tail (impl.hpp's Winograd).
struct V1 {
    using reg = float;
    static constexpr int W = 1;
    static reg zero() { return 0.0f; }
    static reg set1(float v) { return v; }
    static reg load(const float* p) { return *p; }
    static reg load_h(const uint16_t* p) { return half_to_float(*p); }
    static void store(float* p, reg v) { *p = v; }
    static reg add(reg a, reg b) { return a + b; }
    static reg sub(reg a, reg b) { return a - b; }
    static reg mul(reg a, reg b) { return a * b; }
    static reg max(reg a, reg b) { return a > b ? a : b; }
    static reg fma(reg a, reg b, reg c) { return a * b + c; }
    static float hsum(reg v) { return v; }
    static float hmax(reg v) { return v; }
    static reg keep_first(reg v, int n) { return n > 0 ? v : 0.0f; }
    static bool any_lt(reg a, reg b) { return a < b; }
    static float cvt_h(uint16_t h) { return half_to_float(h); }
};

#if defined(PYAD_TARGET_AVX512)
struct V {
    using reg = __m512;
    static constexpr int W = 16;
    static reg zero() { return _mm512_setzero_ps(); }
    static reg set1(float v) { return _mm512_set1_ps(v); }
    static reg load(const float* p) { return _mm512_loadu_ps(p); }
    static reg load_h(const uint16_t* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
    static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
    static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
    static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
    static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
    static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
    static float hsum(reg v) { return _mm512_reduce_add_ps(v); }
    static float hmax(reg v) { return _mm512_reduce_max_ps(v); }
    // Lanes [0, n) of v, zeros elsewhere (0 <= n < W).
    static reg keep_first(reg v, int n) { return _mm512_maskz_mov_ps(__mmask16((1u << n) - 1), v); }
    // Whether a < b in any lane (false for NaN lanes).
    static bool any_lt(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ) != 0; }
    static float cvt_h(uint16_t h) { return _cvtsh_ss(h); }
};
static inline int32_t sqdist_i8(const int8_t* a, const int8_t* b, int64_t n) {
    __m512i acc = _mm512_setzero_si512();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512i x = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i)));
        __m512i y = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i)));
        __m512i t = _mm512_sub_epi16(x, y);
        acc = _mm512_add_epi32(acc, _mm512_madd_epi16(t, t));
    }
    return _mm512_reduce_add_epi32(acc) + sqdist_i8_scalar(a + i, b + i, n - i);
}

#elif defined(PYAD_TARGET_AVX2)
struct V {
    using reg = __m256;
    static constexpr int W = 8;
    static reg zero() { return _mm256_setzero_ps(); }
    static reg set1(float v) { return _mm256_set1_ps(v); }
    static reg load(const float* p) { return _mm256_loadu_ps(p); }
    static reg load_h(const uint16_t* p) {
        return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    }
    static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
    static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
    static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
    static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
    static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
    static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
    static float hsum(reg v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    static float hmax(reg v) {
        __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        s = _mm_max_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    static reg keep_first(reg v, int n) {
        __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        return _mm256_and_ps(v, _mm256_castsi256_ps(m));
    }
    static bool any_lt(reg a, reg b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LT_OQ)) != 0; }
    static float cvt_h(uint16_t h) { return _cvtsh_ss(h); }
};
static inline int32_t sqdist_i8(const int8_t* a, const int8_t* b, int64_t n) {
    __m256i acc = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i)));
        __m256i y = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i)));
        __m256i t = _mm256_sub_epi16(x, y);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(t, t));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s) + sqdist_i8_scalar(a + i, b + i, n - i);
}

#elif defined(PYAD_TARGET_SSE)
struct V {
    using reg = __m128;
    static constexpr int W = 4;
    static reg zero() { return _mm_setzero_ps(); }
    static reg set1(float v) { return _mm_set1_ps(v); }
    static reg load(const float* p) { return _mm_loadu_ps(p); }
    // SSE has no half conversion instruction: the same bit trick as
    // half_to_float, four lanes at a time.
    static reg load_h(const uint16_t* p) {
        __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
        const __m128i nosign = _mm_set1_epi32(0x7fff);
        const __m128 magic = _mm_castsi128_ps(_mm_set1_epi32((254 - 15) << 23));
        const __m128i infnan_limit = _mm_set1_epi32(0x7bff);
        const __m128 exp_infnan = _mm_castsi128_ps(_mm_set1_epi32(255 << 23));
        __m128i expmant = _mm_and_si128(nosign, h);
        __m128i sign = _mm_slli_epi32(_mm_xor_si128(h, expmant), 16);
        __m128 scaled = _mm_mul_ps(_mm_castsi128_ps(_mm_slli_epi32(expmant, 13)), magic);
        __m128 infnan = _mm_and_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(expmant, infnan_limit)), exp_infnan);
        return _mm_or_ps(scaled, _mm_or_ps(_mm_castsi128_ps(sign), infnan));
    }
    static void store(float* p, reg v) { _mm_storeu_ps(p, v); }
    static reg add(reg a, reg b) { return _mm_add_ps(a, b); }
    static reg sub(reg a, reg b) { return _mm_sub_ps(a, b); }
    static reg mul(reg a, reg b) { return _mm_mul_ps(a, b); }
    static reg max(reg a, reg b) { return _mm_max_ps(a, b); }
    static reg fma(reg a, reg b, reg c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
    static float hsum(reg s) {
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    static float hmax(reg s) {
        s = _mm_max_ps(s, _mm_movehl_ps(s, s));
        s = _mm_max_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    static reg keep_first(reg v, int n) {
        __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32(n), _mm_setr_epi32(0, 1, 2, 3));
        return _mm_and_ps(v, _mm_castsi128_ps(m));
    }
    static bool any_lt(reg a, reg b) { return _mm_movemask_ps(_mm_cmplt_ps(a, b)) != 0; }
    static float cvt_h(uint16_t h) { return half_to_float(h); }
};
static inline int32_t sqdist_i8(const int8_t* a, const int8_t* b, int64_t n) {
    __m128i acc = _mm_setzero_si128();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i x = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a + i)));
        __m128i y = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + i)));
        __m128i t = _mm_sub_epi16(x, y);
        acc = _mm_add_epi32(acc, _mm_madd_epi16(t, t));
    }
    acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0x4e));
    acc = _mm_add_epi32(acc, _mm_shuffle_epi32(acc, 0xb1));
    return _mm_cvtsi128_si32(acc) + sqdist_i8_scalar(a + i, b + i, n - i);
}

#elif defined(PYAD_TARGET_NEON)
struct V {
    using reg = float32x4_t;
    static constexpr int W = 4;
    static reg zero() { return vdupq_n_f32(0.0f); }
    static reg set1(float v) { return vdupq_n_f32(v); }
    static reg load(const float* p) { return vld1q_f32(p); }
    static reg load_h(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
    static void store(float* p, reg v) { vst1q_f32(p, v); }
    static reg add(reg a, reg b) { return vaddq_f32(a, b); }
    static reg sub(reg a, reg b) { return vsubq_f32(a, b); }
    static reg mul(reg a, reg b) { return vmulq_f32(a, b); }
    static reg max(reg a, reg b) { return vmaxq_f32(a, b); }
    static reg fma(reg a, reg b, reg c) { return vfmaq_f32(c, a, b); }
    static float hsum(reg v) { return vaddvq_f32(v); }
    static float hmax(reg v) { return vmaxvq_f32(v); }
    static reg keep_first(reg v, int n) {
        const uint32_t iota[4] = {0, 1, 2, 3};
        uint32x4_t m = vcltq_u32(vld1q_u32(iota), vdupq_n_u32(uint32_t(n)));
        return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), m));
    }
    static bool any_lt(reg a, reg b) { return vmaxvq_u32(vcltq_f32(a, b)) != 0; }
    static float cvt_h(uint16_t h) {
        __fp16 v;
        std::memcpy(&v, &h, 2);
        return float(v);
    }
};
static inline int32_t sqdist_i8(const int8_t* a, const int8_t* b, int64_t n) {
    int32x4_t acc = vdupq_n_s32(0);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        int16x8_t t = vsubl_s8(vld1_s8(a + i), vld1_s8(b + i));
        acc = vmlal_s16(acc, vget_low_s16(t), vget_low_s16(t));
        acc = vmlal_high_s16(acc, t, t);
    }
    return vaddvq_s32(acc) + sqdist_i8_scalar(a + i, b + i, n - i);
}

#elif defined(PYAD_TARGET_SCALAR)
using V = V1;
static inline int32_t sqdist_i8(const int8_t* a, const int8_t* b, int64_t n) {
    return sqdist_i8_scalar(a, b, n);
}
#else
#error "define one PYAD_TARGET_* before including simd.hpp"
#endif

}  // namespace PYAD_NS
