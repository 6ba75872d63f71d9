"""Pipeline tests run torch single-threaded: on a shared 2-core machine, spinning OpenMP threads cost 10x."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread() -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
