"""DeepSpeed config validation for FALQON (no processes launched)."""

from __future__ import annotations

import pytest

from falqon_dist.distributed import DeepSpeedConfigError, prepare_ds_config


def test_fills_optimizer_and_keeps_user_values(monkeypatch):
    from falqon_dist.distributed import config as ds_config_module

    cfg = prepare_ds_config({"train_micro_batch_size_per_gpu": 4}, on_cpu=True, lr=0.05)
    assert cfg["optimizer"] == {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.0, "torch_adam": True}}
    assert cfg["zero_optimization"]["stage"] == 0 and cfg["train_micro_batch_size_per_gpu"] == 4
    user = {"optimizer": {"type": "Adam", "params": {"lr": 1.0, "betas": [0.9, 0.95]}}}
    monkeypatch.setattr(ds_config_module, "nvcc_available", lambda: True)  # FusedAdam can be built
    gpu = prepare_ds_config(user, on_cpu=False)
    assert gpu["optimizer"] == {"type": "Adam", "params": {"lr": 1.0, "betas": [0.9, 0.95]}}
    monkeypatch.setattr(ds_config_module, "nvcc_available", lambda: False)  # no nvcc: FusedAdam's JIT build would fail
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
        ({"zero_optimization": {"stage": 3, "zero_quantized_weights": True}}, "zero_quantized_weights"),
        ({"zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}}, "zero_hpz_partition_size"),
        ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, "offload_param.device"),
    ],
)
def test_rejects_settings_that_break_falqon(config, key):
    with pytest.raises(DeepSpeedConfigError, match=key.replace(".", r"\.")):
        prepare_ds_config(config, on_cpu=True)
