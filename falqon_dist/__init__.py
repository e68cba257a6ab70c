"""falqon_dist: distributed FP8 LoRA fine-tuning with FALQON (melded FP8 LoRA, arXiv 2510.24061).

Public API::

    import falqon_dist as fd
    cfg = fd.FalqonConfig(rank=64, merge="every_row", init="svd", backend="auto")
    names = fd.convert_model(model, cfg)   # swap eligible nn.Linear for fd.FalqonLinear
    ...                                    # optimizer step on the B proxies
    stats = fd.merge_proxies_(model, step=step)   # merge B into the FP8 backbone; B keeps the carry

Under DeepSpeed (or any optimizer that keeps its own master copy of B) the same merge runs as
FALQON's post-optimizer hook, ``falqon_dist.distributed.ProxyMergeHook(engine.module,
engine.optimizer)``, called after each optimizer step.
"""

from falqon_dist import export  # noqa: F401  (registers the FP8 export as a converted model's save_pretrained)
from falqon_dist.method import (
    FalqonConfig,
    FalqonLinear,
    convert_model,
    falqon_layers,
    merge_proxies_,
)

__all__ = ["FalqonConfig", "FalqonLinear", "convert_model", "falqon_layers", "merge_proxies_"]
__version__ = "0.1.0"
