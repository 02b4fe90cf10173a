"""Fixtures shared by the test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

# The project's real benchmark files live next to the checkout (…/shared/data), not in the repository.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data(monkeypatch) -> Path:
    """Point $COLLABEDIT_DATA at the shared data folder (skip when this checkout has none)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not found (real-data tests need it)")
    monkeypatch.setenv("COLLABEDIT_DATA", str(SHARED_DATA))
    return SHARED_DATA
