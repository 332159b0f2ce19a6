// Kernel tests for aarch64, run under qemu-aarch64 by tests/arm/run.sh, and for x86
// with AVX-512 emulated by tests/avx512/run.sh. Every kernel runs on each ISA table
// named on the command line (default: neon scalar) and is compared to a naive
// double-precision implementation written here, independent of impl.hpp.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <algorithm>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/dispatch.hpp"

using pyad::KernelTable;

static int g_checks = 0, g_failures = 0;

static void expect_close(const std::string& what, const std::vector<float>& got, const std::vector<double>& want,
                         double rtol, double atol) {
    ++g_checks;
    for (size_t i = 0; i < want.size(); ++i) {
        if (std::fabs(got[i] - want[i]) > atol + rtol * std::fabs(want[i])) {
            std::printf("FAIL %s at %zu: got %.9g want %.9g\n", what.c_str(), i, got[i], want[i]);
            ++g_failures;
            return;
        }
    }
}

// Independent half decoding: (-1)^s * 2^(e-15) * (1 + m/1024), subnormals 2^-14 * m/1024.
static double half_value(uint16_t h) {
    int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v = e == 0 ? std::ldexp(m / 1024.0, -14) : std::ldexp(1.0 + m / 1024.0, e - 15);
    return s ? -v : v;
}

static void test_mahalanobis(const KernelTable& t, std::mt19937& gen) {
    std::normal_distribution<float> nd;
    const int64_t shapes[][3] = {{1, 1, 1}, {1, 3, 5}, {5, 2, 17}, {6, 3, 33}, {2, 2, 100}, {33, 2, 17}, {70, 1, 8}};
    for (auto& s : shapes) {
        const int64_t n = s[0], p = s[1], d = s[2], tri = d * (d + 1) / 2;
        std::vector<float> x(n * p * d), mean(p * d), f32(p * tri), out(n * p);
        std::vector<uint16_t> f16(p * tri);
        for (auto& v : x) v = nd(gen);
        for (auto& v : mean) v = nd(gen);
        for (size_t i = 0; i < f16.size(); ++i) {  // moderate finite halves, both signs
            f16[i] = uint16_t((gen() & 1) << 15 | (10 + gen() % 8) << 10 | (gen() & 1023));
            f32[i] = float(half_value(f16[i]));
        }
        std::vector<double> want(n * p);
        for (int64_t b = 0; b < n; ++b)
            for (int64_t q = 0; q < p; ++q) {
                double acc = 0;
                for (int64_t i = 0, off = q * tri; i < d; off += ++i) {
                    double y = 0;
                    for (int64_t j = 0; j <= i; ++j) y += half_value(f16[off + j]) * (double(x[(b * p + q) * d + j]) - mean[q * d + j]);
                    acc += y * y;
                }
                want[b * p + q] = std::sqrt(acc);
            }
        t.mahalanobis_f32(x.data(), n, p, d, mean.data(), f32.data(), out.data());
        expect_close(std::string(t.isa) + " mahalanobis_f32 d=" + std::to_string(d), out, want, 1e-4, 1e-5);
        t.mahalanobis_f16(x.data(), n, p, d, mean.data(), f16.data(), out.data());
        expect_close(std::string(t.isa) + " mahalanobis_f16 d=" + std::to_string(d), out, want, 1e-4, 1e-5);
    }
}

