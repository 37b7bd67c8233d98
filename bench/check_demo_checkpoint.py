"""Does packing the local training output reproduce the shipped demo checkpoint, tensor for tensor?

    python -m demo train                       # writes build/demo/ternary/checkpoint.pt (~17 min, 1 thread)
    python bench/check_demo_checkpoint.py      # then: exit 0 when every tensor is equal

Not a test: it needs the git-ignored training output, which a clean clone does not have.
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    import torch
    from safetensors.torch import load_file

    from demo import pack
    from demo.train import load_checkpoint

    master = os.path.join(ROOT, "build", "demo", "ternary", "checkpoint.pt")
    if not os.path.exists(master):
        print(f"no training output at {master}; run: python -m demo train", file=sys.stderr)
        return 2
    shipped = load_file(os.path.join(ROOT, "models", "shakespeare-bitnet", "model.safetensors"))
    ours = pack.packed_state_dict(load_checkpoint(master))
    differ = sorted(set(ours) ^ set(shipped)) + [k for k in ours if k in shipped and not torch.equal(ours[k], shipped[k])]
    print("equal" if not differ else f"{len(differ)} tensors differ, e.g. {differ[:3]}")
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
