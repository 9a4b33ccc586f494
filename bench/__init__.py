"""mlxrewrite's benchmark suite: `python -m bench CASE... [--quick] [--out DIR]` (see bench/README.md).

One module per case (case_*.py); `common.py` holds the device record, interleaved timing and the
result format; `report.py` turns a directory of results into Markdown.
"""

CASES = ("gqa", "sdpa", "overhead", "mlx_lm")  # suite order: module bench.case_<name> each