static void test_coreset(const KernelTable& t, std::mt19937& gen) {
    const int64_t shapes[][3] = {{1, 1, 1}, {50, 5, 20}, {300, 17, 300}, {40000, 9, 40}};
    for (auto& s : shapes) {
        const int64_t m = s[0], d = s[1], k = s[2];
        std::vector<float> x(m * d);
        std::vector<int8_t> xi(m * d);
        std::vector<uint16_t> xh(m * d);
        for (int64_t i = 0; i < m * d; ++i) {  // small integers: exact in every precision
            int v = int(gen() % 7) - 3;
            x[i] = float(v);
            xi[i] = int8_t(v);
            xh[i] = v == 0 ? 0 : uint16_t((v < 0) << 15 | (15 + (std::abs(v) >= 2)) << 10 | (std::abs(v) == 3 ? 512 : 0));
        }
        // naive greedy selection in double
        std::vector<double> mind(m, INFINITY);
        std::vector<char> taken(m, 0);
        std::vector<int64_t> want(k);
        int64_t sel = m / 2;
        for (int64_t it = 0; it < k; ++it) {
            want[it] = sel;
            taken[sel] = 1;
            for (int64_t i = 0; i < m; ++i) {
                double acc = 0;
                for (int64_t j = 0; j < d; ++j) acc += (double(x[i * d + j]) - x[sel * d + j]) * (double(x[i * d + j]) - x[sel * d + j]);
                mind[i] = std::min(mind[i], acc);
            }
            double best = -1;
            for (int64_t i = 0; i < m; ++i)
                if (!taken[i] && mind[i] > best) { best = mind[i]; sel = i; }
        }
        std::vector<int64_t> idx(k);
        std::vector<float> mf(m, INFINITY);
        std::vector<int32_t> mi(m, INT32_MAX);
        const std::string tag = std::string(t.isa) + " coreset m=" + std::to_string(m);
        auto check = [&](const char* kind, const std::vector<double>& dist) {
            ++g_checks;
            if (idx != want) { std::printf("FAIL %s %s: selection differs\n", tag.c_str(), kind); ++g_failures; }
            std::vector<float> got(dist.size());
            expect_close(tag + " " + kind + " distances", got = std::vector<float>(dist.begin(), dist.end()), mind, 0, 0);
        };
        t.coreset_f32(x.data(), m, d, k, m / 2, mf.data(), idx.data());
        check("f32", std::vector<double>(mf.begin(), mf.end()));
        std::fill(mf.begin(), mf.end(), INFINITY);
        t.coreset_f16(xh.data(), m, d, k, m / 2, mf.data(), idx.data());
        check("f16", std::vector<double>(mf.begin(), mf.end()));
        t.coreset_i8(xi.data(), m, d, k, m / 2, mi.data(), idx.data());
        check("i8", std::vector<double>(mi.begin(), mi.end()));
    }
}

// Naive pooling / embedding in double, straight from the definitions.
static std::vector<double> naive_embed(const std::vector<float>& x, int64_t b, int64_t c, int64_t h, int64_t w, int k,
                                       int s, int p, int mode, int64_t dout) {
    const int64_t ho = (h + 2 * p - k) / s + 1, wo = (w + 2 * p - k) / s + 1;
    const int64_t planes = mode == pyad::kAvgMax ? 2 * c : c;
    const int64_t len = mode == pyad::kUnfold ? c * k * k : planes;
    std::vector<double> out(b * ho * wo * dout), vec(len);
    auto at = [&](int64_t bb, int64_t cc, int64_t r, int64_t col, bool* ok) {
        *ok = r >= 0 && r < h && col >= 0 && col < w;
        return *ok ? double(x[((bb * c + cc) * h + r) * w + col]) : 0.0;
    };
    for (int64_t bb = 0; bb < b; ++bb)
        for (int64_t i = 0; i < ho; ++i)
            for (int64_t j = 0; j < wo; ++j) {
                for (int64_t cc = 0; cc < c; ++cc) {
                    double sum = 0, mx = -INFINITY;
                    for (int kh = 0; kh < k; ++kh)
                        for (int kw = 0; kw < k; ++kw) {
                            bool ok;
                            double v = at(bb, cc, i * s + kh - p, j * s + kw - p, &ok);
                            if (mode == pyad::kUnfold) vec[(cc * k + kh) * k + kw] = v;
                            sum += v;
                            if (ok) mx = std::max(mx, v);
                        }
                    if (mode == pyad::kAvg || mode == pyad::kAvgMax) vec[cc] = sum / (k * k);
                    if (mode == pyad::kMax) vec[cc] = mx;
                    if (mode == pyad::kAvgMax) vec[c + cc] = mx;
                }
                for (int64_t o = 0; o < dout; ++o) {
                    int64_t lo = o * len / dout, hi = ((o + 1) * len + dout - 1) / dout;
                    double acc = 0;
                    for (int64_t q = lo; q < hi; ++q) acc += vec[q];
                    out[((bb * ho + i) * wo + j) * dout + o] = acc / double(hi - lo);
                }
            }
    return out;
}

