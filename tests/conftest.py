"""Tests see the source-facts policy only: a doctor profile cached on a developer's machine must not change
which rewrite a test expects (tests that need a profile make their own, in tmp_path)."""

import os

os.environ["MLXREWRITE_PROFILE"] = "off"
