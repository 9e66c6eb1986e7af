"""Shared pytest configuration.

Hypothesis profiles: "ci" (the default: few examples, derandomized, no deadline) and "dev" (more
examples). Pick one with ``--hypothesis-profile NAME`` or the ``HYPOTHESIS_PROFILE`` environment
variable.
"""

import os

import pytest
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("dev", max_examples=200, deadline=None)
# ``--hypothesis-profile`` (handled by hypothesis' pytest plugin after this file is imported) wins.
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models and matrices: one intra-op thread is faster, and immune to busy-waiting on a
    loaded 2-core machine. Modules opt in with ``pytestmark = pytest.mark.usefixtures("single_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
