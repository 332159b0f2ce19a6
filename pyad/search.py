"""Exact nearest-neighbour search, the CPU fast paths of ``pyad.ops.NearestNeighbours``:
``FlatIndex`` (``knn_search`` over the whole bank) and, for large banks, ``BoundedIndex``
(a projected lower bound).

With the bank centred on its mean μ and P the top ``dim`` principal directions
(orthonormal), every vector splits into its projection p = Pᵀ(x − μ) and the norm r of
its residual. For a query q and bank vector b

    ‖q − b‖² = ‖p_q − p_b‖² + ‖res_q − res_b‖²  ≥  ‖p_q − p_b‖² + (r_q − r_b)²,

the squared distance between the augmented vectors [p, r]: a lower bound that is
tight when the bank's variance lies in ``dim`` directions (patch features do). Search:
the K + 1 smallest bounds per query in the (dim+1)-space (``pyad.kernels.knn_search``: a
blocked GEMM whose distances are merged into each query's K + 1 smallest while in cache;
1024/65 ≈ 16× less arithmetic than the full search), exact distances of the K best
candidates, and the query is done when its (K+1)-th bound is above the best exact
distance. Otherwise it gets a second look at 8× the candidates, and only then an
exhaustive search (``knn_search`` over the full bank for all such queries together).
The projected dimension and the candidates trade the bound GEMM against the second looks
(WRN50 10% bank on bottle: 2% of the queries take a second look at 64 dimensions and 16
candidates, 7.6% with 8, 1% at 128 and 8); 64 and 16 are the fastest measured
(``docs/profile.md``). The result equals the exhaustive search up to
float32 rounding (ties may pick another index at the same distance).
"""

from __future__ import annotations

import threading

import numpy as np

from .kernels.knn import search_blocks


class FlatIndex:
    """Exact k-NN (squared L2) over ``bank`` [M, D] by ``knn_search``: faiss ``IndexFlatL2``'s
    distances (the same expansion), 2-4x faster on 2 cores (bank 21,401 x 96, 1,024 queries:
    206-210 -> 49-51 ms; 2,140 x 96: 18-22 -> 4-5 ms)."""

    def __init__(self, bank: np.ndarray):
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.norms = np.einsum("ij,ij->i", self.bank, self.bank)

    def search(self, q: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances [N, k], indices [N, k] int64), nearest first (k <= bank rows)."""
        return search_blocks(np.ascontiguousarray(q, dtype=np.float32), self.bank, k, self.norms)


class BoundedIndex:
    """Exact k-NN (squared L2) over ``bank`` [M, D] float32 via projected lower bounds."""

    def __init__(self, bank: np.ndarray, dim: int = 64, candidates: int = 16):
        import faiss

        bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.bank = bank
        self.candidates = candidates
        self.mean = bank.mean(0, dtype=np.float64).astype(np.float32)
        x = bank - self.mean
        cov = x.T.astype(np.float64) @ x.astype(np.float64)
        _, vecs = np.linalg.eigh(cov)
        self.basis = np.ascontiguousarray(vecs[:, ::-1][:, :dim], dtype=np.float32)  # [D, dim]
        self.low = self._augment(x)  # [M, dim + 1]
        self.low_norms = np.einsum("ij,ij->i", self.low, self.low)
        self.norms = np.einsum("ij,ij->i", bank, bank)
        self.bank_scale = float(np.einsum("ij,ij->i", x, x).max())  # for the rounding margin
        self.full = faiss.IndexFlatL2(bank.shape[1])
        self.full.add(bank)
        self.second_looks = 0  # queries that needed 8x the candidates (for the benchmarks)
        self.fallbacks = 0  # queries that needed the exhaustive search
        self._lock = threading.Lock()

    def _augment(self, centred: np.ndarray) -> np.ndarray:
        import torch

        # torch's GEMM, not NumPy's: OpenBLAS's threads spin after a call and slow the
        # OpenMP threads that run next (measured with faiss's search: 44 -> 120 ms)
        p = (torch.from_numpy(np.ascontiguousarray(centred)) @ torch.from_numpy(self.basis)).numpy()
        r2 = np.einsum("ij,ij->i", centred, centred) - np.einsum("ij,ij->i", p, p)
        return np.ascontiguousarray(np.concatenate([p, np.sqrt(np.clip(r2, 0, None))[:, None]], 1), dtype=np.float32)

    def search(self, q: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(squared distances [N, k], indices [N, k] int64), nearest first."""
        q = np.ascontiguousarray(q, dtype=np.float32)
        n_cand = min(max(self.candidates, k), self.bank.shape[0])
        if n_cand >= self.bank.shape[0]:
            return search_blocks(q, self.bank, k, self.norms)
        centred = q - self.mean
        low = self._augment(centred)
        if not np.isfinite(low).all():  # (NaN would leave a query without candidates)
            raise ValueError("q: expected finite features")
        # the margin covers float32 rounding of the bounds (relative 1e-5 of the norms)
        margin = 1e-5 * (np.einsum("nd,nd->n", centred, centred) + self.bank_scale) + 1e-12
        dist, idx, unsure = self._certified(q, low, margin, n_cand, k)
        if unsure.any():  # a second look with 8x the candidates, then the exhaustive search
            at = np.flatnonzero(unsure)
            more = min(8 * n_cand, self.bank.shape[0] - 1)
            d2, i2, still = self._certified(q[at], low[at], margin[at], more, k)
            dist[at], idx[at] = d2, i2
            if still.any():
                dist[at[still]], idx[at[still]] = self._exhaustive(q[at[still]], k)
            with self._lock:
                self.second_looks += len(at)
                self.fallbacks += int(still.sum())
        return dist.astype(np.float32), idx.astype(np.int64)

    def _certified(self, q, low, margin, n_cand: int, k: int):
        """(distances, indices, unsure): the k nearest among each query's ``n_cand``
        smallest bounds, and whether a vector beyond them could still be nearer (its
        bound, the (n_cand+1)-th smallest, is not above the k-th exact distance)."""
        lb, cand = search_blocks(low, self.low, n_cand + 1, self.low_norms)
        dist, idx = self._rerank(q, np.ascontiguousarray(cand[:, :n_cand]), k)
        return dist, idx, lb[:, n_cand] < dist[:, -1] + margin

    def _exhaustive(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest bank vectors of a few queries: the k + 8 nearest by
        ``knn_search`` (one blocked GEMM for all of them), re-ranked by their exact
        distances (the GEMM's cancellation error is relative to the norms)."""
        _, cand = search_blocks(np.ascontiguousarray(q), self.bank, min(k + 8, len(self.bank)), self.norms)
        return self._rerank(np.ascontiguousarray(q), cand, k)

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(exact squared distances [N, k], indices [N, k]) of the k nearest of each
        query's candidates [N, c] (int64)."""
        import faiss

        exact = np.empty(cand.shape, np.float32)
        self.full.compute_distance_subset(len(q), faiss.swig_ptr(q), cand.shape[1], faiss.swig_ptr(exact),
                                          faiss.swig_ptr(cand))
        order = np.argsort(exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(cand, order, 1)
