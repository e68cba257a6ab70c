"""falqon_dist: distributed FP8 LoRA fine-tuning with FALQON (melded FP8 LoRA, arXiv 2510.24061).

Public API::

    import falqon_dist as fd
    cfg = fd.FalqonConfig(rank=64, topk="all", init="svd", backend="auto")
    names = fd.convert_model(model, cfg)   # swap eligible nn.Linear for fd.FalqonLinear
    ...                                    # optimizer step on the B proxies
    stats = fd.merge_proxies_(model)       # merge B into the FP8 backbone; B keeps the carry
"""

from falqon_dist.method import FalqonConfig, FalqonLinear, convert_model, falqon_layers, merge_proxies_

__all__ = ["FalqonConfig", "FalqonLinear", "convert_model", "falqon_layers", "merge_proxies_"]
__version__ = "0.1.0"
