"""Which model a run fine-tunes (the Hydra ``model/`` group), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass

from falqon_dist.config_checks import InvalidField, check_bool, check_choice, check_positive_int

DTYPES = ("bf16", "fp32")


@dataclass(frozen=True)
class ModelConfig:
    """``conf/model/*.yaml`` documents every field."""

    #: The preset's name (recorded in the run's config.yaml).
    name: str
    #: None = the embedded tiny model; else a Hugging Face hub name or a local directory.
    name_or_path: str | None
    #: Parameter and activation dtype: "bf16" | "fp32".
    dtype: str
    #: Tokens per training sequence; None = the model's own context (resolved before any data is
    #: built: :func:`falqon_dist.train.preflight.resolve_model_context`).
    max_length: int | None
    #: Recompute activations in backward to save memory.
    gradient_checkpointing: bool
    #: Let transformers run the model's own Python (``auto_map`` in its config.json: code shipped with
    #: the model directory or hub repository) when it has no built-in class. False (default): such a
    #: model is refused before any work, and every transformers load is called with
    #: ``trust_remote_code=False`` (never the interactive "run the custom code? [y/N]" prompt). A
    #: default, so configs saved before the field existed still restore.
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        owner = "ModelConfig"
        if not isinstance(self.name, str) or not self.name:
            raise InvalidField(owner, "name", "must be a non-empty string", self.name)
        if self.name_or_path is not None and (
            not isinstance(self.name_or_path, str) or not self.name_or_path
        ):
            raise InvalidField(
                owner,
                "name_or_path",
                "must be null (embedded tiny model) or a hub name / directory",
                self.name_or_path,
            )
        check_choice(owner, "dtype", self.dtype, DTYPES)
        if self.max_length is not None:
            check_positive_int(owner, "max_length", self.max_length)
        check_bool(owner, "gradient_checkpointing", self.gradient_checkpointing)
        check_bool(owner, "trust_remote_code", self.trust_remote_code)
