"""Shared fixtures. ember is imported first so its OMP_WAIT_POLICY default applies before torch loads."""

from __future__ import annotations

import ember  # noqa: F401  (sets the OpenMP wait policy before torch is imported)

import pytest

from checkpoints import FAMILIES, build_checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory):
    """checkpoint_dir(family) -> folder of a tiny random-weight HF checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("checkpoints")
    return lambda family: build_checkpoint(family, str(root / family))


@pytest.fixture(scope="session", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param