static void test_pooling(const KernelTable& t, std::mt19937& gen) {
    std::normal_distribution<float> nd;
    const int geo[][3] = {{3, 1, 1}, {3, 2, 1}, {5, 1, 2}, {1, 1, 0}, {2, 2, 1}};
    const int64_t b = 2, c = 10, h = 9, w = 11;
    std::vector<float> x(b * c * h * w);
    for (auto& v : x) v = nd(gen);
    for (auto& g : geo) {
        const int k = g[0], s = g[1], p = g[2];
        const int64_t ho = (h + 2 * p - k) / s + 1, wo = (w + 2 * p - k) / s + 1;
        const std::string tag = std::string(t.isa) + " k" + std::to_string(k) + "s" + std::to_string(s) + "p" + std::to_string(p);
        for (int mode : {pyad::kAvg, pyad::kMax, pyad::kAvgMax}) {
            const int64_t cout = mode == pyad::kAvgMax ? 2 * c : c;
            std::vector<float> out(b * ho * wo * cout);
            t.patch_pool(x.data(), b, c, h, w, k, s, p, mode, out.data());
            expect_close(tag + " patch_pool mode " + std::to_string(mode), out, naive_embed(x, b, c, h, w, k, s, p, mode, cout), 1e-5, 1e-6);
            for (int64_t dout : {int64_t(3), int64_t(7), int64_t(33)}) {
                std::vector<float> emb(b * ho * wo * dout);
                t.patch_embed(x.data(), b, c, h, w, k, s, p, mode, dout, emb.data());
                expect_close(tag + " patch_embed", emb, naive_embed(x, b, c, h, w, k, s, p, mode, dout), 1e-5, 1e-6);
            }
        }
        for (int64_t dout : {int64_t(4), int64_t(45), int64_t(100)}) {  // unfold: C*k*k bins, aligned or not
            std::vector<float> emb(b * ho * wo * dout);
            t.patch_embed(x.data(), b, c, h, w, k, s, p, pyad::kUnfold, dout, emb.data());
            expect_close(tag + " unfold", emb, naive_embed(x, b, c, h, w, k, s, p, pyad::kUnfold, dout), 1e-5, 1e-6);
        }
    }
    for (int64_t l : {1, 7, 100, 4608}) {
        for (int64_t d : {1, 3, 64, 1024}) {
            std::vector<float> v(3 * l), out(3 * d);
            for (auto& e : v) e = nd(gen);
            std::vector<double> want(3 * d);
            for (int64_t r = 0; r < 3; ++r)
                for (int64_t o = 0; o < d; ++o) {
                    int64_t lo = o * l / d, hi = ((o + 1) * l + d - 1) / d;
                    double acc = 0;
                    for (int64_t q = lo; q < hi; ++q) acc += v[r * l + q];
                    want[r * d + o] = acc / double(hi - lo);
                }
            t.channel_pool(v.data(), 3, l, d, out.data());
            expect_close(std::string(t.isa) + " channel_pool", out, want, 1e-5, 1e-6);
        }
    }
}

// Naive Cholesky (column by column) of a dense symmetric d x d matrix, in place (lower).
static void naive_cholesky(std::vector<double>& m, int64_t d) {
    for (int64_t j = 0; j < d; ++j) {
        for (int64_t k = 0; k < j; ++k) m[j * d + j] -= m[j * d + k] * m[j * d + k];
        m[j * d + j] = std::sqrt(m[j * d + j]);
        for (int64_t i = j + 1; i < d; ++i) {
            for (int64_t k = 0; k < j; ++k) m[i * d + j] -= m[i * d + k] * m[j * d + k];
            m[i * d + j] /= m[j * d + j];
        }
    }
}

// Sample covariance of rows [lo, hi) of x [n, d] (divide by count - 1) + eps I, and its mean.
static std::vector<double> covariance(const std::vector<double>& x, int64_t lo, int64_t hi, int64_t d, double eps,
                                      std::vector<double>& mean) {
    const double k = double(hi - lo);
    mean.assign(d, 0.0);
    for (int64_t r = lo; r < hi; ++r)
        for (int64_t i = 0; i < d; ++i) mean[i] += x[r * d + i] / k;
    std::vector<double> c(d * d, 0.0);
    for (int64_t r = lo; r < hi; ++r)
        for (int64_t i = 0; i < d; ++i)
            for (int64_t j = 0; j < d; ++j) c[i * d + j] += (x[r * d + i] - mean[i]) * (x[r * d + j] - mean[j]) / (k - 1);
    for (int64_t i = 0; i < d; ++i) c[i * d + i] += eps;
    return c;
}

