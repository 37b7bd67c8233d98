"""pytest parameters for every BITNET_KERNEL level: the ones this CPU lacks are skipped with
the missing features in the reason, so a test summary says which kernels it proved."""

from __future__ import annotations

import pytest

import custom_ops

AVAILABLE = custom_ops.available_kernels()


def kernel_params(levels=custom_ops.KERNELS):
    params = []
    for level in levels:
        missing = [] if level in AVAILABLE else custom_ops.missing_features(level)
        reason = f"kernel {level} not proved here: this CPU lacks {', '.join(missing) or 'it'}"
        params.append(pytest.param(level, id=level, marks=pytest.mark.skipif(bool(missing), reason=reason)))
    return params


KERNEL_PARAMS = kernel_params()
