import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_file(rel: str) -> Path:
    """A file from ../shared, or skip the test saying why (the product never needs ../shared)."""
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"{p} is absent (../shared is only beside developer and CI checkouts)")
    return p


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _offline_tiktoken():
    cache = SHARED / "tiktoken-cache"
    if cache.is_dir() and "TIKTOKEN_CACHE_DIR" not in os.environ:
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    yield
