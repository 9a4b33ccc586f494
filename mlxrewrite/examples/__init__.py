"""The built-in examples (`mlxrewrite example NAME` runs `NAME.py`; `mlxrewrite audit
mlxrewrite.examples.NAME:FUNC` audits one). A package so that the wheel ships them."""
