import os

import pytest
import torch

torch.set_num_threads(max(1, int(os.environ.get("CBAM_TEST_THREADS", "1"))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
