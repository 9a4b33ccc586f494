"""docs/writing-rules.md runs as written: its rule, then its usage, in both paths."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "writing-rules.md"


def test_the_walkthrough_rule_works_in_both_paths():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 2  # the rule, then its use
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(DOC), "exec"), namespace)
    assert namespace["RULE"].name == "sdpa-finite-mask"
