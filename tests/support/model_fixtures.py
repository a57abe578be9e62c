"""Session-scoped pytest fixtures: the tiny NLI models of :mod:`tests.support.models`.

Registered by ``tests/conftest.py`` (``pytest_plugins``). Each model is built once per test
session into a temporary directory and shared read-only by every test that asks for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.models import build_tiny_bart, build_tiny_deberta, build_tiny_two_class


@pytest.fixture(scope="session")
def tiny_bart_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BART NLI model: contradiction / neutral / entailment, max length 128."""
    return build_tiny_bart(tmp_path_factory.mktemp("tiny-bart"))


@pytest.fixture(scope="session")
def tiny_deberta_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny DeBERTa-v2 NLI model: entailment / neutral / contradiction, max length 128."""
    return build_tiny_deberta(tmp_path_factory.mktemp("tiny-deberta"))


@pytest.fixture(scope="session")
def tiny_two_class_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BERT with entailment / not_entailment labels, max length 128."""
    return build_tiny_two_class(tmp_path_factory.mktemp("tiny-two-class"))