static void test_gaussian_factor(const KernelTable& t, std::mt19937& gen) {
    std::normal_distribution<double> nd;
    const int64_t n = 30, h = 4, p = 3, d = 17, tri = d * (d + 1) / 2;
    const double eps = 0.01;
    std::vector<double> s2(p * tri, 0.0), s1(p * d, 0.0), held(p * h * d);
    std::vector<std::vector<double>> xs(p, std::vector<double>(n * d));
    for (int64_t q = 0; q < p; ++q) {  // held-out images first; sums shifted by 0
        auto& x = xs[q];
        for (auto& v : x) v = 0.5 + nd(gen);
        for (int64_t r = 0; r < n; ++r)
            for (int64_t i = 0; i < d; ++i) {
                s1[q * d + i] += x[r * d + i];
                for (int64_t j = 0; j <= i; ++j) s2[q * tri + i * (i + 1) / 2 + j] += x[r * d + i] * x[r * d + j];
            }
        for (int64_t r = 0; r < h; ++r)
            for (int64_t i = 0; i < d; ++i) held[(q * h + r) * d + i] = x[r * d + i];
    }
    std::vector<float> packed(p * tri), dist(p * h);
    const int64_t bad = t.gaussian_factor(s2.data(), s1.data(), p, d, double(n), eps, packed.data(), held.data(), h,
                                          dist.data());
    ++g_checks;
    if (bad != -1) { std::printf("FAIL %s gaussian_factor: position %lld\n", t.isa, (long long)bad); ++g_failures; }
    std::vector<double> want_a, want_d;
    for (int64_t q = 0; q < p; ++q) {
        std::vector<double> mean, rest_mean;
        auto c = covariance(xs[q], 0, n, d, eps, mean);
        naive_cholesky(c, d);
        std::vector<double> a(d * d, 0.0);  // L^-1 by forward substitution, column by column
        for (int64_t col = 0; col < d; ++col)
            for (int64_t i = col; i < d; ++i) {
                double v = i == col ? 1.0 : 0.0;
                for (int64_t k = col; k < i; ++k) v -= c[i * d + k] * a[k * d + col];
                a[i * d + col] = v / c[i * d + i];
            }
        for (int64_t i = 0; i < d; ++i)
            for (int64_t j = 0; j <= i; ++j) want_a.push_back(a[i * d + j]);
        // the held-out images against a fit without them (eps scaled by (n-1)/(n-h-1))
        auto r = covariance(xs[q], h, n, d, eps * (n - 1.0) / (n - h - 1.0), rest_mean);
        naive_cholesky(r, d);
        for (int64_t k = 0; k < h; ++k) {
            double sq = 0.0;
            std::vector<double> z(d);
            for (int64_t i = 0; i < d; ++i) {
                double v = xs[q][k * d + i] - rest_mean[i];
                for (int64_t m = 0; m < i; ++m) v -= r[i * d + m] * z[m];
                z[i] = v / r[i * d + i];
                sq += z[i] * z[i];
            }
            want_d.push_back(std::sqrt(sq));
        }
    }
    expect_close(std::string(t.isa) + " gaussian_factor", packed, want_a, 1e-5, 1e-6);
    expect_close(std::string(t.isa) + " gaussian_factor held out", dist, want_d, 1e-4, 1e-6);
    std::vector<double> singular(s2);  // channel 0 constant: a zero pivot
    for (int64_t q = 0; q < p; ++q) { s1[q * d] = 0.0; singular[q * tri] = 0.0; }
    for (int64_t q = 0; q < p; ++q)
        for (int64_t i = 1; i < d; ++i) singular[q * tri + i * (i + 1) / 2] = 0.0;
    ++g_checks;
    if (t.gaussian_factor(singular.data(), s1.data(), p, d, double(n), 0.0, packed.data(), nullptr, 0,
                          nullptr) != 0) {
        std::printf("FAIL %s gaussian_factor: a singular covariance was not refused\n", t.isa);
        ++g_failures;
    }
}

