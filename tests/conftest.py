"""Shared fixtures: tiny real-architecture models (built once per test session) and audio helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
VOICES_DIR = REPO_ROOT / "voices"


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Both tiny layouts, built once per session: {"equal": dir, "wide_text": dir}."""
    from finetuning.tiny_model import LAYOUTS, build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {layout: build_tiny_model(root / layout, layout=layout, seed=0) for layout in LAYOUTS}


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["equal"]
