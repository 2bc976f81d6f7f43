"""Expert backends behind one interface (see interface.py). `get_backend("auto")` picks the fastest available."""
from __future__ import annotations

from typing import Callable

import warnings

import torch

from moeut_ds.experts.interface import ExpertBackend, Routing, sigmoid_topk, sort_pairs
from moeut_ds.experts.reference import ReferenceBackend

_FACTORIES: dict[str, Callable[[], ExpertBackend]] = {"reference": ReferenceBackend}


def register_backend(name: str, factory: Callable[[], ExpertBackend]) -> None:
    """Make a backend selectable by name (used by the Triton kernels and expert parallelism)."""
    _FACTORIES[name] = factory


def available_backends() -> list[str]:
    return sorted(_FACTORIES)


def get_backend(name: str = "auto") -> ExpertBackend:
    """'auto' = 'triton' when a CUDA GPU and the kernels are available, else 'reference'."""
    if name == "auto":
        name = "triton" if torch.cuda.is_available() and "triton" in _FACTORIES else "reference"
        if torch.cuda.is_available() and name == "reference":
            warnings.warn("CUDA is available but the Triton expert kernels are not importable (triton or "
                          "moeut_kernels missing: `pip install -e .`, or put <repo>/kernels on PYTHONPATH); using the "
                          "slow reference expert backend", stacklevel=2)
    if name not in _FACTORIES:
        raise ValueError(f"unknown expert backend {name!r}; available: {', '.join(available_backends())}")
    return _FACTORIES[name]()


__all__ = ["ExpertBackend", "Routing", "ReferenceBackend", "get_backend", "register_backend", "available_backends",
           "sigmoid_topk", "sort_pairs"]


def _triton_backend() -> ExpertBackend:
    import importlib
    return importlib.import_module("moeut_ds.experts.triton_backend").TritonBackend()


def _megablocks_backend() -> ExpertBackend:
    import importlib
    return importlib.import_module("moeut_ds.experts.megablocks_backend").MegaBlocksBackend()


def _importable(*modules: str) -> bool:
    """True when every module can be found, without importing any of them at moeut_ds import time."""
    import importlib.util
    return all(importlib.util.find_spec(m) is not None for m in modules)


if _importable("triton", "moeut_kernels"):  # get_backend("auto") then picks it on CUDA machines
    register_backend("triton", _triton_backend)
    if _importable("megablocks", "grouped_gemm"):   # optional comparison backend (moeut_ds/experts/megablocks_backend)
        register_backend("megablocks", _megablocks_backend)