static void test_gaussian_update(const KernelTable& t, std::mt19937& gen) {
    // 70 images (a block of 64 and one of 6), d = 17 (register blocks overhang it), two calls
    std::normal_distribution<float> nd;
    const int64_t n = 70, p = 3, d = 17, tri = d * (d + 1) / 2;
    std::vector<float> x(n * p * d), shift(p * d);
    for (auto& v : x) v = 2.0f + 3.0f * nd(gen);
    for (auto& v : shift) v = 2.0f + nd(gen);
    std::vector<double> s1(p * d, 0.0), s2(p * tri, 0.0), w1(p * d, 0.0), w2(p * tri, 0.0);
    t.gaussian_update(x.data(), 20, p, d, shift.data(), s1.data(), s2.data());
    t.gaussian_update(x.data() + 20 * p * d, n - 20, p, d, shift.data(), s1.data(), s2.data());
    for (int64_t k = 0; k < n; ++k)
        for (int64_t q = 0; q < p; ++q)
            for (int64_t i = 0; i < d; ++i) {
                const double yi = double(x[(k * p + q) * d + i]) - shift[q * d + i];
                w1[q * d + i] += yi;
                for (int64_t j = 0; j <= i; ++j)
                    w2[q * tri + i * (i + 1) / 2 + j] += yi * (double(x[(k * p + q) * d + j]) - shift[q * d + j]);
            }
    std::vector<float> g1(s1.begin(), s1.end()), g2(s2.begin(), s2.end());
    expect_close(std::string(t.isa) + " gaussian_update s1", g1, w1, 1e-6, 1e-6);
    expect_close(std::string(t.isa) + " gaussian_update s2", g2, w2, 1e-6, 1e-6);
}

