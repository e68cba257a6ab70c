"""Every shipped config composes and validates; bad values name their key (in-process, no launch)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from falqon_dist.train.settings import ConfigError, validate

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["run.dir=/tmp/falqon-test-run", *overrides])


def test_default_composes_and_validates():
    settings = validate(compose_cfg([]))
    assert settings.method.name == "falqon" and settings.deepspeed.zero_stage == 3
    assert settings.train.lr == 0.1  # FALQON's own default rate, interpolated from method.lr
    assert settings.data.name == "synthetic"


@pytest.mark.parametrize(
    "group, option",
    [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))],
)
def test_every_shipped_config_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "jsonl":
        data = tmp_path / "d.jsonl"
        data.write_text('{"prompt": "a", "response": "b"}\n')
        overrides.append(f"data.path={data}")
    settings = validate(compose_cfg(overrides))
    if group == "method":
        assert settings.method.name == option
    if group == "model" and option != "tiny":
        assert settings.model.name_or_path  # a hub name or local path preset


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=0", "train.max_steps"),
        ("train.lr=0", "train.lr"),
        ("train.grad_accum=-1", "train.grad_accum"),
        ("train.schedule=linear", "train.schedule"),
        ("train.resume=maybe", "train.resume"),
        ("method.rank=0", "method.rank"),
        ("method.topk=0", "method.topk"),
        ("model.dtype=fp16", "model.dtype"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("deepspeed.config=/no/such/ds.json", "deepspeed.config"),
        ("fp8.backend=cutlass", "fp8.backend"),
        ("wandb.mode=sometimes", "wandb.mode"),
        ("data.num_train=0", "data.num_train"),
        ("data.task=poetry", "data.task"),
        ("model.name_or_path=./no/such/model", "model.name_or_path"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_cfg([override]))


def test_jsonl_needs_an_existing_path():
    with pytest.raises(ConfigError, match=r"data\.path"):
        validate(compose_cfg(["data=jsonl", "data.path=/no/such/file.jsonl"]))
    with pytest.raises(ConfigError, match=r"data\.path"):
        validate(compose_cfg(["data=jsonl"]))


def test_unknown_key_is_rejected_by_hydra():
    with pytest.raises(Exception, match="nonexistent"):
        compose_cfg(["train.nonexistent=1"])
