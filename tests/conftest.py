"""Shared fixtures: the repo on sys.path (method files are scripts, not a package) and a small tiny-model setup."""

import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # the hub is never reached in tests: fail fast instead of retrying
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common  # noqa: E402


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): the random tiny Qwen2 and its byte-level tokenizer."""
    tokenizer = common.build_tiny_tokenizer()
    return common.build_tiny_model(tokenizer, seed=0), tokenizer
