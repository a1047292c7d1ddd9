"""Shared test helpers: where the release's reference fixtures live."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the first shared/ that holds the fixtures (beside the checkout, or inside it on the GPU machine)
SHARED = next((p for p in (ROOT.parent / "shared", ROOT / "shared") if (p / "fixtures" / "reference").is_dir()),
              ROOT.parent / "shared")
REFERENCE = SHARED / "fixtures" / "reference"


@pytest.fixture
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE} (they ship beside the checkout as shared/)")
    return REFERENCE
