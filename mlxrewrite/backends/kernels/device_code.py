"""The kernels' device code (the .cuh files beside this module, shipped in the package) as the header of an
`mx.fast.cuda_kernel`."""

from __future__ import annotations

import hashlib
from pathlib import Path

AFFINE_QUANTIZE = Path(__file__).with_name("affine_quantize.cuh")  # mx.quantize's arithmetic for one group


def _compact(source: str) -> str:
    """Device code without comments and indentation."""
    lines = (line.split("//")[0].strip() for line in source.splitlines())
    return "\n".join(line for line in lines if line)


def header(*files: Path) -> str:
    """What an instantiation's source starts with: each file #included by path. MLX hashes a kernel's whole
    source each time it evaluates it, and builds it anew at each call: 11 KB of device code inline cost about
    2.6 us per call on an H200, an #include of it by path 0.3 us (bench/results/cuda-nvidia-h200/
    host_cost_n4096.json). Each line carries its file's hash, so an edited file makes a new kernel, not one
    compiled earlier; a path that cannot be written in a C string gets the file inline."""
    lines = []
    for file in files:
        text = file.read_text()
        path = str(file.resolve())
        if path.isascii() and path.isprintable() and '"' not in path and "\\" not in path:
            lines.append(f'#include "{path}"  // sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}')
        else:
            lines.append(_compact(text))
    return "\n".join(lines) + "\n"  # MLX appends its own code to the header's last line
