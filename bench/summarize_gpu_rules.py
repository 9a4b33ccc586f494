"""Render bench/results/gpu_rules_*.json (from bench/gpu_rules.py) as Markdown tables.

Run: python bench/summarize_gpu_rules.py bench/results/gpu_rules_h100.json > bench/results/gpu_rules_h100.md
"""

import json
import sys


def cell(entry: dict) -> str:
    if "error" in entry:
        return "raises: " + entry["error"].split(":")[1].strip()[:32]
    return f"{entry['max_err']:.1e} / {entry['us']:.0f}"


def main(path: str) -> None:
    data = json.load(open(path))
    info = data["info"]
    print(f"# Rules on {info['device']} ({info.get('gpu', {}).get('device_name', 'GPU')}), MLX {info['mlx']}, "
          f"{info['date']}\n")
    print("Produced by `bench/gpu_rules.py`; cells are max |out - dequantize-then-float32 reference| / median us "
          "of the compiled call, all variants measured side by side in one run. fp16, B=1, 8-bit keys, "
          "4-bit values, group 64, D=256, 4 kv heads x 4 repeats.\n")
    for key, title in (("quantized_matmul", "Contiguous quantized cache"),
                       ("quantized_matmul_sliced_cache", "Sliced quantized cache (buffer 200 longer than N, as "
                                                         "mlx-lm's cache views)")):
        print(f"## {title}\n")
        print("| N | M | as shipped (mx.compile) | mlxrewrite.compile | chosen | fold forced | copy forced |")
        print("|---|---|---|---|---|---|---|")
        for row in data[key]:
            print(f"| {row['N']} | {row['M']} | {cell(row['as_shipped'])} | {cell(row['rewritten'])} | "
                  f"{row['rewrite_chosen']} | {cell(row['fold'])} | {cell(row['copy'])} |")
        print()
    print("## SDPA with a constant all-True / all-zero mask (fp16, B=2, 16 q / 4 kv heads)\n")
    print("| D | L | N | mask=None us | all-True mask us | rewritten us (mask dropped) | all-zero mask us | "
          "rewritten us | max diff vs None (rewritten) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in data["sdpa"]:
        print(f"| {row['D']} | {row['L']} | {row['N']} | {row['none']['us']:.0f} | {row['true_mask']['us']:.0f} | "
              f"{row['true_mask_rewritten']['us']:.0f} ({row['true_mask_rewritten']['mask_dropped']}) | "
              f"{row['zero_mask']['us']:.0f} | {row['zero_mask_rewritten']['us']:.0f} | "
              f"{row['true_mask_rewritten']['max_diff_vs_none']:.1e} |")


if __name__ == "__main__":
    main(sys.argv[1])
