"""falqon_dist inside other people's training loops.

:class:`FalqonCallback` runs FALQON's merge in a Hugging Face ``transformers.Trainer`` (or TRL's
``SFTTrainer``, a subclass)::

    import falqon_dist as fd
    from falqon_dist.integrations import FalqonCallback

    fd.convert_model(model, fd.FalqonConfig(rank=16))
    trainer = Trainer(model=model, args=TrainingArguments(..., learning_rate=0.125),
                      callbacks=[FalqonCallback(export_dir="out/fp8")])
    trainer.train()
"""

from falqon_dist.integrations.hf_trainer import FalqonCallback

__all__ = ["FalqonCallback"]
