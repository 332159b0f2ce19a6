"""pyad's compute kernels: Mahalanobis scoring, greedy coreset selection, patch
pooling, Winograd convolutions (3x3 and 4x4 kernels) and the exact k-nearest-neighbour
search's block merge.

Every kernel exists three times with one signature: compiled C++ (x86
SSE/AVX2/AVX-512 and ARM NEON, chosen at run time), numba, and the NumPy
reference in ``reference.py`` that defines it. ``info()`` says which runs;
``PYAD_BACKEND`` (native|numba|numpy) and ``PYAD_ISA`` override the choice.

Inputs are float32 (other dtypes and layouts are converted; torch CPU tensors
are used without copies; torch CUDA tensors run on the GPU). Bad arguments
raise ValueError naming the argument.
"""

from ._backend import BACKENDS, info, set_backend, set_num_threads, use_backend
from .coreset import greedy_coreset, random_projection
from .gaussian import GaussianAccumulator, GaussianModel, gaussian_fit, mahalanobis
from .knn import knn_search
from .pooling import channel_pool, patch_embed, patch_pool
from .winograd import winograd_conv, winograd_weight_grad, winograd_weights

__all__ = [
    "BACKENDS",
    "GaussianAccumulator",
    "GaussianModel",
    "channel_pool",
    "gaussian_fit",
    "greedy_coreset",
    "info",
    "knn_search",
    "mahalanobis",
    "patch_embed",
    "patch_pool",
    "random_projection",
    "set_backend",
    "set_num_threads",
    "use_backend",
    "winograd_conv",
    "winograd_weight_grad",
    "winograd_weights",
]
