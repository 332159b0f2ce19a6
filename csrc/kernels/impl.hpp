// The kernels, written once against the SIMD vocabulary of simd.hpp and
// compiled once per instruction set (isa_*.cpp). Everything here lives in the
// per-ISA namespace PYAD_NS and uses no out-of-line standard-library templates,
// so no code compiled for a wider ISA can be merged into a narrower one.
//
// Semantics are defined by the NumPy reference in pyad/kernels/reference.py.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "parallel.hpp"
#include "simd.hpp"
#include "table.hpp"

namespace PYAD_NS {

using pyad::KernelTable;

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Thread-private scratch, 64-byte aligned, freed at scope exit.
struct Scratch {
    float* p;
    explicit Scratch(int64_t n) {
        p = static_cast<float*>(std::aligned_alloc(64, ((n * 4 + 63) / 64) * 64 + 64));
    }
    ~Scratch() { std::free(p); }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
};

static inline V::reg ld(const float* p) { return V::load(p); }
static inline V::reg ld(const uint16_t* p) { return V::load_h(p); }
// ---------------------------------------------------------------------------
// Mahalanobis distance with a packed triangular factor (PaDiM, Defard et al.
// 2020, §3: M(x) = sqrt((x-mu)^T Sigma^-1 (x-mu)); Sigma^-1 = A^T A with A the
// inverse Cholesky factor, so M(x) = ||A (x-mu)||). Positions are independent;
// each factor is read once and applied to NB images held in registers.
// ---------------------------------------------------------------------------
static inline float tof(float v) { return v; }
static inline float tof(uint16_t v) { return V::cvt_h(v); }

// Few images: one row of A at a time, dotted with up to NB images' z (stride
// dz >= d + W, zero beyond d). A row's last partial vector is read whole and
// the extra lanes are zeroed on the z side, so rows need no scalar tail; the
// over-read stays inside the factor buffer (`avail` values from row start).
template <int NB, class T>
static void tri_rows(const T* a, int64_t avail, const float* z, int64_t dz, int64_t d, float* acc) {
    const T* row = a;
    for (int64_t i = 0; i < d; ++i) {
        const int64_t len = i + 1;
        V::reg s0[NB], s1[NB];
        for (int b = 0; b < NB; ++b) s0[b] = s1[b] = V::zero();
        int64_t j = 0;
        for (; j + 2 * V::W <= len; j += 2 * V::W) {
            V::reg a0 = ld(row + j), a1 = ld(row + j + V::W);
            for (int b = 0; b < NB; ++b) {
                s0[b] = V::fma(a0, V::load(z + b * dz + j), s0[b]);
                s1[b] = V::fma(a1, V::load(z + b * dz + j + V::W), s1[b]);
            }
        }
        for (; j + V::W <= len; j += V::W) {
            V::reg a0 = ld(row + j);
            for (int b = 0; b < NB; ++b) s0[b] = V::fma(a0, V::load(z + b * dz + j), s0[b]);
        }
        const int rem = static_cast<int>(len - j);
        if (rem > 0 && j + V::W <= avail) {
            V::reg a0 = ld(row + j);
            for (int b = 0; b < NB; ++b) s1[b] = V::fma(a0, V::keep_first(V::load(z + b * dz + j), rem), s1[b]);
            j = len;
        }
        float y[NB];
        for (int b = 0; b < NB; ++b) y[b] = V::hsum(V::add(s0[b], s1[b]));
        for (; j < len; ++j) {  // only at the very end of the buffer
            const float av = tof(row[j]);
            for (int b = 0; b < NB; ++b) y[b] += av * z[b * dz + j];
        }
        for (int b = 0; b < NB; ++b) acc[b] += y[b] * y[b];
        row += len;
        avail -= len;
    }
}

static inline V::reg bcast(const float* p) { return V::set1(*p); }
static inline V::reg bcast(const uint16_t* p) { return V::set1(V::cvt_h(*p)); }

// Many images: images across SIMD lanes (zt is [d][NV*W], image-minor), one
// broadcast factor entry feeds NV FMAs, two rows at a time share the z loads,
// and no horizontal sums are needed. sq[v] gets ||A z||^2 per lane.
template <int NV, class T>
static void tri_lanes(const T* a, const float* zt, int64_t d, V::reg* sq) {
    constexpr int S = NV * V::W;
    const T* row = a;
    for (int v = 0; v < NV; ++v) sq[v] = V::zero();
    int64_t i = 0;
    for (; i + 1 < d; i += 2) {
        const T* r1 = row + i + 1;
        V::reg y0[NV], y1[NV];
        for (int v = 0; v < NV; ++v) y0[v] = y1[v] = V::zero();
        for (int64_t j = 0; j <= i; ++j) {
            const V::reg b0 = bcast(row + j), b1 = bcast(r1 + j);
            for (int v = 0; v < NV; ++v) {
                const V::reg zv = V::load(zt + j * S + v * V::W);
                y0[v] = V::fma(b0, zv, y0[v]);
                y1[v] = V::fma(b1, zv, y1[v]);
            }
        }
        const V::reg b1 = bcast(r1 + i + 1);
        for (int v = 0; v < NV; ++v) {
            y1[v] = V::fma(b1, V::load(zt + (i + 1) * S + v * V::W), y1[v]);
            sq[v] = V::fma(y0[v], y0[v], sq[v]);
            sq[v] = V::fma(y1[v], y1[v], sq[v]);
        }
        row = r1 + i + 2;
    }
    if (i < d) {  // odd d: the last row alone
        V::reg y0[NV];
        for (int v = 0; v < NV; ++v) y0[v] = V::zero();
        for (int64_t j = 0; j <= i; ++j) {
            const V::reg b0 = bcast(row + j);
            for (int v = 0; v < NV; ++v) y0[v] = V::fma(b0, V::load(zt + j * S + v * V::W), y0[v]);
        }
        for (int v = 0; v < NV; ++v) sq[v] = V::fma(y0[v], y0[v], sq[v]);
    }
}

template <int NV, class T>
static void lanes_block(const float* x, int64_t n0, int nb, int64_t p, int64_t q, int64_t d, const float* mu,
                        const T* a, float* zt, float* out) {
    constexpr int S = NV * V::W;
    // Image-major: each image's row is read once, contiguously (the images are
    // P*d floats apart, and walking across them per channel thrashes L1 sets).
    for (int b = 0; b < S; ++b) {
        if (b < nb) {
            const float* xv = x + ((n0 + b) * p + q) * d;
            for (int64_t i = 0; i < d; ++i) zt[i * S + b] = xv[i] - mu[i];
        } else {
            for (int64_t i = 0; i < d; ++i) zt[i * S + b] = 0.0f;
        }
    }
    V::reg sq[NV];
    tri_lanes<NV>(a, zt, d, sq);
    float lanes[S];
    for (int v = 0; v < NV; ++v) V::store(lanes + v * V::W, sq[v]);
    for (int b = 0; b < nb; ++b) out[(n0 + b) * p + q] = std::sqrt(lanes[b]);
}

template <class T>
static void mahalanobis(const float* x, int64_t n, int64_t p, int64_t d, const float* mean,
                        const T* factor, float* out) {
    const int64_t tri = d * (d + 1) / 2;
    const int64_t dz = (d + V::W + 15) / 16 * 16;
    constexpr int kLanes = 4 * V::W;  // images per lane block
    const bool lanes = V::W > 1 && n >= V::W;
#pragma omp parallel num_threads(pyad::num_threads())
    {
        Scratch z(lanes ? d * kLanes : 4 * dz);
        if (!lanes)
            for (int64_t i = 0; i < 4 * dz; ++i) z.p[i] = 0.0f;
#pragma omp for schedule(static)
        for (int64_t q = 0; q < p; ++q) {
            const T* a = factor + q * tri;
            const int64_t avail = (p - q) * tri;
            const float* mu = mean + q * d;
            if (lanes) {
                for (int64_t n0 = 0; n0 < n; n0 += kLanes) {
                    const int nb = static_cast<int>(min64(kLanes, n - n0));
                    switch ((nb + V::W - 1) / V::W) {
                        case 4: lanes_block<4>(x, n0, nb, p, q, d, mu, a, z.p, out); break;
                        case 3: lanes_block<3>(x, n0, nb, p, q, d, mu, a, z.p, out); break;
                        case 2: lanes_block<2>(x, n0, nb, p, q, d, mu, a, z.p, out); break;
                        default: lanes_block<1>(x, n0, nb, p, q, d, mu, a, z.p, out); break;
                    }
                }
                continue;
            }
            for (int64_t n0 = 0; n0 < n; n0 += 4) {
                const int nb = static_cast<int>(min64(4, n - n0));
                for (int b = 0; b < nb; ++b) {
                    const float* xv = x + ((n0 + b) * p + q) * d;
                    for (int64_t i = 0; i < d; ++i) z.p[b * dz + i] = xv[i] - mu[i];
                }
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
                switch (nb) {
                    case 4: tri_rows<4>(a, avail, z.p, dz, d, acc); break;
                    case 3: tri_rows<3>(a, avail, z.p, dz, d, acc); break;
                    case 2: tri_rows<2>(a, avail, z.p, dz, d, acc); break;
                    default: tri_rows<1>(a, avail, z.p, dz, d, acc); break;
                }
                for (int b = 0; b < nb; ++b) out[(n0 + b) * p + q] = std::sqrt(acc[b]);
            }
        }
    }
}

static void mahalanobis_f32(const float* x, int64_t n, int64_t p, int64_t d, const float* mean,
                            const float* factor, float* out) {
    mahalanobis(x, n, p, d, mean, factor, out);
}
static void mahalanobis_f16(const float* x, int64_t n, int64_t p, int64_t d, const float* mean,
                            const uint16_t* factor, float* out) {
    mahalanobis(x, n, p, d, mean, factor, out);
}

// ---------------------------------------------------------------------------
// Greedy k-center selection (Sener & Savarese 2018; PatchCore, Roth et al.
// 2022, §3.2): repeatedly take the point farthest from the current selection.
// One fused pass per iteration updates the minimum distances and finds the
// next centre; ties go to the lowest index; a selected point is marked with a
// negative distance so it is never taken again (k = M gives a permutation).
// ---------------------------------------------------------------------------
// Squared distance of a stored row (float or half) to a float centre.
template <class T>
static inline float sqdist(const T* a, const float* c, int64_t d) {
    V::reg s0 = V::zero(), s1 = V::zero();
    int64_t j = 0;
    for (; j + 2 * V::W <= d; j += 2 * V::W) {
        V::reg t0 = V::sub(ld(a + j), V::load(c + j));
        V::reg t1 = V::sub(ld(a + j + V::W), V::load(c + j + V::W));
        s0 = V::fma(t0, t0, s0);
        s1 = V::fma(t1, t1, s1);
    }
    for (; j + V::W <= d; j += V::W) {
        V::reg t0 = V::sub(ld(a + j), V::load(c + j));
        s0 = V::fma(t0, t0, s0);
    }
    float s = V::hsum(V::add(s0, s1));
    for (; j < d; ++j) {
        float t = tof(a[j]) - c[j];
        s += t * t;
    }
    return s;
}

static inline int32_t sqdist(const int8_t* a, const int8_t* c, int64_t d) { return sqdist_i8(a, c, d); }

// The centre as the distance function wants it: float for float and half
// storage, the int8 row itself for int8 storage.
static inline void load_center(const float* x, int64_t d, float* c) {
    for (int64_t j = 0; j < d; ++j) c[j] = x[j];
}
static inline void load_center(const uint16_t* x, int64_t d, float* c) {
    for (int64_t j = 0; j < d; ++j) c[j] = half_to_float(x[j]);
}

template <class T>
struct CenterOf { using type = float; };
template <>
struct CenterOf<int8_t> { using type = int8_t; };

// Pruning (exact): each point remembers the centre it is nearest to (a).
// When centre c is added, d(x,c) >= d(a,c) - d(x,a), so d(a,c)^2 > 4 d(x,a)^2
// proves d(x,c) > d(x,a) and the point's row need not be read. The margin
// covers float rounding (none is needed for int8: exact integers); the tests
// compare against the brute-force NumPy reference, ties included.
template <class D>
static inline bool pruned(D cd2, D cur);
template <>
inline bool pruned<float>(float cd2, float cur) { return cd2 > 4.004f * cur; }
template <>
inline bool pruned<int32_t>(int32_t cd2, int32_t cur) { return int64_t(cd2) > 4 * int64_t(cur); }

template <class T, class D>
static void coreset(const T* x, int64_t m, int64_t d, int64_t k, int64_t start, D* mind, int64_t* idx) {
    // Below ~16k points the per-iteration barriers cost more than they save.
    const int nt = static_cast<int>(max64(1, min64(min64(pyad::num_threads(), 256), m / 16384)));
    int64_t best_idx[256];
    D best_val[256];
    int32_t* owner = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * m));  // iteration of nearest centre
    D* cd2 = static_cast<D*>(std::malloc(sizeof(D) * k));                     // centre-to-new-centre distances
    for (int64_t i = 0; i < m; ++i) owner[i] = -1;
    int64_t sel = start;
    if (sel < 0) {  // begin at the farthest point under the given distances
        D bv = mind[0];
        sel = 0;
        for (int64_t i = 1; i < m; ++i)
            if (mind[i] > bv) { bv = mind[i]; sel = i; }
    }
    mind[sel] = D(-1);
