"""The DeepSpeed config of a run and its validation for FALQON (no processes launched)."""

from __future__ import annotations

import json
import logging

import pytest

from falqon_dist.distributed import DeepSpeedConfigError, build_ds_config, prepare_ds_config
from falqon_dist.distributed.config import DeepSpeedConfig


def test_fills_optimizer_and_keeps_user_values(monkeypatch):
    from falqon_dist.distributed import config as ds_config_module

    cfg = prepare_ds_config({"train_micro_batch_size_per_gpu": 4}, on_cpu=True, lr=0.05)
    assert cfg["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 0.05, "weight_decay": 0.0, "torch_adam": True},
    }
    assert cfg["zero_optimization"]["stage"] == 0 and cfg["train_micro_batch_size_per_gpu"] == 4
    user = {"optimizer": {"type": "Adam", "params": {"lr": 1.0, "betas": [0.9, 0.95]}}}
    monkeypatch.setattr(ds_config_module, "nvcc_available", lambda: True)  # FusedAdam can be built
    gpu = prepare_ds_config(user, on_cpu=False)
    assert gpu["optimizer"] == {"type": "Adam", "params": {"lr": 1.0, "betas": [0.9, 0.95]}}
    monkeypatch.setattr(
        ds_config_module, "nvcc_available", lambda: False
    )  # no nvcc: FusedAdam's JIT build would fail
    assert prepare_ds_config(user, on_cpu=False)["optimizer"]["params"]["torch_adam"] is True


def test_does_not_mutate_the_input():
    user = {"zero_optimization": {"stage": 2}}
    prepare_ds_config(user, on_cpu=True)
    assert user == {"zero_optimization": {"stage": 2}}


@pytest.mark.parametrize(
    "config, key",
    [
        ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage"),
        ({"fp16": {"enabled": True}}, "fp16.enabled"),
        (
            {"zero_optimization": {"stage": 3, "zero_quantized_weights": True}},
            "zero_quantized_weights",
        ),
        (
            {"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}},
            "zero_hpz_partition_size",
        ),
        (
            {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
            "offload_param.device",
        ),
    ],
)
def test_rejects_settings_that_break_falqon(config, key):
    with pytest.raises(DeepSpeedConfigError, match=key.replace(".", r"\.")):
        prepare_ds_config(config, on_cpu=True)


RUN = {
    "micro_batch_size": 4,
    "grad_accum": 2,
    "world_size": 2,
    "lr": 0.05,
    "weight_decay": 0.0,
    "bf16": True,
}


def _settings(config=None, **fields) -> DeepSpeedConfig:
    values = {
        "zero_stage": 3,
        "gradient_clipping": 1.0,
        "param_persistence_threshold": 100,
        **fields,
    }
    return DeepSpeedConfig(**values, config=config)


def test_a_run_config_comes_from_the_settings_and_the_user_json_is_its_base(tmp_path, caplog):
    config = build_ds_config(_settings(), **RUN)
    assert config["train_batch_size"] == 16 and config["gradient_accumulation_steps"] == 2
    assert config["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 100}
    assert config["bf16"] == {"enabled": True} and config["gradient_clipping"] == 1.0
    assert config["optimizer"] == {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.0}}
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "zero_optimization": {"overlap_comm": True},
                "gradient_clipping": 5.0,
                "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}},
            }
        )
    )
    with caplog.at_level(logging.WARNING, logger="falqon_dist"):
        config = build_ds_config(_settings(user), **RUN)
    assert (
        config["zero_optimization"]["overlap_comm"] is True and config["gradient_clipping"] == 1.0
    )
    assert config["optimizer"]["params"] == {"betas": [0.9, 0.95], "lr": 0.05, "weight_decay": 0.0}
    assert "gradient_clipping=5.0" in caplog.text  # the run's value wins, and it says so


@pytest.mark.parametrize(
    "user, message",
    [
        (
            {"zero_optimization": {"stage": 2}},
            "sets zero_optimization.stage=2 but deepspeed.zero_stage=3",
        ),
        ({"bf16": {"enabled": False}}, "sets bf16.enabled=false but model.dtype='bf16'"),
        ({"fp16": {"enabled": True}}, "fp16.enabled=true is not supported"),
        ([1, 2], "must hold a JSON object"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_a_user_json_that_contradicts_the_run_names_the_file_and_the_key(user, message, tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(user if isinstance(user, str) else json.dumps(user))
    with pytest.raises(DeepSpeedConfigError, match=rf"^deepspeed\.config='{path}'") as error:
        build_ds_config(_settings(path), **RUN)
    assert message in str(error.value)


def test_the_zero_stage_of_a_run_is_checked_where_the_settings_are_built():
    from falqon_dist.config_checks import InvalidField

    with pytest.raises(
        InvalidField, match=r"DeepSpeedConfig\.zero_stage must be one of \(0, 1, 2, 3\), got 4"
    ):
        _settings(zero_stage=4)
