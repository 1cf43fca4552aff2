"""Whether the Hugging Face hub can be reached: CLIP weights (model.inference.features) and the frozen LLM blocks
(model.net.llm_blocks) fail at once with a one-line error when it cannot, instead of waiting out the hub client's
retries."""
from __future__ import annotations

import os
import socket

HUB_HOST, HUB_PROBE_SECONDS = "huggingface.co", 3.0


def hub_offline() -> bool:
    """True when downloads are off (HF_HUB_OFFLINE) or the hub does not answer within a few seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        with socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_SECONDS):
            return False
    except OSError:
        return True
