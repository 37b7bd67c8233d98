"""Generation engine for exported BitNet ONNX model folders (see runtime/README.md).

    from runtime import Engine, GenerationSettings
    engine = Engine("models/bitnet-2b", variant="ternary", threads=2)
    for event in engine.stream(messages=[{"role": "user", "content": "Hi"}],
                               settings=GenerationSettings(max_new_tokens=64)):
        print(event.text, end="", flush=True)
"""

from .engine import Engine
from .errors import EngineError, PromptTooLongError, VariantNotFoundError
from .folder import VARIANTS
from .generation import GenerationEvent, GenerationResult
from .sampling import GenerationSettings, token_distribution
from .stats import GenerationStats

__all__ = ["Engine", "EngineError", "GenerationEvent", "GenerationResult", "GenerationSettings",
           "GenerationStats", "PromptTooLongError", "VariantNotFoundError", "VARIANTS",
           "token_distribution"]
