"""Running a model in a given train/eval mode and putting every submodule's flag back afterwards.

``model.train(was)`` restores one flag for the whole tree; a model whose parts are in different
modes (a frozen backbone in eval, a head in train) would come back changed. ``in_mode`` records
each submodule's flag and restores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["in_mode"]


@contextlib.contextmanager
def in_mode(*models: nn.Module, training: bool = False) -> Iterator[None]:
    """Put ``models`` (and all their submodules) in train or eval mode for the block.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()
    >>> m[0].eval()  # doctest: +ELLIPSIS
    Linear(...)
    >>> with in_mode(m, training=False):
    ...     [x.training for x in m.modules()]
    [False, False, False]
    >>> [x.training for x in m.modules()]
    [True, False, True]
    """
    saved = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.train(training)
    try:
        yield
    finally:
        for m, flag in saved:
            m.training = flag
