"""Connected-component labelling for AUPRO (numba; compiled on first use, cached)."""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _find(parent, i):
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@numba.njit(cache=True, nogil=True)
def label8(mask, out):
    """Two-pass union-find labelling with 8-connectivity. ``mask`` bool [H, W],
    ``out`` int32 [H, W] zeros; writes labels 1..n numbered in raster order of
    each region's first pixel and returns n."""
    h, w = mask.shape
    parent = np.empty(h * w + 1, np.int64)
    parent[0] = 0
    nxt = 1
    for y in range(h):
        for x in range(w):
            if not mask[y, x]:
                continue
            best = 0
            for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if yy >= 0 and 0 <= xx < w and out[yy, xx] > 0:
                    r = _find(parent, out[yy, xx])
                    if best == 0:
                        best = r
                    elif r != best:
                        lo, hi = min(r, best), max(r, best)
                        parent[hi] = lo
                        best = lo
            if best == 0:
                parent[nxt] = nxt
                best = nxt
                nxt += 1
            out[y, x] = best
    # compact the roots to 1..n in order of first appearance
    final = np.zeros(nxt, np.int64)
    n = 0
    for y in range(h):
        for x in range(w):
            v = out[y, x]
            if v > 0:
                r = _find(parent, v)
                if final[r] == 0:
                    n += 1
                    final[r] = n
                out[y, x] = final[r]
    return n
