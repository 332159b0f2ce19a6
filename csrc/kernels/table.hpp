// The kernel function table: one instance per instruction set, filled at
// start-up by dispatch.cpp. Every entry works on C-contiguous buffers that the
// Python layer has already validated; none of them touches Python objects.
#pragma once
#include <cstdint>

namespace pyad {

// Pooling modes shared by patch_pool and patch_embed.
enum PoolMode : int { kAvg = 0, kMax = 1, kAvgMax = 2, kUnfold = 3 };

struct KernelTable {
    const char* isa;

    // out[n, p] = || A_p (x[n, p] - mean[p]) ||_2 with A_p the packed
    // (row-major lower-triangular, d(d+1)/2 values) factor of the precision.
    void (*mahalanobis_f32)(const float* x, int64_t n, int64_t p, int64_t d,
                            const float* mean, const float* factor, float* out);
    void (*mahalanobis_f16)(const float* x, int64_t n, int64_t p, int64_t d,
                            const float* mean, const uint16_t* factor, float* out);

    // Greedy k-center selection. mind[m] holds the squared distance of point m
    // to the selection so far (in/out); start < 0 begins at argmax(mind).
    void (*coreset_f32)(const float* x, int64_t m, int64_t d, int64_t k,
                        int64_t start, float* mind, int64_t* idx);
    void (*coreset_f16)(const uint16_t* x, int64_t m, int64_t d, int64_t k,
                        int64_t start, float* mind, int64_t* idx);
    void (*coreset_i8)(const int8_t* x, int64_t m, int64_t d, int64_t k,
                       int64_t start, int32_t* mind, int64_t* idx);

    // [B, C, H, W] -> [B, Ho, Wo, C] (x2 channels for kAvgMax).
    void (*patch_pool)(const float* x, int64_t b, int64_t c, int64_t h, int64_t w,
                       int kernel, int stride, int padding, int mode, float* out);
    // [R, L] -> [R, D], adaptive average over the last axis.
    void (*channel_pool)(const float* x, int64_t r, int64_t l, int64_t d, float* out);
    // [B, C, H, W] -> [B, Ho, Wo, D]: pooling (or the unfold of PatchCore),
    // channel reduction and the channels-last layout in one pass.
    void (*patch_embed)(const float* x, int64_t b, int64_t c, int64_t h, int64_t w,
                        int kernel, int stride, int padding, int mode, int64_t d,
                        float* out);

    // Per position: Sigma from the packed float64 sums (s2 [p, d(d+1)/2], s1 [p, d],
    // n images, + eps I), A = L^-1 of its Cholesky factor -> packed [p, d(d+1)/2]
    // float32; if held != nullptr ([p, h, d] deviations of h of the n images from the
    // sums' shift), their distances under the Gaussians fitted without them ->
    // held_out [p, h]. Returns the first position that fails (not positive definite), or -1.
    int64_t (*gaussian_factor)(const double* s2, const double* s1, int64_t p, int64_t d, double n,
                               double eps, float* packed, const double* held, int64_t h, float* held_out);

    // s1 [p, d] += sum_k y_k and s2 [p, d(d+1)/2] += the packed lower triangle of sum_k y_k y_k^T,
    // y_k = x[k, q] - shift[q] in float64, for x [n, p, d] float32 and shift [p, d] float32.
    void (*gaussian_update)(const float* x, int64_t n, int64_t p, int64_t d, const float* shift, double* s1,
                            double* s2);

    // Winograd F(4x4, 3x3) (r = 3) and F(3x3, 4x4) (r = 4) transforms of an r x r stride-1 convolution
    // (impl.hpp): tiles [t0, t0 + tc) of x [b, h, w, c] (zero padding pad) -> v [36, tc, c];
    // m [36, tc, k] -> out [b, ho, wo, k] with + bias [k] (or null), + res [b, ho, wo, k] (or null),
    // then max(0, .) if relu.
    void (*winograd_input)(const float* x, int64_t b, int64_t h, int64_t w, int64_t c, int r, int pad, int64_t t0,
                           int64_t tc, float* v);
    void (*winograd_output)(const float* m, int64_t b, int64_t ho, int64_t wo, int64_t k, int r, int64_t t0,
                            int64_t tc, const float* bias, const float* res, int relu, float* out);
    // The output transform's adjoint (weight gradients): tiles [t0, t0 + tc) of dy [b, ho, wo, k] (zero
    // beyond the output) -> out [36, tc, k], out[6a + c] = (A dY A^T)[a, c].
    void (*winograd_output_grad)(const float* dy, int64_t b, int64_t ho, int64_t wo, int64_t k, int r, int64_t t0,
                                 int64_t tc, float* out);

    // Per row i of g [n, m] (the products q_i . b_j of bank rows [offset, offset + m)):
    // merges s_j = norms[j] - 2 g[i, j] into best_d / best_i [n, k] (the k smallest so
    // far, ascending, in/out); ties keep the held entry, then the lower column.
    void (*knn_merge)(const float* g, int64_t n, int64_t m, const float* norms, int64_t offset, int64_t k,
                      float* best_d, int64_t* best_i);

    // Sums n floats with all threads: used to measure read bandwidth.
    double (*stream_sum)(const float* x, int64_t n);
};

// Number of threads used by every parallel kernel (OMP_NUM_THREADS by default).
int num_threads();
void set_num_threads(int n);

}  // namespace pyad