static void test_winograd(const KernelTable& t, std::mt19937& gen) {
    // A whole r x r convolution (r = 3: F(4x4, 3x3); r = 4: F(3x3, 4x4)) through the two transforms,
    // the GEMMs and U = G g G^T done here in double with G from the interpolation points 0, +-1, +-2
    // and infinity, against the direct convolution: 10 channels (a NEON vector and a tail), 9x7
    // input, partial tiles, every padding, tiles in two blocks, + bias + residual, ReLU.
    std::normal_distribution<float> nd;
    const double pts[5] = {0, 1, -1, 2, -2};
    const int64_t b = 2, c = 10, k = 6, h = 9, w = 7;
    for (int r = 3; r <= 4; ++r) {
        double G[6][4] = {};
        for (int j = 0; j < 5; ++j) {
            double f = 1.0;
            for (int l = 0; l < 5; ++l)
                if (l != j) f *= pts[j] - pts[l];
            for (int q = 0; q < r; ++q) G[j][q] = std::pow(pts[j], q) / f;
        }
        G[5][r - 1] = 1.0;
        const int m = 7 - r;
        for (int pad = 0; pad < r; ++pad) {
            const int64_t ho = h + 2 * pad - r + 1, wo = w + 2 * pad - r + 1;
            const int64_t tiles = b * ((ho + m - 1) / m) * ((wo + m - 1) / m);
            std::vector<float> x(b * h * w * c), g(k * c * r * r), bias(k), res(b * ho * wo * k);
            for (auto& v : x) v = nd(gen);
            for (auto& v : g) v = nd(gen);
            for (auto& v : bias) v = nd(gen);
            for (auto& v : res) v = nd(gen);
            std::vector<double> u(36 * c * k, 0.0);  // U[e][ci][co] = (G g G^T)[i][j]
            for (int i = 0; i < 6; ++i)
                for (int j = 0; j < 6; ++j)
                    for (int64_t ci = 0; ci < c; ++ci)
                        for (int64_t co = 0; co < k; ++co) {
                            double s = 0.0;
                            for (int a = 0; a < r; ++a)
                                for (int e = 0; e < r; ++e) s += G[i][a] * g[((co * c + ci) * r + a) * r + e] * G[j][e];
                            u[((i * 6 + j) * c + ci) * k + co] = s;
                        }
            std::vector<float> out(b * ho * wo * k, 0.0f);
            const int64_t split = tiles / 2;
            for (int64_t t0 : {int64_t(0), split}) {
                const int64_t tc = t0 == 0 ? split : tiles - split;
                std::vector<float> v(36 * tc * c), mm(36 * tc * k);
                t.winograd_input(x.data(), b, h, w, c, r, pad, t0, tc, v.data());
                for (int e = 0; e < 36; ++e)
                    for (int64_t q = 0; q < tc; ++q)
                        for (int64_t co = 0; co < k; ++co) {
                            double s = 0.0;
                            for (int64_t ci = 0; ci < c; ++ci) s += double(v[(e * tc + q) * c + ci]) * u[(e * c + ci) * k + co];
                            mm[(e * tc + q) * k + co] = float(s);
                        }
                t.winograd_output(mm.data(), b, ho, wo, k, r, t0, tc, bias.data(), res.data(), 1, out.data());
            }
            std::vector<double> want(b * ho * wo * k);
            for (int64_t n = 0; n < b; ++n)
                for (int64_t y = 0; y < ho; ++y)
                    for (int64_t xx = 0; xx < wo; ++xx)
                        for (int64_t co = 0; co < k; ++co) {
                            double s = bias[co] + res[((n * ho + y) * wo + xx) * k + co];
                            for (int a = 0; a < r; ++a)
                                for (int e = 0; e < r; ++e) {
                                    const int64_t yy = y + a - pad, xi = xx + e - pad;
                                    if (yy < 0 || yy >= h || xi < 0 || xi >= w) continue;
                                    for (int64_t ci = 0; ci < c; ++ci)
                                        s += double(x[((n * h + yy) * w + xi) * c + ci]) * g[((co * c + ci) * r + a) * r + e];
                                }
                            want[((n * ho + y) * wo + xx) * k + co] = s > 0.0 ? s : 0.0;
                        }
            expect_close(std::string(t.isa) + " winograd r " + std::to_string(r) + " pad " + std::to_string(pad), out,
                         want, 1e-4, 1e-4);

            // the weight gradient through the output transform's adjoint: dU = sum_t V^T (A dY A^T),
            // dw = G^T dU G, against the direct correlation of x with dy
            std::vector<float> dy(b * ho * wo * k);
            for (auto& v : dy) v = nd(gen);
            std::vector<double> du(36 * c * k, 0.0);
            for (int64_t t0 : {int64_t(0), split}) {
                const int64_t tc = t0 == 0 ? split : tiles - split;
                std::vector<float> v(36 * tc * c), dm(36 * tc * k);
                t.winograd_input(x.data(), b, h, w, c, r, pad, t0, tc, v.data());
                t.winograd_output_grad(dy.data(), b, ho, wo, k, r, t0, tc, dm.data());
                for (int e = 0; e < 36; ++e)
                    for (int64_t q = 0; q < tc; ++q)
                        for (int64_t ci = 0; ci < c; ++ci)
                            for (int64_t co = 0; co < k; ++co)
                                du[(e * c + ci) * k + co] += double(v[(e * tc + q) * c + ci]) * dm[(e * tc + q) * k + co];
            }
            std::vector<float> dw(k * c * r * r);
            std::vector<double> dw_want(k * c * r * r, 0.0);
            for (int64_t co = 0; co < k; ++co)
                for (int64_t ci = 0; ci < c; ++ci)
                    for (int a = 0; a < r; ++a)
                        for (int e = 0; e < r; ++e) {
                            double s = 0.0;
                            for (int i = 0; i < 6; ++i)
                                for (int j = 0; j < 6; ++j) s += G[i][a] * G[j][e] * du[((i * 6 + j) * c + ci) * k + co];
                            dw[((co * c + ci) * r + a) * r + e] = float(s);
                            double d = 0.0;
                            for (int64_t n = 0; n < b; ++n)
                                for (int64_t y = 0; y < ho; ++y)
                                    for (int64_t xx = 0; xx < wo; ++xx) {
                                        const int64_t yy = y + a - pad, xi = xx + e - pad;
                                        if (yy < 0 || yy >= h || xi < 0 || xi >= w) continue;
                                        d += double(dy[((n * ho + y) * wo + xx) * k + co]) * x[((n * h + yy) * w + xi) * c + ci];
                                    }
                            dw_want[((co * c + ci) * r + a) * r + e] = d;
                        }
            expect_close(std::string(t.isa) + " winograd weight gradient r " + std::to_string(r) + " pad " +
                         std::to_string(pad), dw, dw_want, 1e-4, 1e-4);
        }
    }
}

