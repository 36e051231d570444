import os

import pytest
import torch

torch.set_num_threads(max(1, int(os.environ.get("CBAM_TEST_THREADS", "1"))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def native_kernel():
    """The optional native CPU kernel, built (or loaded from the cache) once per session; skipped
    where it cannot be built (no compiler), except in CI, where it must build."""
    from cbam_insert import CBAMInsertError, native

    try:
        return native.build()
    except CBAMInsertError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