#pragma omp parallel num_threads(nt)
    {
        const int t = pyad_thread_num();
        const int nth = pyad_team_size();
        const int64_t per = ((m + nth - 1) / nth + 15) / 16 * 16;
        const int64_t lo = min64(m, t * per), hi = min64(m, lo + per);
        using C = typename CenterOf<T>::type;
        Scratch cbuf(d);
        for (int64_t it = 0; it < k; ++it) {
            const int64_t s = sel;
            const C* c;
            if constexpr (sizeof(C) == 1) {
                c = reinterpret_cast<const C*>(x + s * d);
            } else {
                load_center(x + s * d, d, cbuf.p);
                c = reinterpret_cast<const C*>(cbuf.p);
            }
            for (int64_t j = t; j < it; j += nth) cd2[j] = static_cast<D>(sqdist(x + idx[j] * d, c, d));
            if (t == 0) idx[it] = s;
#pragma omp barrier
            D bv = D(-1);
            int64_t bi = -1;
            for (int64_t i = lo; i < hi; ++i) {
                D cur = mind[i];
                if (cur < D(0)) continue;  // already selected
                const int32_t a = owner[i];
                if (a < 0 || !pruned(cd2[a], cur)) {
                    const D dd = static_cast<D>(sqdist(x + i * d, c, d));
                    if (dd < cur) { cur = dd; mind[i] = dd; owner[i] = static_cast<int32_t>(it); }
                }
                if (cur > bv) { bv = cur; bi = i; }
            }
            best_val[t] = bv;
            best_idx[t] = bi;
#pragma omp barrier
#pragma omp single
            {
                D gv = D(-1);
                int64_t gi = -1;
                for (int u = 0; u < nth; ++u)  // chunks are ordered: first max = lowest index
                    if (best_idx[u] >= 0 && best_val[u] > gv) { gv = best_val[u]; gi = best_idx[u]; }
                if (it + 1 < k) { sel = gi; mind[gi] = D(-1); }
            }
        }
    }
    for (int64_t i = 0; i < m; ++i)
        if (mind[i] < D(0)) mind[i] = D(0);
    std::free(owner);
    std::free(cd2);
}

