"""Slow end-to-end tests run when CI=true or with --runslow; the rest always run."""

import os

import pytest
import torch

from gigpo_torchrl.policy import make_char_tokenizer, make_tiny_model


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("CI", "").lower() == "true":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (always run when CI=true)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every device this machine has: CPU always, CUDA too when present, so the same
    ``pytest`` on a GPU machine covers the GPU path."""
    return request.param


@pytest.fixture(scope="module")
def tiny():
    """A tiny random model and its character tokenizer, one pair per test module (tests
    may move the model or change its weights within their module)."""
    tokenizer = make_char_tokenizer()
    return tokenizer, make_tiny_model(tokenizer, seed=0)
