"""Tests see the source-facts policy only: a doctor profile cached on a developer's machine must not change
which rewrite a test expects (tests that need a profile make their own, in tmp_path)."""

import os

os.environ["MLXREWRITE_PROFILE"] = "off"

import pytest  # noqa: E402

from mlxrewrite import intercept  # noqa: E402


@pytest.fixture(autouse=True)
def mlx_left_unpatched():
    """Every handler context a test opens is closed again: MLX is never left patched."""
    yield
    assert intercept._PATCH.depth == 0, "a handling() context was left open"
    assert all(getattr(s.module, s.attr) is intercept.original(n) for n, s in intercept.APIS.items())
