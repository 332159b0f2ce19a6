"""numba twins of the compiled kernels: same signatures as ``reference.py``.

Imported only when the numba backend is in use, so importing pyad never
compiles anything; functions compile on first call and are cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np

_MODES = {"avg": 0, "max": 1, "avgmax": 2, "unfold": 3}
# float16 -> float32 for every bit pattern: numba has no half arithmetic.
with np.errstate(invalid="ignore"):  # the NaN codes: aarch64 flags their conversion (found under qemu)
    _HALF = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)

_jit = numba.njit(cache=True, nogil=True)
_pjit = numba.njit(cache=True, nogil=True, parallel=True)


# Element loaders, passed as arguments so each storage type compiles its own loop.
@_jit
def _ld_f32(a, q, i, half):  # pragma: no cover - compiled
    return a[q, i]


@_jit
def _ld_f16(a, q, i, half):  # pragma: no cover - compiled
    return half[a[q, i]]


@_jit
def _ld_i8(a, q, i, half):  # pragma: no cover - compiled
    return np.int32(a[q, i])


# Reassociation lets LLVM vectorise the row dot products; inputs are finite.
_fjit = numba.njit(cache=True, nogil=True, parallel=True, fastmath={"reassoc", "contract"})
_fsjit = numba.njit(cache=True, nogil=True, fastmath={"reassoc", "contract"})


_M15, _S15, _13, _16 = np.uint32(0x7FFF), np.uint32(0x8000), np.uint32(13), np.uint32(16)


@_jit
def _decode_half(h, out):  # pragma: no cover - compiled
    """float16 bits -> float32 for finite values (numba has no half type):
    exponent+mantissa shifted into place, rescaled by 2^112, sign copied."""
    bits = out.view(np.uint32)
    for j in range(h.size):
        v = np.uint32(h[j])
        bits[j] = ((v & _M15) << _13) | ((v & _S15) << _16)
    for j in range(h.size):
        out[j] = out[j] * np.float32(5.192296858534828e33)


@_fsjit
def _tri(a, z, sq):  # pragma: no cover - compiled
    """sq[b] = ||A z_b||² for the packed lower-triangular A (row-major).

    z is [d, n] (images innermost, vectorised across images) when n >= 8,
    else [n, d] (one contiguous dot product per image and row)."""
    n = sq.size
    wide = n >= 8
    d = z.shape[0] if wide else z.shape[1]
    y = np.empty(n, dtype=np.float32)
    off = 0
    for i in range(d):
        if wide:
            y[:] = 0
            for j in range(i + 1):
                aij = a[off + j]
                for b in range(n):
                    y[b] += aij * z[j, b]
        else:
            for b in range(n):
                acc = np.float32(0)
                for j in range(i + 1):
                    acc += a[off + j] * z[b, j]
                y[b] = acc
        for b in range(n):
            sq[b] += y[b] * y[b]
        off += i + 1


@_jit
def _center(x, mean, q):  # pragma: no cover - compiled
    n, _, d = x.shape
    if n >= 8:
        z = np.empty((d, n), dtype=np.float32)
        for b in range(n):
            for i in range(d):
                z[i, b] = x[b, q, i] - mean[q, i]
    else:
        z = np.empty((n, d), dtype=np.float32)
        for b in range(n):
            for i in range(d):
                z[b, i] = x[b, q, i] - mean[q, i]
    return z


@_fjit
def _mahalanobis_f32(x, mean, factor, out):  # pragma: no cover - compiled
    n, p, d = x.shape
    for q in numba.prange(p):
        sq = np.zeros(n, dtype=np.float32)
        _tri(factor[q], _center(x, mean, q), sq)
        for b in range(n):
            out[b, q] = np.sqrt(sq[b])


@_fjit
def _mahalanobis_f16(x, mean, factor, out):  # pragma: no cover - compiled
    n, p, d = x.shape
    for q in numba.prange(p):
        a = np.empty(factor.shape[1], dtype=np.float32)
        _decode_half(factor[q], a)
        sq = np.zeros(n, dtype=np.float32)
        _tri(a, _center(x, mean, q), sq)
        for b in range(n):
            out[b, q] = np.sqrt(sq[b])


def mahalanobis(x, mean, factor):
    out = np.empty(x.shape[:2], dtype=np.float32)
    if factor.dtype == np.float16:
        _mahalanobis_f16(x, mean, factor.view(np.uint16), out)
    else:
        _mahalanobis_f32(x, mean, factor, out)
    return out


@_fjit
def _coreset(x, k, start, mind, half, load, center, neg, margin, nchunks, idx):  # pragma: no cover - compiled
    """Same pruning as the compiled kernel (impl.hpp): a point whose nearest
    centre a satisfies d(a,c)² > margin·d(x,a)² cannot get closer to c."""
    m, d = x.shape
    sel = start
    if sel < 0:
        sel = np.argmax(mind)
    per = (m + nchunks - 1) // nchunks
    best_val = np.empty(nchunks, dtype=mind.dtype)
    best_idx = np.empty(nchunks, dtype=np.int64)
    owner = np.full(m, -1, dtype=np.int32)
    cd2 = np.empty(k, dtype=mind.dtype)
    for it in range(k):
        idx[it] = sel
        mind[sel] = neg
        for j in range(d):
            center[j] = load(x, sel, j, half)
        for j in numba.prange(it):
            dd = neg - neg
            for u in range(d):
                t = load(x, idx[j], u, half) - center[u]
                dd += t * t
            cd2[j] = dd
        for t in numba.prange(nchunks):
            bv = neg
            bi = -1
            for i in range(t * per, min(m, (t + 1) * per)):
                cur = mind[i]
                if cur < 0:
                    continue
                a = owner[i]
                if a < 0 or not cd2[a] > margin * cur:
                    dd = neg - neg  # zero of the distance type
                    for j in range(d):
                        u = load(x, i, j, half) - center[j]
                        dd += u * u
                    if dd < cur:
                        cur = dd
                        mind[i] = dd
                        owner[i] = it
                if cur > bv:
                    bv = cur
                    bi = i
            best_val[t] = bv
            best_idx[t] = bi
        gv = neg
        for t in range(nchunks):
            if best_idx[t] >= 0 and best_val[t] > gv:
                gv = best_val[t]
                sel = best_idx[t]
    for i in range(m):
        if mind[i] < 0:
            mind[i] = 0


def greedy_coreset(x, k, start, mind):
    idx = np.empty(k, dtype=np.int64)
    nchunks = max(1, min(numba.get_num_threads(), len(x) // 16384))
    # margins as in impl.hpp: 4.004 for floats (rounding), 4 for exact integers
    if x.dtype == np.int8:
        args = (x, _ld_i8, np.empty(x.shape[1], np.int32), np.int32(-1), np.int64(4))
    elif x.dtype == np.float16:
        args = (x.view(np.uint16), _ld_f16, np.empty(x.shape[1], np.float32), np.float32(-1), np.float32(4.004))
    else:
        args = (x, _ld_f32, np.empty(x.shape[1], np.float32), np.float32(-1), np.float32(4.004))
    xs, load, center, neg, margin = args
    _coreset(xs, int(k), int(start), mind, _HALF, load, center, neg, margin, nchunks, idx)
    return idx


@_jit
def _cols(w, wo, s, off):  # pragma: no cover - compiled
    """Output columns [lo, hi) whose input column j*s + off lies inside [0, w)."""
    lo = 0 if off >= 0 else (-off + s - 1) // s
    hi = 0 if w - 1 - off < 0 else (w - 1 - off) // s + 1
    return lo, min(hi, wo)


@_jit
def _pool_row(plane, ho, k, s, p, wo, is_max, acc):  # pragma: no cover - compiled
    h, w = plane.shape
    acc[:] = -np.inf if is_max else 0.0
    for kh in range(k):
        r = ho * s + kh - p
        if r < 0 or r >= h:
            continue
        for kw in range(k):
            lo, hi = _cols(w, wo, s, kw - p)
            for j in range(lo, hi):
                v = plane[r, j * s + kw - p]
                if is_max:
                    acc[j] = max(acc[j], v)
                else:
                    acc[j] += v
    if not is_max:
        acc *= np.float32(1.0 / (k * k))


@_pjit
def _embed(x, k, s, p, mode, dout, out):  # pragma: no cover - compiled
    nb, c, h, w = x.shape
    ho_n, wo = out.shape[1], out.shape[2]
    planes = 2 * c if mode == 2 else c
    length = c * k * k if mode == 3 else planes
    for task in numba.prange(nb * ho_n):
        b, ho = task // ho_n, task % ho_n
        tmp = np.zeros((dout, wo), dtype=np.float32)
        if mode == 3:
            for i in range(dout):
                f0, f1 = (i * length) // dout, ((i + 1) * length + dout - 1) // dout
                for f in range(f0, f1):
                    ch, rem = f // (k * k), f % (k * k)
                    r = ho * s + rem // k - p
                    if r < 0 or r >= h:
                        continue
                    off = rem % k - p
                    lo, hi = _cols(w, wo, s, off)
                    for j in range(lo, hi):
                        tmp[i, j] += x[b, ch, r, j * s + off]
                tmp[i] *= np.float32(1.0 / (f1 - f0))
        else:
            pooled = np.empty((planes, wo), dtype=np.float32)
            for ch in range(c):
                _pool_row(x[b, ch], ho, k, s, p, wo, mode == 1, pooled[ch])
                if mode == 2:
                    _pool_row(x[b, ch], ho, k, s, p, wo, True, pooled[c + ch])
            if dout == planes:
                tmp[:] = pooled
            else:
                for i in range(dout):
                    c0, c1 = (i * length) // dout, ((i + 1) * length + dout - 1) // dout
                    for ch in range(c0, c1):
                        tmp[i] += pooled[ch]
                    tmp[i] *= np.float32(1.0 / (c1 - c0))
        out[b, ho] = tmp.T


def _out_shape(x, kernel, stride, padding, dout):
    b, _, h, w = x.shape
    return (b, (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1, dout)


def patch_pool(x, kernel, stride, padding, mode):
    c = x.shape[1] * (2 if mode == "avgmax" else 1)
    out = np.empty(_out_shape(x, kernel, stride, padding, c), dtype=np.float32)
    _embed(x, kernel, stride, padding, _MODES[mode], c, out)
    return out


def patch_embed(x, out_dim, kernel, stride, padding, mode):
    out = np.empty(_out_shape(x, kernel, stride, padding, out_dim), dtype=np.float32)
    _embed(x, kernel, stride, padding, _MODES[mode], out_dim, out)
    return out


@_pjit
def _channel_pool(x, out):  # pragma: no cover - compiled
    r, length = x.shape
    d = out.shape[1]
    for q in numba.prange(r):
        for i in range(d):
            lo, hi = (i * length) // d, ((i + 1) * length + d - 1) // d
            s = np.float32(0.0)
            for j in range(lo, hi):
                s += x[q, j]
            out[q, i] = s / (hi - lo)


def channel_pool(x, out_dim):
    out = np.empty((x.shape[0], out_dim), dtype=np.float32)
    _channel_pool(x, out)
    return out


@_jit
def _bt6(d, step, off, c):  # pragma: no cover - compiled
    # B^T of Winograd F(4x4, 3x3) and F(3x3, 4x4) on d[off + i·step + ch], i < 6, every channel
    for ch in range(c):
        d0, d1, d2 = d[off + ch], d[off + step + ch], d[off + 2 * step + ch]
        d3, d4, d5 = d[off + 3 * step + ch], d[off + 4 * step + ch], d[off + 5 * step + ch]
        d[off + ch] = 4 * d0 - 5 * d2 + d4
        d[off + step + ch] = -4 * (d1 + d2) + d3 + d4
        d[off + 2 * step + ch] = 4 * (d1 - d2) + d4 - d3
        d[off + 3 * step + ch] = 2 * (d3 - d1) + d4 - d2
        d[off + 4 * step + ch] = 2 * (d1 - d3) + d4 - d2
        d[off + 5 * step + ch] = 4 * d1 - 5 * d3 + d5


@_pjit
def winograd_input(x, kernel_size, pad, t0, out):  # pragma: no cover - compiled
    b, h, w, c = x.shape
    tc = out.shape[1]
    s = 7 - kernel_size
    th, tw = (h + 2 * pad - kernel_size + s) // s, (w + 2 * pad - kernel_size + s) // s
    for t in numba.prange(tc):
        n, r = (t0 + t) // (th * tw), (t0 + t) % (th * tw)
        y0, x0 = (r // tw) * s - pad, (r % tw) * s - pad
        d = np.zeros(36 * c, dtype=np.float32)
        for i in range(6):
            for j in range(6):
                if 0 <= y0 + i < h and 0 <= x0 + j < w:
                    d[(i * 6 + j) * c:(i * 6 + j + 1) * c] = x[n, y0 + i, x0 + j]
        for j in range(6):
            _bt6(d, 6 * c, j * c, c)
        for i in range(6):
            _bt6(d, c, i * 6 * c, c)
        for e in range(36):
            out[e, t] = d[e * c:(e + 1) * c]


@_jit
def _at6(m, step, off, o, ostep, ooff, c, s):  # pragma: no cover - compiled
    # A^T (s = 4 rows for F(4x4, 3x3), 3 for F(3x3, 4x4)) on m[off + i·step + ch], i < 6
    for ch in range(c):
        a = m[off + step + ch] + m[off + 2 * step + ch]
        bb = m[off + step + ch] - m[off + 2 * step + ch]
        cc = m[off + 3 * step + ch] + m[off + 4 * step + ch]
        e = m[off + 3 * step + ch] - m[off + 4 * step + ch]
        o[ooff + ch] = m[off + ch] + a + cc
        o[ooff + ostep + ch] = bb + 2 * e
        if s == 4:
            o[ooff + 2 * ostep + ch] = a + 4 * cc
            o[ooff + 3 * ostep + ch] = bb + 8 * e + m[off + 5 * step + ch]
        else:
            o[ooff + 2 * ostep + ch] = a + 4 * cc + m[off + 5 * step + ch]


@_pjit
def _winograd_output(m, s, t0, bias, has_bias, res, has_res, relu, out):  # pragma: no cover - compiled
    b, ho, wo, k = out.shape
    tc = m.shape[1]
    th, tw = (ho + s - 1) // s, (wo + s - 1) // s
    for t in numba.prange(tc):
        n, r = (t0 + t) // (th * tw), (t0 + t) % (th * tw)
        y0, x0 = (r // tw) * s, (r % tw) * s
        q = np.empty(36 * k, dtype=np.float32)
        for e in range(36):
            q[e * k:(e + 1) * k] = m[e, t]
        tmp = np.empty(6 * s * k, dtype=np.float32)
        o = np.empty(s * s * k, dtype=np.float32)
        for j in range(6):
            _at6(q, 6 * k, j * k, tmp, 6 * k, j * k, k, s)
        for i in range(s):
            _at6(tmp, k, i * 6 * k, o, k, i * s * k, k, s)
        for i in range(min(s, ho - y0)):
            for j in range(min(s, wo - x0)):
                v = o[(i * s + j) * k:(i * s + j + 1) * k]
                if has_bias:
                    v = v + bias
                if has_res:
                    v = v + res[n, y0 + i, x0 + j]
                if relu:
                    v = np.maximum(v, np.float32(0.0))
                out[n, y0 + i, x0 + j] = v


def winograd_output(m, kernel_size, t0, bias, residual, relu, out):
    empty = np.zeros((1, 1, 1, 1), dtype=np.float32)
    _winograd_output(m, 7 - kernel_size, t0, np.zeros(out.shape[3], np.float32) if bias is None else bias,
                     bias is not None, empty if residual is None else residual, residual is not None, bool(relu), out)


@_jit
def _a6(u, step, off, o, ostep, ooff, c, s):  # pragma: no cover - compiled
    # A (the transpose of A^T) on s values u[off + i·step + ch] -> 6 values o[ooff + a·ostep + ch]
    for ch in range(c):
        u0, u1, u2 = u[off + ch], u[off + step + ch], u[off + 2 * step + ch]
        u3 = u[off + 3 * step + ch] if s == 4 else np.float32(0.0)
        p, q = u0 + u2, u1 + u3
        p4, q8 = u0 + 4 * u2, 2 * u1 + 8 * u3
        o[ooff + ch] = u0
        o[ooff + ostep + ch] = p + q
        o[ooff + 2 * ostep + ch] = p - q
        o[ooff + 3 * ostep + ch] = p4 + q8
        o[ooff + 4 * ostep + ch] = p4 - q8
        o[ooff + 5 * ostep + ch] = u3 if s == 4 else u2


@_pjit
def _winograd_output_grad(dy, s, t0, out):  # pragma: no cover - compiled
    b, ho, wo, k = dy.shape
    tc = out.shape[1]
    th, tw = (ho + s - 1) // s, (wo + s - 1) // s
    for t in numba.prange(tc):
        n, r = (t0 + t) // (th * tw), (t0 + t) % (th * tw)
        y0, x0 = (r // tw) * s, (r % tw) * s
        u = np.zeros(s * s * k, dtype=np.float32)
        for i in range(min(s, ho - y0)):
            for j in range(min(s, wo - x0)):
                u[(i * s + j) * k:(i * s + j + 1) * k] = dy[n, y0 + i, x0 + j]
        tmp = np.empty(6 * s * k, dtype=np.float32)  # [6][s]: A over the rows
        o = np.empty(36 * k, dtype=np.float32)
        for j in range(s):
            _a6(u, s * k, j * k, tmp, s * k, j * k, k, s)
        for a in range(6):
            _a6(tmp, k, a * s * k, o, k, a * 6 * k, k, s)
        for e in range(36):
            out[e, t] = o[e * k:(e + 1) * k]


def winograd_output_grad(dy, kernel_size, t0, out):
    _winograd_output_grad(dy, 7 - kernel_size, t0, out)


@_pjit
def knn_merge(g, norms, offset, dist, idx):  # pragma: no cover - compiled
    k = dist.shape[1]
    for i in numba.prange(g.shape[0]):
        bd, bi = dist[i], idx[i]
        thr = bd[k - 1]
        for j in range(g.shape[1]):
            s = norms[j] - np.float32(2.0) * g[i, j]
            if s < thr:
                pos = k - 1
                while pos > 0 and bd[pos - 1] > s:
                    bd[pos] = bd[pos - 1]
                    bi[pos] = bi[pos - 1]
                    pos -= 1
                bd[pos] = s
                bi[pos] = offset + j
                thr = bd[k - 1]
