"""Nested state (dicts, lists, JSON scalars, NumPy arrays, torch tensors) to a JSON
skeleton plus named arrays, and back: how model files and training checkpoints
store network weights, optimiser states and learned arrays without pickle.

Arrays become ``{"__array__": name}``, tensors ``{"__tensor__": name, "dtype": ...}``
(bfloat16 travels as its uint16 bits), tuples ``{"__tuple__": [...]}`` and dicts
with non-string keys (optimiser states) ``{"__items__": [[key, value], ...]}``.
"""

from __future__ import annotations

import numpy as np


def pack(obj) -> tuple[object, dict[str, np.ndarray]]:
    arrays: dict[str, np.ndarray] = {}

    def walk(x, path: str):
        import torch

        if isinstance(x, torch.Tensor):
            name = f"t{len(arrays)}"
            t = x.detach().cpu().contiguous()
            dtype = str(t.dtype).replace("torch.", "")
            arrays[name] = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            return {"__tensor__": name, "dtype": dtype}
        if isinstance(x, np.ndarray):
            name = f"a{len(arrays)}"
            if x.dtype.kind not in "biuf":
                raise ValueError(f"{path}: cannot store an array of dtype {x.dtype}")
            arrays[name] = x
            return {"__array__": name}
        if isinstance(x, (np.floating, np.integer, np.bool_)):
            return x.item()
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not any(k.startswith("__") and k.endswith("__") for k in x):
                return {k: walk(v, f"{path}.{k}") for k, v in x.items()}
            return {"__items__": [[walk(k, path), walk(v, f"{path}[{k!r}]")] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise ValueError(f"{path}: cannot store a {type(x).__name__} in a model file")

    return walk(obj, "state"), arrays


def unpack(skeleton, arrays: dict[str, np.ndarray]):
    def walk(x):
        if isinstance(x, dict):
            if "__tensor__" in x:
                import torch

                a = arrays[x["__tensor__"]]
                if x["dtype"] == "bfloat16":
                    return torch.from_numpy(a.copy()).view(torch.bfloat16)
                return torch.from_numpy(a.copy())
            if "__array__" in x:
                return arrays[x["__array__"]]
            if "__tuple__" in x:
                return tuple(walk(v) for v in x["__tuple__"])
            if "__items__" in x:
                return {walk(k): walk(v) for k, v in x["__items__"]}
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(skeleton)
