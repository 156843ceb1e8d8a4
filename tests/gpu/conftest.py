"""GPU tests: run by `make gpu-check` on a machine with CUDA; everywhere else every test here skips, saying why."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False here)"
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