static void coreset_f32(const float* x, int64_t m, int64_t d, int64_t k, int64_t start, float* mind,
                        int64_t* idx) {
    coreset(x, m, d, k, start, mind, idx);
}
static void coreset_f16(const uint16_t* x, int64_t m, int64_t d, int64_t k, int64_t start,
                        float* mind, int64_t* idx) {
    coreset(x, m, d, k, start, mind, idx);
}
static void coreset_i8(const int8_t* x, int64_t m, int64_t d, int64_t k, int64_t start,
                       int32_t* mind, int64_t* idx) {
    coreset(x, m, d, k, start, mind, idx);
}

// ---------------------------------------------------------------------------
// Patch pooling and PatchCore's embedding (Roth et al. 2022, §3.1: local
// neighbourhood aggregation; seed 003 §3.5.2: pooling variants). Work unit:
// one output row of one image. The row is built channel-first in scratch
// (each entry a contiguous run over output columns, so SIMD runs along the
// row), then written transposed into the channels-last output.
// ---------------------------------------------------------------------------
struct Geometry {
    int64_t c, h, w, ho, wo;
    int k, s, p;
};

// Columns [lo, hi) of the output row read input column wo*s + off inside [0, w).
static inline void valid_cols(const Geometry& g, int64_t off, int64_t* lo, int64_t* hi) {
    int64_t a = off >= 0 ? 0 : (-off + g.s - 1) / g.s;
    int64_t b = (g.w - 1 - off) < 0 ? 0 : (g.w - 1 - off) / g.s + 1;
    *lo = a;
    *hi = min64(b, g.wo);
}

static inline void add_run(float* acc, const float* row, int64_t lo, int64_t hi, int64_t off, int s) {
    if (s == 1) {
        const float* src = row + off;
        int64_t j = lo;
        for (; j + V::W <= hi; j += V::W) V::store(acc + j, V::add(V::load(acc + j), V::load(src + j)));
        for (; j < hi; ++j) acc[j] += src[j];
    } else {
        for (int64_t j = lo; j < hi; ++j) acc[j] += row[j * s + off];
    }
}

static inline void max_run(float* acc, const float* row, int64_t lo, int64_t hi, int64_t off, int s) {
    if (s == 1) {
        const float* src = row + off;
        int64_t j = lo;
        for (; j + V::W <= hi; j += V::W) V::store(acc + j, V::max(V::load(acc + j), V::load(src + j)));
        for (; j < hi; ++j) acc[j] = acc[j] > src[j] ? acc[j] : src[j];
    } else {
        for (int64_t j = lo; j < hi; ++j) {
            float v = row[j * s + off];
            acc[j] = acc[j] > v ? acc[j] : v;
        }
    }
}

static inline void scale_run(float* acc, int64_t n, float f) {
    V::reg vf = V::set1(f);
    int64_t j = 0;
    for (; j + V::W <= n; j += V::W) V::store(acc + j, V::mul(V::load(acc + j), vf));
    for (; j < n; ++j) acc[j] *= f;
}

// Pooled output row `ho` of one channel plane into acc[0..wo).
static void pool_row(const float* plane, const Geometry& g, int64_t ho, bool is_max, float* acc) {
    const float init = is_max ? -std::numeric_limits<float>::infinity() : 0.0f;
    for (int64_t j = 0; j < g.wo; ++j) acc[j] = init;
    for (int kh = 0; kh < g.k; ++kh) {
        const int64_t r = ho * g.s + kh - g.p;
        if (r < 0 || r >= g.h) continue;  // zero padding: adds nothing / ignored by max
        const float* row = plane + r * g.w;
        for (int kw = 0; kw < g.k; ++kw) {
            const int64_t off = kw - g.p;
            int64_t lo, hi;
            valid_cols(g, off, &lo, &hi);
            if (is_max) max_run(acc, row, lo, hi, off, g.s);
            else add_run(acc, row, lo, hi, off, g.s);
        }
    }
    if (!is_max) scale_run(acc, g.wo, 1.0f / float(g.k * g.k));  // count_include_pad
}

