"""Export BitNet b1.58 checkpoints to ONNX model folders (see export/README.md).

    python -m export SOURCE --out DIR [--variants ternary,int2,int4,fp32] [--lm-head int8]
"""

from .errors import ExportError
from .exporter import DEFAULT_VARIANTS, export_checkpoint

__all__ = ["ExportError", "export_checkpoint", "DEFAULT_VARIANTS"]
