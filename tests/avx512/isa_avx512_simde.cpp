// pyad's AVX-512 kernels (csrc/kernels/isa_avx512.cpp, unchanged) compiled for a CPU
// without AVX-512: SIMDe (https://github.com/simd-everywhere/simde, Debian's libsimde-dev)
// maps every _mm512_* intrinsic to a portable implementation of the instruction's
// documented semantics, so the AVX-512 source runs lane for lane on AVX2 hardware.
// It proves the source's logic (lane counts, masks, tails, reductions, fp16 loads), not
// the compiler's AVX-512 code generation. Built and run by tests/avx512/run.sh.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#undef _mm512_madd_epi16  // SIMDe 0.7.4's alias takes the masked form's four arguments
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
// SIMDe 0.7.4 has no horizontal reductions: lane loops, in lane order.
static inline float pyad_reduce_add_ps(simde__m512 v) { simde__m512_private p = simde__m512_to_private(v); float s = 0; for (int i = 0; i < 16; ++i) s += p.f32[i]; return s; }
static inline float pyad_reduce_max_ps(simde__m512 v) { simde__m512_private p = simde__m512_to_private(v); float s = p.f32[0]; for (int i = 1; i < 16; ++i) s = p.f32[i] > s ? p.f32[i] : s; return s; }
static inline int pyad_reduce_add_epi32(simde__m512i v) { simde__m512i_private p = simde__m512i_to_private(v); int s = 0; for (int i = 0; i < 16; ++i) s += p.i32[i]; return s; }
#undef _mm512_reduce_add_ps
#undef _mm512_reduce_max_ps
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_ps(v) pyad_reduce_add_ps(v)
#define _mm512_reduce_max_ps(v) pyad_reduce_max_ps(v)
#define _mm512_reduce_add_epi32(v) pyad_reduce_add_epi32(v)
// ... nor _mm512_cvtph_ps: F16C's scalar conversion per lane.
static inline simde__m512 pyad_cvtph_ps(simde__m256i h) { simde__m256i_private p = simde__m256i_to_private(h); simde__m512_private r; for (int i = 0; i < 16; ++i) r.f32[i] = _cvtsh_ss(p.u16[i]); return simde__m512_from_private(r); }
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps(h) pyad_cvtph_ps(h)
#include "kernels/isa_avx512.cpp"