// Sum of the unfolded neighbourhood entries f in [f0, f1) (f = c*k*k + kh*k + kw)
// for output row `ho` into acc[0..wo).
static void unfold_sum(const float* img, const Geometry& g, int64_t ho, int64_t f0, int64_t f1, float* acc) {
    const int64_t kk = int64_t(g.k) * g.k;
    for (int64_t f = f0; f < f1; ++f) {
        const int64_t c = f / kk, rem = f % kk;
        const int64_t r = ho * g.s + rem / g.k - g.p;
        if (r < 0 || r >= g.h) continue;
        const int64_t off = rem % g.k - g.p;
        int64_t lo, hi;
        valid_cols(g, off, &lo, &hi);
        add_run(acc, img + (c * g.h + r) * g.w, lo, hi, off, g.s);
    }
}

// Adaptive average pooling bins (torch adaptive_avg_pool1d): bin i of n over
// length l covers [floor(i*l/n), ceil((i+1)*l/n)).
static inline int64_t bin_lo(int64_t i, int64_t l, int64_t n) { return (i * l) / n; }
static inline int64_t bin_hi(int64_t i, int64_t l, int64_t n) { return ((i + 1) * l + n - 1) / n; }

static void embed(const float* x, int64_t nb, const Geometry& g, int mode, int64_t dout, float* out) {
    const bool unfold = mode == pyad::kUnfold;
    const int64_t planes = mode == pyad::kAvgMax ? 2 * g.c : g.c;       // pooled channels
    const int64_t l = unfold ? g.c * g.k * g.k : planes;                // length binned to dout
    const bool identity = !unfold && dout == planes;                    // pure pooling
#pragma omp parallel num_threads(pyad::num_threads())
    {
        Scratch rows(identity || unfold ? 0 : planes * g.wo);  // pooled rows of all channels
        Scratch tmp(dout * g.wo);                              // [dout, wo] before transposing
#pragma omp for schedule(static) collapse(2)
        for (int64_t b = 0; b < nb; ++b) {
            for (int64_t ho = 0; ho < g.ho; ++ho) {
                const float* img = x + b * g.c * g.h * g.w;
                if (unfold) {
                    for (int64_t i = 0; i < dout; ++i) {
                        const int64_t f0 = bin_lo(i, l, dout), f1 = bin_hi(i, l, dout);
                        float* acc = tmp.p + i * g.wo;
                        for (int64_t j = 0; j < g.wo; ++j) acc[j] = 0.0f;
                        unfold_sum(img, g, ho, f0, f1, acc);
                        scale_run(acc, g.wo, 1.0f / float(f1 - f0));
                    }
                } else {
                    float* pooled = identity ? tmp.p : rows.p;
                    for (int64_t c = 0; c < g.c; ++c) {
                        const float* plane = img + c * g.h * g.w;
                        if (mode != pyad::kMax) pool_row(plane, g, ho, false, pooled + c * g.wo);
                        if (mode == pyad::kMax) pool_row(plane, g, ho, true, pooled + c * g.wo);
                        if (mode == pyad::kAvgMax) pool_row(plane, g, ho, true, pooled + (g.c + c) * g.wo);
                    }
                    if (!identity) {
                        for (int64_t i = 0; i < dout; ++i) {
                            const int64_t c0 = bin_lo(i, l, dout), c1 = bin_hi(i, l, dout);
                            float* acc = tmp.p + i * g.wo;
                            for (int64_t j = 0; j < g.wo; ++j) acc[j] = 0.0f;
                            for (int64_t c = c0; c < c1; ++c) add_run(acc, pooled + c * g.wo, 0, g.wo, 0, 1);
                            scale_run(acc, g.wo, 1.0f / float(c1 - c0));
                        }
                    }
                }
                // transpose [dout, wo] -> out[b, ho, wo, dout]
                float* dst = out + (b * g.ho + ho) * g.wo * dout;
                for (int64_t j = 0; j < g.wo; ++j)
                    for (int64_t i = 0; i < dout; ++i) dst[j * dout + i] = tmp.p[i * g.wo + j];
            }
        }
    }
}

static Geometry geometry(int64_t c, int64_t h, int64_t w, int k, int s, int p) {
    Geometry g{c, h, w, (h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1, k, s, p};
    return g;
}

static void patch_pool(const float* x, int64_t b, int64_t c, int64_t h, int64_t w, int k, int s, int p,
                       int mode, float* out) {
    Geometry g = geometry(c, h, w, k, s, p);
    embed(x, b, g, mode, mode == pyad::kAvgMax ? 2 * c : c, out);
}

static void patch_embed(const float* x, int64_t b, int64_t c, int64_t h, int64_t w, int k, int s, int p,
                        int mode, int64_t d, float* out) {
    embed(x, b, geometry(c, h, w, k, s, p), mode, d, out);
}

static void channel_pool(const float* x, int64_t r, int64_t l, int64_t d, float* out) {
#pragma omp parallel for num_threads(pyad::num_threads()) schedule(static)
    for (int64_t q = 0; q < r; ++q) {
        const float* src = x + q * l;
        float* dst = out + q * d;
        for (int64_t i = 0; i < d; ++i) {
            const int64_t a = bin_lo(i, l, d), e = bin_hi(i, l, d);
            float s = 0.0f;
            for (int64_t j = a; j < e; ++j) s += src[j];
            dst[i] = s / float(e - a);
        }
    }
}

// ---------------------------------------------------------------------------
// Gaussian factors (PaDiM's fit): per position, Sigma = (S2 - s1 s1^T / n) / (n - 1)
// + eps I from the packed float64 sums of pyad/kernels/gaussian.py, its Cholesky
// factor L (row by row: each entry one dot product of two row prefixes) and
// A = L^-1 (row i = (e_i - sum_{k<i} L_ik A_k) / L_ii: axpys of earlier rows), all
// in float64 and in cache; A goes out packed as float32 and, when `dense` is given,
// as d x d float64 (zeros above the diagonal). Both loops are d^3/6 multiply-adds
// on contiguous rows, against LAPACK's per-matrix calls plus a triangular solve
// with the identity (d^3/2). Returns the first position whose covariance is not
// positive definite, or -1.
// ---------------------------------------------------------------------------
// sum a[k] b[k], k < n, in 8 independent partial sums: without reassociation the
// compiler keeps one serial chain (4 cycles per term); this form it vectorises.
static inline double dot64(const double* a, const double* b, int64_t n) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int u = 0; u < 8; ++u) acc[u] += a[k + u] * b[k + u];
    double s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; k < n; ++k) s += a[k] * b[k];
    return s;
}

