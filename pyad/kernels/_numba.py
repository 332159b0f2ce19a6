"""numba twins of the compiled kernels: same signatures as ``reference.py``.

Imported only when the numba backend is in use, so importing pyad never
compiles anything; functions compile on first call and are cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np

_MODES = {"avg": 0, "max": 1, "avgmax": 2, "unfold": 3}
# float16 -> float32 for every bit pattern: numba has no half arithmetic.
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


@_pjit
def _mahalanobis(x, mean, factor, half, load, out):  # pragma: no cover - compiled
    n, p, d = x.shape
    for q in numba.prange(p):
        z = np.empty(d, dtype=np.float32)
        for b in range(n):
            for i in range(d):
                z[i] = x[b, q, i] - mean[q, i]
            acc = np.float32(0.0)
            off = 0
            for i in range(d):
                y = np.float32(0.0)
                for j in range(i + 1):
                    y += load(factor, q, off + j, half) * z[j]
                off += i + 1
                acc += y * y
            out[b, q] = np.sqrt(acc)


def mahalanobis(x, mean, factor):
    out = np.empty(x.shape[:2], dtype=np.float32)
    if factor.dtype == np.float16:
        _mahalanobis(x, mean, factor.view(np.uint16), _HALF, _ld_f16, out)
    else:
        _mahalanobis(x, mean, factor, _HALF, _ld_f32, out)
    return out


@_pjit
def _coreset(x, k, start, mind, half, load, center, neg, nchunks, idx):  # pragma: no cover - compiled
    m, d = x.shape
    sel = start
    if sel < 0:
        sel = np.argmax(mind)
    per = (m + nchunks - 1) // nchunks
    best_val = np.empty(nchunks, dtype=mind.dtype)
    best_idx = np.empty(nchunks, dtype=np.int64)
    for it in range(k):
        idx[it] = sel
        mind[sel] = neg
        for j in range(d):
            center[j] = load(x, sel, j, half)
        for t in numba.prange(nchunks):
            bv = neg
            bi = -1
            for i in range(t * per, min(m, (t + 1) * per)):
                cur = mind[i]
                if cur < 0:
                    continue
                dd = neg - neg  # zero of the distance type
                for j in range(d):
                    u = load(x, i, j, half) - center[j]
                    dd += u * u
                if dd < cur:
                    cur = dd
                    mind[i] = dd
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
    if x.dtype == np.int8:
        args = (x, _ld_i8, np.empty(x.shape[1], np.int32), np.int32(-1))
    elif x.dtype == np.float16:
        args = (x.view(np.uint16), _ld_f16, np.empty(x.shape[1], np.float32), np.float32(-1))
    else:
        args = (x, _ld_f32, np.empty(x.shape[1], np.float32), np.float32(-1))
    xs, load, center, neg = args
    _coreset(xs, int(k), int(start), mind, _HALF, load, center, neg, nchunks, idx)
    return idx


@_jit
def _pool_row(plane, ho, k, s, p, wo, is_max, acc):  # pragma: no cover - compiled
    h, w = plane.shape
    for j in range(wo):
        acc[j] = -np.inf if is_max else 0.0
    for kh in range(k):
        r = ho * s + kh - p
        if r < 0 or r >= h:
            continue
        for kw in range(k):
            for j in range(wo):
                col = j * s + kw - p
                if 0 <= col < w:
                    v = plane[r, col]
                    if is_max:
                        if v > acc[j]:
                            acc[j] = v
                    else:
                        acc[j] += v
    if not is_max:
        for j in range(wo):
            acc[j] /= k * k


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
                    for j in range(wo):
                        col = j * s + rem % k - p
                        if 0 <= col < w:
                            tmp[i, j] += x[b, ch, r, col]
                for j in range(wo):
                    tmp[i, j] /= f1 - f0
        else:
            pooled = np.empty((planes, wo), dtype=np.float32)
            for ch in range(c):
                _pool_row(x[b, ch], ho, k, s, p, wo, mode == 1, pooled[ch])
                if mode == 2:
                    _pool_row(x[b, ch], ho, k, s, p, wo, True, pooled[c + ch])
            for i in range(dout):
                c0, c1 = (i * length) // dout, ((i + 1) * length + dout - 1) // dout
                for ch in range(c0, c1):
                    for j in range(wo):
                        tmp[i, j] += pooled[ch, j]
                for j in range(wo):
                    tmp[i, j] /= c1 - c0
        for j in range(wo):
            for i in range(dout):
                out[b, ho, j, i] = tmp[i, j]


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
