"""`python -m custom_ops install DIR`: put a copy of the library into a model folder.

onnxruntime-genai loads a `custom_ops_library` only from inside the model folder (a relative
path, no "..", resolved through links), so an exported folder carries its own copy
(`python -m export` calls this). The copy is compiled on, and for, the machine that made it:
the kernels are chosen at load time from the CPU's features, but another architecture, or an
older C/C++ runtime, needs the copy replaced by running this command there.
"""

from __future__ import annotations

import os
import shutil

from .build import LIBRARY_NAME, ensure_built


def install(folder) -> str:
    """Copy the (built, up-to-date) library to folder/LIBRARY_NAME, replacing an older copy
    atomically; return the copy's path."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder {folder} does not exist")
    target = os.path.join(folder, LIBRARY_NAME)
    tmp = target + ".tmp"
    shutil.copyfile(ensure_built(), tmp)   # a real file: genai rejects a link leading outside
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target