// Held-out distances from A (see gaussian.py's finalize for the derivation): the h
// held-out images' deviations hx [h, d] from the accumulator's shift, of N images in all;
// with n = N - h, c = (N-1)/(n-1), V = [x_j - mu_h (j < h), sqrt(nh/N)(mu_h - mu_n)] /
// sqrt(n-1), W = A V, Y = A (x - mu_n): d2_j = |y_j|^2/c + b_j^T (I - W^T W/c)^-1 b_j,
// b = W^T y_j / c. Scratch: work [(2h+1)(d) + 2(h+1)^2 + (h+1)h + 2d]. False if the
// small Gram matrix is not positive definite.
static bool downdate(const double* A, const double* s1, const double* hx, int64_t d, int64_t h, double N,
                     double* work, float* out) {
    const int64_t r = h + 1;
    const double n = N - h, c = (N - 1.0) / (n - 1.0), root = 1.0 / std::sqrt(n - 1.0);
    double* u = work;            // [r][d]
    double* y = u + r * d;       // [h][d]
    double* g = y + h * d;       // [r][r]
    double* b = g + r * r;       // [r][h]
    double* muh = b + r * h;     // [d]
    double* mun = muh + d;       // [d]
    for (int64_t i = 0; i < d; ++i) {
        double s = 0.0;
        for (int64_t j = 0; j < h; ++j) s += hx[j * d + i];
        muh[i] = s / double(h);
        mun[i] = (s1[i] - double(h) * muh[i]) / n;  // N * mean_all = s1 (deviations from the shift)
    }
    const double tail = std::sqrt(n * double(h) / N) * root;
    for (int64_t j = 0; j < h; ++j)
        for (int64_t i = 0; i < d; ++i) u[j * d + i] = (hx[j * d + i] - muh[i]) * root;
    for (int64_t i = 0; i < d; ++i) u[h * d + i] = tail * (muh[i] - mun[i]);
    for (int64_t j = 0; j < h; ++j)
        for (int64_t i = 0; i < d; ++i) y[j * d + i] = hx[j * d + i] - mun[i];
    // W = A U and Y = A Z in place, last row first (row i needs entries <= i of the input)
    for (int64_t i = d - 1; i >= 0; --i) {
        const double* ai = A + i * (i + 1) / 2;
        for (int64_t j = 0; j < r; ++j) u[j * d + i] = dot64(ai, u + j * d, i + 1);
        for (int64_t j = 0; j < h; ++j) y[j * d + i] = dot64(ai, y + j * d, i + 1);
    }
    for (int64_t a = 0; a < r; ++a) {
        for (int64_t e = 0; e <= a; ++e) g[a * r + e] = (a == e ? 1.0 : 0.0) - dot64(u + a * d, u + e * d, d) / c;
        for (int64_t j = 0; j < h; ++j) b[a * h + j] = dot64(u + a * d, y + j * d, d) / c;
    }
    for (int64_t a = 0; a < r; ++a) {  // Cholesky of g in place (lower)
        for (int64_t e = 0; e <= a; ++e) {
            double v = g[a * r + e];
            for (int64_t k = 0; k < e; ++k) v -= g[a * r + k] * g[e * r + k];
            if (a == e) {
                if (!(v > 0.0)) return false;
                g[a * r + a] = std::sqrt(v);
            } else {
                g[a * r + e] = v / g[e * r + e];
            }
        }
    }
    for (int64_t j = 0; j < h; ++j) {  // b_j^T g^-1 b_j = |R^-1 b_j|^2 with g = R R^T
        double q = 0.0;
        for (int64_t a = 0; a < r; ++a) {
            double t = b[a * h + j];
            for (int64_t k = 0; k < a; ++k) t -= g[a * r + k] * b[k * h + j];
            t /= g[a * r + a];
            b[a * h + j] = t;
            q += t * t;
        }
        const double d2 = dot64(y + j * d, y + j * d, d) / c + q;
        out[j] = static_cast<float>(std::sqrt(d2 > 0.0 ? d2 : 0.0));
    }
    return true;
}

static int64_t gaussian_factor(const double* s2, const double* s1, int64_t p, int64_t d, double n, double eps,
                               float* packed, const double* held, int64_t h, float* held_out) {
    const int64_t t = d * (d + 1) / 2;
    int64_t bad = -1;
#pragma omp parallel num_threads(pyad::num_threads())
    {
        double* L = static_cast<double*>(std::aligned_alloc(64, ((t * 8 + 63) / 64) * 64));
        double* A = static_cast<double*>(std::aligned_alloc(64, ((t * 8 + 63) / 64) * 64));
        double* inv = static_cast<double*>(std::aligned_alloc(64, ((d * 8 + 63) / 64) * 64));  // 1 / L_jj
        const int64_t nw = (2 * h + 1) * d + 2 * (h + 1) * (h + 1) + (h + 1) * h + 2 * d;
        double* work = held ? static_cast<double*>(std::aligned_alloc(64, ((nw * 8 + 63) / 64) * 64)) : nullptr;
#pragma omp for schedule(static)
        for (int64_t q = 0; q < p; ++q) {
            const double* S = s2 + q * t;
            const double* m = s1 + q * d;
            bool ok = true;
            for (int64_t i = 0; i < d && ok; ++i) {
                double* li = L + i * (i + 1) / 2;
                for (int64_t j = 0; j <= i; ++j) {
                    const double* lj = L + j * (j + 1) / 2;
                    // as gaussian.py's finalize: (S2 - s1_i (s1_j / n)) / (n - 1), then + eps
                    double v = (S[i * (i + 1) / 2 + j] - m[i] * (m[j] / n)) / (n - 1.0);
                    if (i == j) v += eps;
                    v -= dot64(li, lj, j);
                    if (i == j) {
                        if (!(v > 0.0)) { ok = false; break; }
                        li[i] = std::sqrt(v);
                        inv[i] = 1.0 / li[i];
                    } else {
                        li[j] = v * inv[j];  // a multiply, not a divide per entry
                    }
                }
            }
            if (!ok) {
#pragma omp critical
                if (bad < 0 || q < bad) bad = q;
                continue;
            }
            for (int64_t i = 0; i < d; ++i) {
                double* ai = A + i * (i + 1) / 2;
                const double* li = L + i * (i + 1) / 2;
                for (int64_t j = 0; j < i; ++j) ai[j] = 0.0;
                ai[i] = 1.0;
                for (int64_t k = 0; k < i; ++k) {
                    const double c = li[k];
                    const double* ak = A + k * (k + 1) / 2;
                    for (int64_t j = 0; j <= k; ++j) ai[j] -= c * ak[j];
                }
                const double r = inv[i];
                for (int64_t j = 0; j <= i; ++j) ai[j] *= r;
            }
            float* out = packed + q * t;
            for (int64_t e = 0; e < t; ++e) out[e] = static_cast<float>(A[e]);
            if (held && !downdate(A, m, held + q * h * d, d, h, n, work, held_out + q * h)) {
#pragma omp critical
                if (bad < 0 || q < bad) bad = q;
            }
        }
        std::free(L);
        std::free(A);
        std::free(inv);
        std::free(work);
    }
    return bad;
}

