"""Package discovery that pyproject.toml cannot express: every `mlxrewrite/**/__init__.py` package, plus
the repository's `rules/` directory installed as `mlxrewrite.rules` (so a new subpackage is never left
out of the wheel). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["mlxrewrite", "mlxrewrite.*"])
    + [f"mlxrewrite.{name}" for name in find_packages(include=["rules", "rules.*"])],
    package_dir={"mlxrewrite.rules": "rules"},
    package_data={"mlxrewrite": ["configs/*.json", "backends/kernels/*.cuh"]},
)
