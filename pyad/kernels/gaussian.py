"""Per-position Gaussians and the Mahalanobis distance (PaDiM, Defard et al. 2020, §3;
official code xiahaifeng1995/PaDiM-Anomaly-Detection-Localization-master).

Fitting is BLAS work (batched outer products in float32 summed in float64,
batched Cholesky in float64) done by torch on every core, streamed:
``GaussianAccumulator`` holds one batch plus O(P·d²) statistics. Scoring is
the compiled kernel: the precision is never formed; each position stores
A = L⁻¹ (Σ = L Lᵀ, so Σ⁻¹ = AᵀA) packed row by row as its d(d+1)/2
lower-triangular values, in float32 or float16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import _backend, _validate

_DTYPES = ("float32", "float16")
# Positions per chunk when forming d x d matrices: bounds the temporaries.
_CHUNK_BYTES = 8 << 20  # 64 -> 8 MB: the solve's transient memory 0.41 -> 0.15 GB (P=4096, d=100), no slower


@dataclass(frozen=True, eq=False)
class GaussianModel:
    """Fitted per-position Gaussians.

    mean:   [P, d] float32, the sample mean.
    factor: [P, d(d+1)/2] float32 or float16, rows of A = L⁻¹ packed row-major
            (row i holds A[i, 0..i]), with Σ + eps·I = L Lᵀ.
    eps:    the regularisation added to each covariance's diagonal.
    count:  number of images the statistics came from.
    """

    mean: np.ndarray
    factor: np.ndarray
    eps: float
    count: int
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def positions(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    @property
    def nbytes(self) -> int:
        return self.mean.nbytes + self.factor.nbytes

    def inverse_factor(self) -> np.ndarray:
        """A as dense [P, d, d] float64 lower-triangular matrices."""
        d = self.dim
        rows, cols = np.tril_indices(d)
        a = np.zeros((self.positions, d, d))
        a[:, rows, cols] = self.factor
        return a

    def precision(self) -> np.ndarray:
        """Σ⁻¹ = AᵀA as dense [P, d, d] float64 (for inspection and interop)."""
        a = self.inverse_factor()
        return np.einsum("pki,pkj->pij", a, a)

    def astype(self, dtype: str) -> "GaussianModel":
        """The same model with the factor stored as ``dtype`` ("float32" or "float16")."""
        _validate.choice(dtype, "dtype", _DTYPES)
        return GaussianModel(self.mean, _cast_factor(self.factor, dtype), self.eps, self.count)


def _cast_factor(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16" and np.abs(a).max(initial=0.0) > np.finfo(np.float16).max:
        raise ValueError("dtype: the factor exceeds the float16 range; use dtype='float32' or a larger eps")
    return np.ascontiguousarray(a, dtype=dtype)


class GaussianAccumulator:
    """Streaming fit: ``update(batch)`` any number of times, then ``finalize()``.

    Holds shifted sums in float64 (shift K = the first batch's mean): S1 = Σ(x-K)
    and the packed S2 = Σ(x-K)(x-K)ᵀ, so mean = K + S1/n and scatter = S2 - S1S1ᵀ/n
    with little cancellation (K is close to the mean). Each batch costs one float32
    GEMM per position (torch, batched), its sums added to the float64 totals; the
    result equals the one-shot sample covariance whatever the batching (tested).
    ``merge`` combines two accumulators (Chan et al.).
    """

    def __init__(self, eps: float = 0.01, dtype: str = "float32"):
        if not (isinstance(eps, (int, float)) and np.isfinite(eps) and eps >= 0):
            raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
        self.eps = float(eps)
        self.dtype = _validate.choice(dtype, "dtype", _DTYPES)
        self.count = 0
        self._shift: np.ndarray | None = None  # [P, d] float64 (a float32 value)
        self._s1: np.ndarray | None = None  # [P, d] float64
        self._s2: np.ndarray | None = None  # [P, d(d+1)/2] float64, packed

    def update(self, batch) -> "GaussianAccumulator":
        """Add ``batch`` [n, P, d] of features (n images, P positions, d channels)."""
        x = _validate.array(batch, "batch", 3)
        n, p, d = x.shape
        if self._shift is None:
            self._shift = x.mean(axis=0, dtype=np.float64).astype(np.float32).astype(np.float64)
            self._s1 = np.zeros((p, d))
            self._s2 = np.zeros((p, d * (d + 1) // 2))
        elif self._shift.shape != (p, d):
            raise ValueError(f"batch: expected [n, {self._shift.shape[0]}, {self._shift.shape[1]}], got {x.shape}")
        if _backend.name() == "native":  # compiled, float64 sums per position in cache, in place (64
            # images at P=4096, d=100 on 2 cores: 110-215 -> 61-78 ms); float64 sums tested on every ISA
            _backend.current().gaussian_update(x, self._shift.astype(np.float32), self._s1, self._s2)
            self.count += n
            return self
        import torch

        xt = torch.from_numpy(x if x.flags.writeable else x.copy())  # torch warns on read-only buffers
        shift = torch.from_numpy(self._shift.astype(np.float32))
        s1, s2 = torch.from_numpy(self._s1), torch.from_numpy(self._s2)
        flat = torch.from_numpy(_packed_index(d))
        step = max(1, _CHUNK_BYTES // (4 * d * max(d, n)))
        # torch's batched GEMM on both cores, float32 partial sums of one batch added
        # to the float64 totals (P=4096, d=100, 64 images: 0.50 s in NumPy -> 0.20 s)
        for q0 in range(0, p, step):  # position chunks: no full-size copy of the batch
            q = slice(q0, q0 + step)
            yc = xt[:, q] - shift[q]  # [n, c, d]
            s1[q] += yc.sum(0)
            v = yc.transpose(0, 1)  # [c, n, d], a view
            s2[q] += torch.bmm(v.transpose(1, 2), v).reshape(len(v), d * d).index_select(1, flat)
        self.count += n
        return self

    def _moments(self, q=slice(None)) -> tuple[np.ndarray, np.ndarray]:
        """(mean [c, d], packed scatter [c, T]) of positions ``q``, float64."""
        d = self._shift.shape[1]
        rows, cols = np.tril_indices(d)
        s1 = self._s1[q]
        return self._shift[q] + s1 / self.count, self._s2[q] - s1[:, rows] * s1[:, cols] / self.count

    def merge(self, other: "GaussianAccumulator") -> "GaussianAccumulator":
        """A new accumulator holding the statistics of both (Chan et al.), in the same
        shifted form ``update`` keeps (a float32-representable shift), so it can be
        updated further and finalizes like a single-pass fit."""
        parts = [a for a in (self, other) if a.count]
        out = GaussianAccumulator(self.eps, self.dtype)
        if not parts:
            return out
        mean, scatter = parts[0]._moments()
        count = parts[0].count
        for acc in parts[1:]:
            if acc._shift.shape != parts[0]._shift.shape:
                raise ValueError(f"other: positions/channels {acc._shift.shape} differ from {parts[0]._shift.shape}")
            m_b, s_b = acc._moments()
            delta = m_b - mean
            rows, cols = np.tril_indices(delta.shape[1])
            scatter = scatter + s_b + (delta[:, rows] * delta[:, cols]) * (count * acc.count / (count + acc.count))
            mean = mean + delta * (acc.count / (count + acc.count))
            count += acc.count
        shift = mean.astype(np.float32).astype(np.float64)
        s1 = (mean - shift) * count  # S1 = Σ(x - K), S2 = scatter + S1 S1ᵀ / n
        rows, cols = np.tril_indices(mean.shape[1])
        # C order, as update and the compiled kernels need: NumPy's fancy indexing along axis 1 can
        # hand back Fortran-ordered arrays
        out._shift, out._s1, out.count = shift, np.ascontiguousarray(s1), count
        out._s2 = np.ascontiguousarray(scatter + s1[:, rows] * s1[:, cols] / count)
        return out

    def finalize(self, holdout=None):
        """The fitted model: Σ = scatter/(N-1) + eps·I, factor A = L⁻¹.

        ``holdout`` [h, P, d]: features of h images that are *included* in this
        accumulator. Then also returns their distances [h, P] under the Gaussians
        fitted without them, from the same factorisation: with n = N - h,
        Σₙ = c·Σ − VVᵀ where c = (N-1)/(n-1) and V holds the held-out deviations
        and the mean shift (rank h+1), when that model's eps is eps·c; Woodbury then
        gives zᵀΣₙ⁻¹z = ‖y‖²/c + bᵀ(I − WᵀW/c)⁻¹b with y = Az, W = AV, b = Wᵀy/c.
        One Cholesky per position instead of two (a held-out threshold for free).
        """
        if self._shift is None or self.count < 2:
            raise ValueError("features: need at least 2 images to estimate a covariance")
        p, d = self._shift.shape
        held = None
        if holdout is not None:
            held = _validate.array(holdout, "holdout", 3)
            if held.shape[1:] != (p, d):
                raise ValueError(f"holdout: expected [h, {p}, {d}], got {held.shape}")
            if self.count - len(held) < 2:
                raise ValueError(f"holdout: {len(held)} of {self.count} images leaves fewer than 2 to fit")
            held_dist = np.empty((len(held), p), np.float32)
        flat, sym = _packed_index(d), _symmetric_index(d)
        factor = np.empty((p, d * (d + 1) // 2), dtype=self.dtype)
        mean = np.empty((p, d), dtype=np.float32)
        diag = np.arange(d)

        native = _backend.name() == "native"

        def chunk(q: slice) -> None:
            s1 = self._s1[q]
            mean64 = self._shift[q] + s1 / self.count
            mean[q] = mean64
            if native:  # compiled, all threads, A and the downdate in cache (P=4096, d=100, h=21: 2.3 -> 0.8 CPU-s)
                packed = np.empty((len(s1), d * (d + 1) // 2), np.float32)
                dev = None
                if held is not None:  # the held-out images' deviations from the shift, position-major
                    dev = np.ascontiguousarray((held[:, q].astype(np.float64) - self._shift[q]).transpose(1, 0, 2))
                out = _backend.current().gaussian_factor(self._s2[q], s1, float(self.count), self.eps, packed, dev)
                factor[q] = _cast_factor(packed, self.dtype)
                if held is not None:
                    held_dist[:, q] = out.T
                return
            # scatter = S2 - S1 S1ᵀ / n, unpacked to full symmetric matrices in one gather
            cov = np.take(self._s2[q], sym, axis=1).reshape(len(s1), d, d)
            cov -= s1[:, :, None] * (s1[:, None, :] / self.count)
            cov /= self.count - 1
            cov[:, diag, diag] += self.eps
            a = _inverse_cholesky(cov)
            factor[q] = _cast_factor(np.take(a.reshape(len(a), d * d), flat, axis=1), self.dtype)
            if held is not None:
                held_dist[:, q] = _downdated_distances(a, mean64, held[:, q].astype(np.float64), self.count).T

        # chunks run by as many threads as torch uses (the batched LAPACK calls and
        # the gathers are mostly serial inside: P=4096, d=100 on 2 cores, 1.15 s ->
        # 0.82 s), each chunk about _CHUNK_BYTES / threads so the peak stays put; the
        # compiled kernel is parallel itself, so its chunks run one after another
        workers = 1 if native else _solver_threads()
        n = -(-p * 8 * d * d * workers // _CHUNK_BYTES)
        n = max(workers, -(-n // workers) * workers)
        step = -(-p // n)
        chunks = [slice(q0, q0 + step) for q0 in range(0, p, step)]
        if workers == 1 or len(chunks) == 1:
            for q in chunks:
                chunk(q)
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(chunk, chunks))
        model = GaussianModel(mean, factor, self.eps, self.count)
        return model if held is None else (model, held_dist)


def _downdated_distances(a: np.ndarray, mean_all: np.ndarray, x: np.ndarray, total: int) -> np.ndarray:
    """Mahalanobis distances [c, h] of the held-out x [h, c, d] under the Gaussians
    fitted without them (eps scaled by c = (N-1)/(n-1)), from A = L⁻¹ [c, d, d] of
    the Gaussians fitted with them (see ``GaussianAccumulator.finalize``)."""
    import torch

    h = x.shape[0]
    n = total - h
    scale = (total - 1) / (n - 1)
    mu_h = x.mean(0)  # [c, d]
    mu_n = (total * mean_all - h * mu_h) / n
    u = np.concatenate([(x - mu_h).transpose(1, 2, 0),  # [c, d, h]
                        (np.sqrt(n * h / total) * (mu_h - mu_n))[:, :, None]], axis=2) / np.sqrt(n - 1)
    at = torch.from_numpy(a)
    w = at @ torch.from_numpy(u)  # [c, d, r]
    y = at @ torch.from_numpy(np.ascontiguousarray((x - mu_n).transpose(1, 2, 0)))  # [c, d, h]
    eye = torch.eye(w.shape[2], dtype=w.dtype)
    g = eye - w.transpose(1, 2) @ w / scale  # [c, r, r], positive definite
    b = w.transpose(1, 2) @ y / scale  # [c, r, h]
    sol = torch.cholesky_solve(b, torch.linalg.cholesky(g))
    d2 = (y * y).sum(1) / scale + (b * sol).sum(1)
    return d2.clamp_min(0).sqrt().numpy()


def _solver_threads() -> int:
    try:
        import torch

        return max(1, torch.get_num_threads())
    except ImportError:  # pragma: no cover
        return 1


def _packed_index(d: int) -> np.ndarray:
    """Flat indices of the lower triangle of a d x d matrix, row by row."""
    rows, cols = np.tril_indices(d)
    return rows * d + cols


def _symmetric_index(d: int) -> np.ndarray:
    """For each entry (i, j) of a d x d matrix, the packed index of (max, min)."""
    i, j = np.divmod(np.arange(d * d), d)
    hi, lo = np.maximum(i, j), np.minimum(i, j)
    return hi * (hi + 1) // 2 + lo


def _inverse_cholesky(cov: np.ndarray) -> np.ndarray:
    """A = L⁻¹ with cov = L Lᵀ, batched [c, d, d] float64. torch's batched LAPACK
    calls when torch is importable (several times faster), NumPy otherwise."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency of pyad
        torch = None
    if torch is not None:
        t = torch.from_numpy(cov)
        chol, info = torch.linalg.cholesky_ex(t)
        if bool((info != 0).any()):
            raise ValueError("eps: covariance is not positive definite; use eps > 0")
        eye = torch.eye(cov.shape[1], dtype=t.dtype).expand_as(t)
        return torch.linalg.solve_triangular(chol, eye, upper=False).numpy()
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise ValueError("eps: covariance is not positive definite; use eps > 0") from None
    return np.linalg.inv(chol)


def gaussian_fit(features, eps: float = 0.01, dtype: str = "float32") -> GaussianModel:
    """Fit one Gaussian per position to ``features`` [N, P, d] (N images).

    Covariance is the sample covariance (divide by N-1) plus ``eps``·I, as in
    PaDiM §3 and its official code. ``dtype="float16"`` halves the factor.
    """
    return GaussianAccumulator(eps, dtype).update(features).finalize()


def mahalanobis(features, fitted: GaussianModel):
    """Distances [N, P] float32 of ``features`` [N, P, d] to ``fitted``'s Gaussians.

    NumPy arrays and torch CPU tensors run on the selected backend; torch CUDA
    tensors run on the GPU (batched GEMM) and return a CUDA tensor.
    """
    if not isinstance(fitted, GaussianModel):
        raise ValueError(f"fitted: expected a GaussianModel, got {type(fitted).__name__}")
    if _validate.is_cuda(features):
        from . import _torch

        return _torch.mahalanobis(features, fitted)
    # NaN/Inf are caught on the output: A has a positive diagonal, so a
    # non-finite feature always makes its distance non-finite (and the output
    # is d times smaller than the input to check).
    x = _validate.array(features, "features", 3, finite=False)
    if x.shape[1:] != fitted.mean.shape:
        raise ValueError(f"features: expected [N, {fitted.positions}, {fitted.dim}], got {list(x.shape)}")
    out = _backend.current().mahalanobis(x, fitted.mean, fitted.factor)
    if not np.isfinite(out).all():
        raise ValueError("features: contains NaN or Inf")
    return _torch_like(features, out)


def _torch_like(template, out: np.ndarray):
    """Return torch tensors for torch inputs (zero-copy), arrays otherwise."""
    if _validate.is_torch(template):
        import torch

        return torch.from_numpy(out)
    return out
