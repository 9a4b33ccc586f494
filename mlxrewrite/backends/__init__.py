"""What the rules run on: `device.py` (which backend and device, and the doctor's profile file),
`kernels/` (the fused quantized-attention kernel for CUDA and its algorithm in MLX ops; the packed cache's row
kernel, `kv_pack`) and `isolation.py`
(a child process for calls that may crash the device)."""
