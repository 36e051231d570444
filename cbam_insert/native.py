"""Optional native CPU kernel for CBAM inference: the public switch.

One compiled call per CBAM forward in CPU inference, built on first use with
``torch.utils.cpp_extension`` (a C++ compiler and ninja; about 20 s, then cached)::

    import cbam_insert.native
    cbam_insert.native.enable()         # builds or loads; CBAMInsertError saying why if it cannot

or ``CBAM_INSERT_NATIVE=1`` in the environment. ``python -m cbam_insert.native [-v]`` builds it
ahead of time. The implementation and the rules for when a call uses it are in
``cbam_insert.fast.kernel``; see docs/performance.md.
"""

from __future__ import annotations

import sys

from .fast.kernel import ENV_VAR, build, disable, enable, is_enabled, main

__all__ = ["ENV_VAR", "build", "disable", "enable", "is_enabled", "main"]

if __name__ == "__main__":
    sys.exit(main())
