"""The engine-directory contract: ``manifest.schema.json`` and ``FORMAT.md``."""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

FORMAT_NAME = "specrt-engine"
# 2: kv_cache.update ("write-new" | "in-place") is required; 1 meant "write-new".
# 3: the draft is optional; a draft may be a feature head (kind, feature_head, the target's features);
#    a graph may take tree passes (kv_cache.tree).
# 4: a graph may take kv_cache.logits_from (logits for the last rows only: a prefill chunk asks for one).
#    Directories without it are written as version 3.
FORMAT_VERSION = 4
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3, 4)


@lru_cache(maxsize=1)
def manifest_schema() -> dict:
    return json.loads(resources.files(__name__).joinpath("manifest.schema.json").read_text())
