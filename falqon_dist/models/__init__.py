"""Embedded default base model, shipped in the package (no model hub at run time).

Public API::

    from falqon_dist.models import build_tiny_model, tiny_config, build_tiny_tokenizer
    path = build_tiny_model()        # the package's own model directory, its files checked
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
"""

from falqon_dist.models.tiny import TINY_NAME, build_tiny_model, default_cache_dir, tiny_config
from falqon_dist.models.tokenizer import build_tiny_tokenizer

__all__ = [
    "TINY_NAME",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "default_cache_dir",
    "tiny_config",
]
