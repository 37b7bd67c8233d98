"""The HTTP side of the playground: an OpenAI-compatible API (/v1) in the same process as the
Gradio page, with limits, a bounded queue for the one CPU, and cancel on disconnect.

    from server import attach_api
    attach_api(demo, {"bitnet-b1.58-2B-4T": engine})   # after demo.launch(prevent_thread_lock=True)

See docs/SERVING.md for the limits, environment variables and measured behaviour.
"""

from runtime.gate import Busy, Gate, QueueTimeout

from .limits import API_KEY_ENV, Limits
from .openai_api import ApiError, ApiState, ModelRegistry, attach_api, create_api, install_api

__all__ = ["API_KEY_ENV", "ApiError", "ApiState", "Busy", "Gate", "Limits", "ModelRegistry",
           "QueueTimeout", "attach_api", "create_api", "install_api"]
