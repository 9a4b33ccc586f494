"""Whether MLX's CUDA JIT cache is warm. MLX keeps NVRTC's output on disk, so only the first run on a machine
pays the JIT compiles (~25-38 s per kernel family on an H100); a run's speed, and how far its budget goes,
depend on it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import mlx.core as mx

from ..backends.device import Backend


def ptx_cache_dir() -> Path:
    """MLX's `ptx_cache_dir()` (mlx/backend/cuda/jit_module.cpp): $MLX_PTX_CACHE_DIR, else
    `std::filesystem::temp_directory_path()/mlx/<version>/ptx`, the temp dir being $TMPDIR (or TMP, TEMP,
    TEMPDIR), else /tmp."""
    if os.environ.get("MLX_PTX_CACHE_DIR"):
        return Path(os.environ["MLX_PTX_CACHE_DIR"])
    tmp = next((os.environ[v] for v in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(v)), "/tmp")
    return Path(tmp) / "mlx" / mx.__version__ / "ptx"


def state(backend: Backend) -> dict[str, Any] | None:
    """On CUDA: the cache directory and how many compiled modules (one .ptx file each) it holds; else None."""
    if backend.kind != "cuda":
        return None
    path = ptx_cache_dir()
    modules = sum(1 for _ in path.glob("*.ptx"))
    return {"dir": str(path), "modules": modules, "warm": modules > 0}


def describe(cache: dict[str, Any]) -> str:
    if cache["warm"]:
        return f"CUDA JIT cache {cache['dir']} is warm ({cache['modules']} compiled modules)"
    return (f"CUDA JIT cache {cache['dir']} is cold (empty): each kernel family JIT-compiles on first use "
            "(~25-38 s each); a persistent MLX_PTX_CACHE_DIR keeps them for later runs")