static void test_knn_merge(const KernelTable& t, std::mt19937& gen) {
    // Blocks of 13 columns (a NEON vector tail) merged into the k smallest of norms - 2 g per
    // row; small integers make ties, which go to the earlier column. Against a full sort here.
    const int64_t n = 9, m = 61, block = 13;
    for (int64_t k : {1, 3, 9, 70}) {
        std::vector<float> g(n * m), norms(m);
        for (auto& v : g) v = float(int(gen() % 7) - 3);
        for (auto& v : norms) v = float(gen() % 5);
        std::vector<float> dist(n * k, INFINITY);
        std::vector<int64_t> idx(n * k, -1);
        for (int64_t s = 0; s < m; s += block) {
            const int64_t w = s + block <= m ? block : m - s;
            std::vector<float> gb(n * w);
            for (int64_t i = 0; i < n; ++i)
                for (int64_t j = 0; j < w; ++j) gb[i * w + j] = g[i * m + s + j];
            t.knn_merge(gb.data(), n, w, norms.data() + s, s, k, dist.data(), idx.data());
        }
        ++g_checks;
        bool ok = true;
        for (int64_t i = 0; i < n && ok; ++i) {
            std::vector<std::pair<double, int64_t>> all;
            for (int64_t j = 0; j < m; ++j) all.push_back({double(norms[j]) - 2.0 * g[i * m + j], j});
            std::stable_sort(all.begin(), all.end(), [](auto& a, auto& b) { return a.first < b.first; });
            for (int64_t r = 0; r < k; ++r) {
                const double wd = r < m ? all[r].first : INFINITY;
                const int64_t wi = r < m ? all[r].second : -1;
                if (dist[i * k + r] != wd || idx[i * k + r] != wi) {
                    std::printf("FAIL %s knn_merge k %lld row %lld rank %lld: got (%g, %lld) want (%g, %lld)\n", t.isa,
                                (long long)k, (long long)i, (long long)r, dist[i * k + r], (long long)idx[i * k + r], wd,
                                (long long)wi);
                    ok = false;
                    break;
                }
            }
        }
        if (!ok) ++g_failures;
    }
}

#ifdef PYAD_TEST_EMULATED_AVX512
namespace pyad { const KernelTable* table_avx512(); }
#endif

// The table an ISA name stands for. The dispatcher refuses ISAs the CPU lacks; the
// emulated AVX-512 build (tests/avx512/run.sh) takes its table directly.
static const KernelTable& table_for(const std::string& isa) {
#ifdef PYAD_TEST_EMULATED_AVX512
    if (isa == "avx512") return *pyad::table_avx512();
#endif
    pyad::select_isa(isa);
    return pyad::active();
}

int main(int argc, char** argv) {
    std::vector<std::string> isas(argv + 1, argv + argc);
    if (isas.empty()) isas = {"neon", "scalar"};
    std::printf("compiled ISAs:");
    for (auto& s : pyad::compiled_isas()) std::printf(" %s", s.c_str());
    std::printf("\nsupported ISAs:");
    for (auto& s : pyad::supported_isas()) std::printf(" %s", s.c_str());
    std::printf("\nthreads: %d\n", pyad::num_threads());
    for (const std::string& isa : isas) {
        const KernelTable& t = table_for(isa);
        std::mt19937 gen(7);
        const int before = g_checks;
        test_mahalanobis(t, gen);
        test_coreset(t, gen);
        test_pooling(t, gen);
        test_gaussian_factor(t, gen);
        test_gaussian_update(t, gen);
        test_winograd(t, gen);
        test_knn_merge(t, gen);
        std::printf("ran the %s path: %d checks\n", t.isa, g_checks - before);
    }
    std::printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
    return g_failures == 0 ? 0 : 1;
}