// Double-precision vectors of this ISA's register width (at least two lanes), for the
// register-blocked outer-product sums below; GCC's generic vectors lower to each ISA.
constexpr int kDoubleBytes = V::W * 4 >= 16 ? V::W * 4 : 16;
typedef double vdouble __attribute__((vector_size(kDoubleBytes)));
constexpr int kDL = kDoubleBytes / 8;  // lanes

static inline __attribute__((always_inline)) vdouble load_vd(const double* p) {
    vdouble v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

// S (packed lower triangle, d(d+1)/2) += Y^T Y for Y = y [kn, dp] (rows zero-padded past d):
// 4 x 2kL blocks of the product held in 8 registers over all kn images, then added to S once.
static void packed_syrk(const double* __restrict y, int64_t kn, int64_t dp, int64_t d, double* __restrict S) {
    for (int64_t i0 = 0; i0 < d; i0 += 4) {
        for (int64_t j0 = 0; j0 <= min64(i0 + 3, d - 1); j0 += 2 * kDL) {
            vdouble c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
            for (int64_t k = 0; k < kn; ++k) {
                const double* yk = y + k * dp;
                const vdouble a = load_vd(yk + j0), b = load_vd(yk + j0 + kDL);
                const double y0 = yk[i0], y1 = yk[i0 + 1], y2 = yk[i0 + 2], y3 = yk[i0 + 3];
                c00 += y0 * a; c01 += y0 * b;
                c10 += y1 * a; c11 += y1 * b;
                c20 += y2 * a; c21 += y2 * b;
                c30 += y3 * a; c31 += y3 * b;
            }
            double c[4][2 * kDL];
            std::memcpy(c[0], &c00, sizeof c00); std::memcpy(c[0] + kDL, &c01, sizeof c01);
            std::memcpy(c[1], &c10, sizeof c10); std::memcpy(c[1] + kDL, &c11, sizeof c11);
            std::memcpy(c[2], &c20, sizeof c20); std::memcpy(c[2] + kDL, &c21, sizeof c21);
            std::memcpy(c[3], &c30, sizeof c30); std::memcpy(c[3] + kDL, &c31, sizeof c31);
            for (int r = 0; r < 4 && i0 + r < d; ++r) {
                const int64_t i = i0 + r;
                double* row = S + i * (i + 1) / 2;
                const int64_t e = min64(2 * kDL, i - j0 + 1);
                for (int64_t v = 0; v < e; ++v) row[j0 + v] += c[r][v];
            }
        }
    }
}

// The streaming Gaussian update: y_k = x[k, q] - shift[q] in float64 for each of the n images,
// s1[q] += sum_k y_k and s2[q] += the packed lower triangle of sum_k y_k y_k^T, per position in
// cache (position-parallel, images in blocks of 64).
static void gaussian_update(const float* x, int64_t n, int64_t p, int64_t d, const float* shift, double* s1,
                            double* s2) {
    const int64_t t = d * (d + 1) / 2;
    const int64_t nb = min64(n, 64);
    const int64_t dp = (d + 3) / 4 * 4 + 2 * kDL;  // padded rows: whole 4-row and 2kL-column blocks
#pragma omp parallel num_threads(pyad::num_threads())
    {
        const int64_t bytes = ((nb * dp * 8 + 63) / 64) * 64;
        double* y = static_cast<double*>(std::aligned_alloc(64, bytes));
        std::memset(y, 0, bytes);
#pragma omp for schedule(static)
        for (int64_t q = 0; q < p; ++q) {
            double* m = s1 + q * d;
            const float* c = shift + q * d;
            for (int64_t k0 = 0; k0 < n; k0 += nb) {
                const int64_t kn = min64(nb, n - k0);
                for (int64_t k = 0; k < kn; ++k) {
                    const float* xk = x + ((k0 + k) * p + q) * d;
                    double* yk = y + k * dp;
                    for (int64_t i = 0; i < d; ++i) {
                        yk[i] = double(xk[i]) - double(c[i]);
                        m[i] += yk[i];
                    }
                }
                packed_syrk(y, kn, dp, d, s2 + q * t);
            }
        }
        std::free(y);
    }
}

// ---------------------------------------------------------------------------
// Winograd convolutions F(4x4, 3x3) and F(3x3, 4x4) (Lavin & Gray, CVPR 2016), the
// transforms only: an r x r stride-1 convolution (r = 3 or 4) becomes, per 6x6 input
// tile d (m x m outputs, m = 7 - r), 36 independent channel GEMMs M = V U with
// V = B^T d B and U = G g G^T (the weights, transformed once in Python), and
// Y = A^T M A. Interpolation points 0, +-1, +-2 and infinity for both: B^T is the same
// matrix, A^T (m x 6) differs in its last row (reference.py derives and tests them).
// The Python layer runs the GEMMs (torch.bmm); these loops do the memory-bound parts
// channels-last, one SIMD vector of channels at a time. x [b, h, w, c], zero padding
// `pad`; output ho = h + 2 pad - r + 1 (same for w); tiles t = (n th + ty) tw + tx,
// th = ceil(ho / m), tw = ceil(wo / m); a call handles tiles [t0, t0 + tc) and
// v / m are [36, tc, c] / [36, tc, k].
// ---------------------------------------------------------------------------
// B^T d for one column of 6 values (in place, d[i * step])
template <class R>
static inline void wino_bt(typename R::reg* d, int step) {
    using reg = typename R::reg;
    const reg d0 = d[0], d1 = d[step], d2 = d[2 * step], d3 = d[3 * step], d4 = d[4 * step], d5 = d[5 * step];
    const reg four = R::set1(4.0f), mfour = R::set1(-4.0f), mfive = R::set1(-5.0f), two = R::set1(2.0f);
    d[0] = R::fma(mfive, d2, R::fma(four, d0, d4));
    d[step] = R::fma(mfour, R::add(d1, d2), R::add(d3, d4));
    d[2 * step] = R::fma(four, R::sub(d1, d2), R::sub(d4, d3));
    d[3 * step] = R::fma(two, R::sub(d3, d1), R::sub(d4, d2));
    d[4 * step] = R::fma(two, R::sub(d1, d3), R::sub(d4, d2));
    d[5 * step] = R::fma(mfive, d3, R::fma(four, d1, d5));
}

// A^T m for 6 values m[i * step] -> M = 7 - r values o[i * ostep]
template <class R, int M>
static inline void wino_at(const typename R::reg* m, int step, typename R::reg* o, int ostep) {
    using reg = typename R::reg;
    const reg a = R::add(m[step], m[2 * step]), b = R::sub(m[step], m[2 * step]);
    const reg c = R::add(m[3 * step], m[4 * step]), e = R::sub(m[3 * step], m[4 * step]);
    o[0] = R::add(R::add(m[0], a), c);
    o[ostep] = R::fma(R::set1(2.0f), e, b);
    if (M == 4) {
        o[2 * ostep] = R::fma(R::set1(4.0f), c, a);
        o[3 * ostep] = R::add(R::fma(R::set1(8.0f), e, b), m[5 * step]);
    } else {
        o[2 * ostep] = R::add(R::fma(R::set1(4.0f), c, a), m[5 * step]);
    }
}

struct WinoGeometry {
    int64_t b, h, w, ho, wo, th, tw;
    int m;
};

static WinoGeometry wino_geometry(int64_t b, int64_t h, int64_t w, int64_t ho, int64_t wo, int r) {
    const int m = 7 - r;
    return WinoGeometry{b, h, w, ho, wo, (ho + m - 1) / m, (wo + m - 1) / m, m};
}

template <class R>
static inline void wino_in_tile(const float* x, const WinoGeometry& g, int64_t c, int64_t n, int64_t y0, int64_t x0,
                                int64_t ch, float* v, int64_t vstride) {
    using reg = typename R::reg;
    reg d[36];
    for (int i = 0; i < 6; ++i) {
        const int64_t y = y0 + i;
        for (int j = 0; j < 6; ++j) {
            const int64_t xx = x0 + j;
            d[i * 6 + j] = (y >= 0 && y < g.h && xx >= 0 && xx < g.w) ? R::load(x + ((n * g.h + y) * g.w + xx) * c + ch)
                                                                       : R::zero();
        }
    }
    for (int j = 0; j < 6; ++j) wino_bt<R>(d + j, 6);      // columns: B^T d
    for (int i = 0; i < 6; ++i) wino_bt<R>(d + i * 6, 1);  // rows: (B^T d) B
    for (int e = 0; e < 36; ++e) R::store(v + e * vstride + ch, d[e]);
}

static void winograd_input(const float* x, int64_t b, int64_t h, int64_t w, int64_t c, int r, int pad, int64_t t0,
                           int64_t tc, float* v) {
    const WinoGeometry g = wino_geometry(b, h, w, h + 2 * pad - r + 1, w + 2 * pad - r + 1, r);
    const int64_t vstride = tc * c;
#pragma omp parallel for num_threads(pyad::num_threads()) schedule(static)
    for (int64_t t = 0; t < tc; ++t) {
        const int64_t tile = t0 + t, n = tile / (g.th * g.tw), q = tile % (g.th * g.tw);
        const int64_t y0 = (q / g.tw) * g.m - pad, x0 = (q % g.tw) * g.m - pad;
        float* vt = v + t * c;
        int64_t ch = 0;
        for (; ch + V::W <= c; ch += V::W) wino_in_tile<V>(x, g, c, n, y0, x0, ch, vt, vstride);
        for (; ch < c; ++ch) wino_in_tile<V1>(x, g, c, n, y0, x0, ch, vt, vstride);
    }
}

template <class R, int M>
static inline void wino_out_tile(const float* m, int64_t mstride, const WinoGeometry& g, int64_t k, int64_t n,
                                 int64_t y0, int64_t x0, int64_t ch, const float* bias, const float* res, bool relu,
                                 float* out) {
    using reg = typename R::reg;
    reg q[36], t[6 * M], o[M * M];
    for (int e = 0; e < 36; ++e) q[e] = R::load(m + e * mstride + ch);
    for (int j = 0; j < 6; ++j) wino_at<R, M>(q + j, 6, t + j, 6);          // columns: A^T M -> t [M][6]
    for (int i = 0; i < M; ++i) wino_at<R, M>(t + i * 6, 1, o + i * M, 1);  // rows: (A^T M) A -> o [M][M]
    const reg bv = bias ? R::load(bias + ch) : R::zero();
    for (int i = 0; i < M; ++i) {
        const int64_t y = y0 + i;
        if (y >= g.ho) break;
        for (int j = 0; j < M; ++j) {
            const int64_t xx = x0 + j;
            if (xx >= g.wo) break;
            const int64_t at = ((n * g.ho + y) * g.wo + xx) * k + ch;
            reg r = R::add(o[i * M + j], bv);
            if (res) r = R::add(r, R::load(res + at));
            if (relu) r = R::max(r, R::zero());
            R::store(out + at, r);
        }
    }
}

template <int M>
static void wino_output(const float* m, const WinoGeometry& g, int64_t k, int64_t t0, int64_t tc, const float* bias,
                        const float* res, int relu, float* out) {
    const int64_t mstride = tc * k;
#pragma omp parallel for num_threads(pyad::num_threads()) schedule(static)
    for (int64_t t = 0; t < tc; ++t) {
        const int64_t tile = t0 + t, n = tile / (g.th * g.tw), q = tile % (g.th * g.tw);
        const int64_t y0 = (q / g.tw) * M, x0 = (q % g.tw) * M;
        const float* mt = m + t * k;
        int64_t ch = 0;
        for (; ch + V::W <= k; ch += V::W)
            wino_out_tile<V, M>(mt, mstride, g, k, n, y0, x0, ch, bias, res, relu, out);
        for (; ch < k; ++ch) wino_out_tile<V1, M>(mt, mstride, g, k, n, y0, x0, ch, bias, res, relu, out);
    }
}

static void winograd_output(const float* m, int64_t b, int64_t ho, int64_t wo, int64_t k, int r, int64_t t0,
                            int64_t tc, const float* bias, const float* res, int relu, float* out) {
    const WinoGeometry g = wino_geometry(b, 0, 0, ho, wo, r);
    if (r == 3)
        wino_output<4>(m, g, k, t0, tc, bias, res, relu, out);
    else
        wino_output<3>(m, g, k, t0, tc, bias, res, relu, out);
}

// A u for M values u[i * step] (A = the transpose of A^T) -> 6 values o[a * ostep]: the adjoint of
// wino_at, for the weight gradient's output-gradient transform
template <class R, int M>
static inline void wino_a(const typename R::reg* u, int step, typename R::reg* o, int ostep) {
    using reg = typename R::reg;
    const reg u0 = u[0], u1 = u[step], u2 = u[2 * step], u3 = M == 4 ? u[3 * step] : R::zero();
    const reg p = R::add(u0, u2), q = R::add(u1, u3);
    const reg p4 = R::fma(R::set1(4.0f), u2, u0), q8 = R::fma(R::set1(8.0f), u3, R::add(u1, u1));
    o[0] = u0;
    o[ostep] = R::add(p, q);
    o[2 * ostep] = R::sub(p, q);
    o[3 * ostep] = R::add(p4, q8);
    o[4 * ostep] = R::sub(p4, q8);
    o[5 * ostep] = M == 4 ? u3 : u2;
}

template <class R, int M>
static inline void wino_out_grad_tile(const float* dy, const WinoGeometry& g, int64_t k, int64_t n, int64_t y0,
                                      int64_t x0, int64_t ch, float* out, int64_t ostride) {
    using reg = typename R::reg;
    reg u[M * M], t[6 * M], o[36];
    for (int i = 0; i < M; ++i) {
        const int64_t y = y0 + i;
        for (int j = 0; j < M; ++j) {
            const int64_t xx = x0 + j;
            u[i * M + j] = (y < g.ho && xx < g.wo) ? R::load(dy + ((n * g.ho + y) * g.wo + xx) * k + ch) : R::zero();
        }
    }
    for (int j = 0; j < M; ++j) wino_a<R, M>(u + j, M, t + j, M);          // columns: A dY -> t [6][M]
    for (int a = 0; a < 6; ++a) wino_a<R, M>(t + a * M, 1, o + a * 6, 1);  // rows: (A dY) A^T -> o [6][6]
    for (int e = 0; e < 36; ++e) R::store(out + e * ostride + ch, o[e]);
}

template <int M>
static void wino_output_grad(const float* dy, const WinoGeometry& g, int64_t k, int64_t t0, int64_t tc, float* out) {
    const int64_t ostride = tc * k;
#pragma omp parallel for num_threads(pyad::num_threads()) schedule(static)
    for (int64_t t = 0; t < tc; ++t) {
        const int64_t tile = t0 + t, n = tile / (g.th * g.tw), q = tile % (g.th * g.tw);
        const int64_t y0 = (q / g.tw) * M, x0 = (q % g.tw) * M;
        float* ot = out + t * k;
        int64_t ch = 0;
        for (; ch + V::W <= k; ch += V::W) wino_out_grad_tile<V, M>(dy, g, k, n, y0, x0, ch, ot, ostride);
        for (; ch < k; ++ch) wino_out_grad_tile<V1, M>(dy, g, k, n, y0, x0, ch, ot, ostride);
    }
}

static void winograd_output_grad(const float* dy, int64_t b, int64_t ho, int64_t wo, int64_t k, int r, int64_t t0,
                                 int64_t tc, float* out) {
    const WinoGeometry g = wino_geometry(b, 0, 0, ho, wo, r);
    if (r == 3)
        wino_output_grad<4>(dy, g, k, t0, tc, out);
    else
        wino_output_grad<3>(dy, g, k, t0, tc, out);
}

// ---------------------------------------------------------------------------
// Exact k-nearest neighbours by blocks (pyad/kernels/knn.py). torch computes the GEMM
// g = q b^T of one block of bank rows; this merges s = ||b||^2 - 2 q.b (the squared
// distance less ||q||^2) into each query's running k smallest while the block is
// still in cache. A value is inserted only when below the row's current k-th, which
// after the first blocks is rare: the scan is one multiply-add and one compare per
// lane. Ties keep the entry already held, then the lower column (a stable merge).
// ---------------------------------------------------------------------------
static inline void knn_insert(float* bd, int64_t* bi, int64_t k, float v, int64_t j) {
    int64_t pos = k - 1;
    for (; pos > 0 && bd[pos - 1] > v; --pos) {
        bd[pos] = bd[pos - 1];
        bi[pos] = bi[pos - 1];
    }
    bd[pos] = v;
    bi[pos] = j;
}

static void knn_merge(const float* g, int64_t n, int64_t m, const float* norms, int64_t offset, int64_t k,
                      float* best_d, int64_t* best_i) {
#pragma omp parallel for num_threads(pyad::num_threads()) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        const float* row = g + i * m;
        float* bd = best_d + i * k;
        int64_t* bi = best_i + i * k;
        float thr = bd[k - 1];
        const V::reg neg2 = V::set1(-2.0f);
        V::reg vthr = V::set1(thr);
        int64_t j = 0;
        for (; j + V::W <= m; j += V::W) {
            // -2 g is exact, so this rounds once, like the scalar tail and the twins
            const V::reg s = V::fma(V::load(row + j), neg2, V::load(norms + j));
            if (!V::any_lt(s, vthr)) continue;
            float lanes[V::W];
            V::store(lanes, s);
            for (int l = 0; l < V::W; ++l) {
                if (lanes[l] < thr) {
                    knn_insert(bd, bi, k, lanes[l], offset + j + l);
                    thr = bd[k - 1];
                }
            }
            vthr = V::set1(thr);
        }
        for (; j < m; ++j) {
            const float s = norms[j] - 2.0f * row[j];
            if (s < thr) {
                knn_insert(bd, bi, k, s, offset + j);
                thr = bd[k - 1];
            }
        }
    }
}

static double stream_sum(const float* x, int64_t n) {
    double total = 0.0;
#pragma omp parallel for num_threads(pyad::num_threads()) schedule(static) reduction(+ : total)
    for (int64_t blk = 0; blk < (n + 4095) / 4096; ++blk) {
        const int64_t a = blk * 4096, e = min64(n, a + 4096);
        V::reg s0 = V::zero(), s1 = V::zero();
        int64_t j = a;
        for (; j + 2 * V::W <= e; j += 2 * V::W) {
            s0 = V::add(s0, V::load(x + j));
            s1 = V::add(s1, V::load(x + j + V::W));
        }
        float s = V::hsum(V::add(s0, s1));
        for (; j < e; ++j) s += x[j];
        total += s;
    }
    return total;
}

static const KernelTable table = {
    PYAD_ISA_NAME,
    mahalanobis_f32, mahalanobis_f16,
    coreset_f32, coreset_f16, coreset_i8,
    patch_pool, channel_pool, patch_embed,
    gaussian_factor, gaussian_update,
    winograd_input, winograd_output, winograd_output_grad,
    knn_merge,
    stream_sum,
};

}  // namespace PYAD_NS
