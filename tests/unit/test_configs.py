"""Every shipped config composes and validates; bad values name their key (in-process, no launch)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import falqon_dist as fd
from falqon_dist.baselines import LoraConfig, QloraConfig
from falqon_dist.methods import METHODS, config_fields, prepare_model
from falqon_dist.train.method_group import FP8_FIELDS, RUN_METHOD_KEYS
from falqon_dist.train.preflight import preflight
from falqon_dist.train.settings import ConfigError, validate

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["run.dir=/tmp/falqon-test-run", *overrides])


def check_for_training(overrides: list[str]):
    """What the trainer does first: the coherence checks, then the machine and file checks."""
    settings = validate(compose_cfg(overrides))
    preflight(settings, world_size=2)
    return settings


def test_default_composes_and_validates():
    settings = validate(compose_cfg([]))
    assert settings.method.name == "falqon" and settings.deepspeed.zero_stage == 3
    assert settings.train.lr == 0.125  # FALQON's own default rate, interpolated from method.lr
    assert settings.data.name == "synthetic"


@pytest.mark.parametrize("merge", ["topk_carry", "topk_keep", "paper"])
@pytest.mark.parametrize("value, expected", [("null", None), ("4", 4)])
def test_falqon_topk_takes_null_or_a_count_with_a_top_k_merge(merge, value, expected):
    settings = validate(compose_cfg([f"method.merge={merge}", f"method.topk={value}"]))
    assert settings.method.config.merge == merge and settings.method.config.topk == expected
    default = validate(compose_cfg([])).method.config
    assert default.merge == "every_row" and default.topk is None  # the shipped default


@pytest.mark.parametrize(
    "group, option",
    [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))],
)
def test_every_shipped_config_composes(group, option, tmp_path):
    overrides = [f"{group}={option}"]
    if group == "method" and option == "qlora":
        pytest.importorskip("bitsandbytes")
        # the default stage 3 is rejected for qlora (below)
        overrides.append("deepspeed.zero_stage=2")
    if group == "data" and option in ("jsonl", "chat", "text"):
        data = tmp_path / "d.jsonl"
        data.write_text('{"prompt": "a", "response": "b"}\n')
        overrides.append(f"data.path={data}")
    if group == "data" and option == "mix":
        data = tmp_path / "d.jsonl"
        data.write_text('{"prompt": "a", "response": "b"}\n')
        overrides.append(
            f"data.sources=[{{path: {data}, format: jsonl, weight: 2}}, {{path: {data}, format: alpaca}}]"
        )
    settings = validate(compose_cfg(overrides))
    if group == "method":  # the file holds exactly its config class's fields, plus the run's keys
        assert (
            settings.method.name == option
            and type(settings.method.config) is METHODS[option].config
        )
        keys = set(OmegaConf.load(CONF / "method" / f"{option}.yaml")) - set(RUN_METHOD_KEYS)
        assert keys == set(config_fields(option)) - set(FP8_FIELDS.get(option, ())) - {"seed"}, (
            option
        )
    if group == "model" and option != "tiny":
        assert settings.model.name_or_path  # a hub name or local path preset


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.max_steps=0", "train.max_steps"),
        ("train.lr=0", "train.lr"),
        ("train.lr=inf", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps"),
        ("train.saturation_warn=2", "train.saturation_warn"),
        ("train.saturation_abort=-1", "train.saturation_abort"),
        ("dist.timeout_s=0", "dist.timeout_s"),
        ("method.scale_headroom=3", "method.scale_headroom"),
        ("train.grad_accum=-1", "train.grad_accum"),
        ("train.schedule=step", "train.schedule"),
        ("train.resume=maybe", "train.resume"),
        ("method.rank=0", "method.rank"),
        ("method.topk=0", "method.topk"),
        ("method.topk=every", "method.topk"),
        ("method.topk=all", "method.topk"),  # every row is method.merge=every_row now
        ("method.topk=4", "method.topk"),  # a count with the default every_row
        ("method.merge=top_k", "method.merge"),
        ("method.merge_rounding=up", "method.merge_rounding"),
        ("model.dtype=fp16", "model.dtype"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("deepspeed.config=/no/such/ds.json", "deepspeed.config"),
        ("fp8.backend=cutlass", "fp8.backend"),
        ("method.cache_weight_transpose=sometimes", "method.cache_weight_transpose"),
        ("fp8.cast=triton", "fp8.cast"),
        ("wandb.mode=sometimes", "wandb.mode"),
        ("data.num_train=0", "data.num_train"),
        ("data.task=poetry", "data.task"),
        ("model.name_or_path=./no/such/model", "model.name_or_path"),
    ],
)
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        check_for_training([override])


@pytest.mark.parametrize(
    "override",
    [
        "deepspeed.config=/no/such/ds.json",
        "model.name_or_path=./no/such/model",
        "data.path=/no/such/file.jsonl",
    ],
)
def test_missing_files_are_preflights_job_not_the_configs(override):
    """A finished run's config.yaml must validate where its training files are gone (export, eval)."""
    overrides = [override] + (["data=jsonl"] if override.startswith("data.") else [])
    settings = validate(compose_cfg(overrides))
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        preflight(settings, world_size=2)


def test_jsonl_needs_an_existing_path():
    with pytest.raises(ConfigError, match=r"data\.path"):
        check_for_training(["data=jsonl", "data.path=/no/such/file.jsonl"])
    with pytest.raises(ConfigError, match=r"data\.path"):
        validate(compose_cfg(["data=jsonl"]))


def test_mix_sources_from_the_command_line(tmp_path):
    """data=mix takes its sources as a Hydra list of mappings; each is checked like data.path."""
    data = tmp_path / "chats.jsonl"
    data.write_text(
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
    )
    settings = check_for_training(
        [
            "data=mix",
            f"data.sources=[{{path: {data}, format: chat, weight: 3}}, "
            f"{{path: [{data}, {data}], format: chat}}]",
        ]
    )
    assert [(s.path, s.format, s.weight) for s in settings.data.sources] == [
        (str(data), "chat", 3),
        ((str(data), str(data)), "chat", 1.0),
    ]
    with pytest.raises(ConfigError, match=r"data\.sources is required for data=mix"):
        validate(compose_cfg(["data=mix"]))
    with pytest.raises(
        ConfigError, match=r"data\.sources\[1\]\.path='/no/such\.jsonl': no such file"
    ):
        check_for_training(
            [
                "data=mix",
                f"data.sources=[{{path: {data}, format: chat}}, {{path: /no/such.jsonl, format: jsonl}}]",
            ]
        )
    with pytest.raises(
        ConfigError, match=r"data\.sources\[0\]\.weight must be a finite number > 0"
    ):
        validate(
            compose_cfg(["data=mix", f"data.sources=[{{path: {data}, format: chat, weight: 0}}]"])
        )


def test_unknown_key_is_rejected_by_hydra():
    with pytest.raises(Exception, match="nonexistent"):
        compose_cfg(["train.nonexistent=1"])


# --------------------------------------------------------------------------------------------- qlora
def test_qlora_settings_compose():
    pytest.importorskip("bitsandbytes")
    settings = validate(
        compose_cfg(["method=qlora", "deepspeed.zero_stage=1", "method.double_quant=false"])
    )
    assert settings.method.name == "qlora"
    assert settings.method.config == QloraConfig(
        rank=16, alpha=None, dropout=0.0, double_quant=False
    )
    assert settings.train.lr == 0.003
    # no QLoRA field
    assert validate(compose_cfg(["method=lora"])).method.config == LoraConfig(rank=16)


def test_qlora_rejects_zero3_with_the_reason():
    with pytest.raises(
        ConfigError,
        match=r"method=qlora needs deepspeed\.zero_stage 0, 1 or 2.*zero_stage=3.*quant",
    ):
        validate(compose_cfg(["method=qlora"]))  # deepspeed/default.yaml says 3


def test_qlora_double_quant_must_be_a_bool():
    with pytest.raises(
        ConfigError, match=r"method\.double_quant must be true or false, got 'maybe'"
    ):
        validate(
            compose_cfg(["method=qlora", "deepspeed.zero_stage=2", "method.double_quant=maybe"])
        )


def test_qlora_without_bitsandbytes_names_the_install_command(monkeypatch):
    import sys

    # `import bitsandbytes` now raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(
        ConfigError, match=r"method=qlora needs bitsandbytes.*pip install -e \.\[qlora\]"
    ):
        check_for_training(["method=qlora", "deepspeed.zero_stage=2"])


@pytest.mark.parametrize("method", ["lora", "fp8_lora", "full", "qlora"])
def test_export_needs_falqon(method):
    with pytest.raises(
        ConfigError, match=rf"export\.enabled=true needs method=falqon, got method={method}"
    ):
        validate(compose_cfg([f"method={method}", "deepspeed.zero_stage=2", "export.enabled=true"]))
    validate(compose_cfg(["export.enabled=true"]))  # falqon exports


def test_dropout_of_one_is_rejected():
    with pytest.raises(ConfigError, match=r"method\.dropout must be a number in \[0, 1\)"):
        validate(compose_cfg(["method=lora", "method.dropout=1.0"]))


# --------------------------------------------------------------------------------------------- fp8
def test_fp8_cast_defaults_to_compiled_and_accepts_eager():
    assert validate(compose_cfg([])).fp8.cast == "compiled"
    assert validate(compose_cfg(["fp8.cast=eager"])).fp8.cast == "eager"


def test_cache_weight_transpose_reaches_the_layers_and_refuses_zero3(tmp_path):
    settings = validate(
        compose_cfg(["method.cache_weight_transpose=true", "deepspeed.zero_stage=2"])
    )
    assert (
        settings.method.config.cache_weight_transpose and settings.method.config.backend == "auto"
    )
    with pytest.raises(
        ConfigError,
        match=r"method\.cache_weight_transpose=true needs deepspeed\.zero_stage 0, 1 or 2",
    ):
        validate(compose_cfg(["method.cache_weight_transpose=true"]))  # default stage 3

    from falqon_dist.method import falqon_layers
    from tests.models import tiny_llama

    model = tiny_llama()
    prepare_model(model, fd.FalqonConfig(rank=4, backend="emulated", cache_weight_transpose=True))
    assert all(layer.weight_t_cache is not None for _, layer in falqon_layers(model))


@pytest.mark.parametrize(
    "merge, every_row, unmerged, carry",
    [
        ("every_row", True, "keep", True),
        ("topk_carry", False, "keep", True),
        ("topk_keep", False, "keep", False),
        ("paper", False, "discard", False),
    ],
)
def test_the_merge_recipe_reaches_the_layers(merge, every_row, unmerged, carry):
    from falqon_dist.method import falqon_layers
    from tests.models import tiny_llama

    config = validate(compose_cfg([f"method.merge={merge}"])).method.config
    assert config.merge == merge
    model = tiny_llama()
    prepare_model(model, dataclasses.replace(config, backend="emulated", rank=4))
    layers = [layer for _, layer in falqon_layers(model)]
    assert layers and all(
        (layer.merge, layer.merges_every_row, layer.unmerged, layer.carry_residual)
        == (merge, every_row, unmerged, carry)
        for layer in layers
    )


def test_scale_headroom_reaches_the_layers():
    from falqon_dist.method import falqon_layers
    from tests.models import tiny_llama

    assert validate(compose_cfg([])).method.config.scale_headroom == 1  # the shipped default
    config = validate(compose_cfg(["method.scale_headroom=4"])).method.config
    assert config.scale_headroom == 4
    model = tiny_llama()
    fd.convert_model(model, fd.FalqonConfig(rank=4, backend="emulated", scale_headroom=4))
    reference = tiny_llama()
    fd.convert_model(reference, fd.FalqonConfig(rank=4, backend="emulated"))
    for (_, layer), (_, plain) in zip(falqon_layers(model), falqon_layers(reference), strict=True):
        assert torch.equal(layer.scale, plain.scale * 4)


def test_stochastic_rounding_with_a_carrying_merge_is_refused_naming_both_keys():
    for carrying in ([], ["method.merge=topk_carry"]):
        with pytest.raises(ConfigError) as caught:
            # these recipes carry
            validate(compose_cfg(["method.merge_rounding=stochastic", *carrying]))
        message = str(caught.value)
        assert (
            message.startswith("method.merge_rounding ")
            and "merge='topk_keep' or 'paper'" in message
        )
        assert (
            f"merge='{carrying[0].split('=')[1] if carrying else 'every_row'}' carries" in message
        )
    # the recipes without a carry take it
    for merge in ("topk_keep", "paper"):
        validate(compose_cfg(["method.merge_rounding=stochastic", f"method.merge={merge}"]))


def test_stochastic_merge_rounding_reaches_the_layers():
    settings = validate(compose_cfg(["method.merge_rounding=stochastic", "method.merge=topk_keep"]))
    assert settings.method.config.merge_rounding == "stochastic"
    assert validate(compose_cfg([])).method.config.merge_rounding == "nearest"

    from falqon_dist.method import falqon_layers
    from tests.models import tiny_llama

    model = tiny_llama()
    prepare_model(
        model,
        fd.FalqonConfig(rank=4, backend="emulated", merge="topk_keep", merge_rounding="stochastic"),
    )
    layers = falqon_layers(model)
    assert all(layer.merge_rounding == "stochastic" for _, layer in layers)
    assert len({layer.seed for _, layer in layers}) == len(layers)  # a noise stream per layer


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA refusal")
def test_te_backend_is_refused_before_work_where_it_cannot_run():
    with pytest.raises(
        ConfigError, match=r"fp8\.backend='te' needs NVIDIA Transformer Engine.*scaled_mm"
    ):
        check_for_training(["fp8.backend=te"])
    with pytest.raises(ConfigError, match=r"fp8\.backend='te'"):
        check_for_training(["fp8.backend=te", "method=fp8_lora"])
    check_for_training(["fp8.backend=te", "method=lora"])  # no FP8 GEMMs: the backend is not used


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the no-CUDA fallback")
def test_a_run_trained_with_te_restores_anywhere(tmp_path):
    """Export / eval of a te-trained run on a machine without TE: the bytes do not depend on the backend."""
    from omegaconf import OmegaConf

    from falqon_dist.train.saved_config import load_run_config

    cfg = compose_cfg(["fp8.backend=te", f"run.dir={tmp_path}"])
    OmegaConf.save(cfg, tmp_path / "config.yaml", resolve=True)  # as the trainer writes it
    _, settings = load_run_config(tmp_path)
    assert settings.fp8.backend == "auto"


def test_configs_saved_before_a_key_existed_still_restore(tmp_path):
    """Run directories and exports outlive config changes: a key added later reads as its default."""
    from omegaconf import OmegaConf

    from falqon_dist.train.saved_config import load_run_config

    cfg = OmegaConf.to_container(compose_cfg([f"run.dir={tmp_path}"]), resolve=True)
    del cfg["method"]["cache_weight_transpose"], cfg["method"]["init"]
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "config.yaml")
    _, settings = load_run_config(tmp_path)
    assert (
        settings.method.config.cache_weight_transpose is False
        and settings.method.config.init == "svd"
    )


@pytest.mark.parametrize("method", ["falqon", "lora"])
def test_a_moved_key_reads_as_its_new_one_in_saved_configs_and_resumes(method, tmp_path):
    """fp8.cache_weight_transpose became method.cache_weight_transpose (FALQON's own config): a run
    saved with the old key restores with its value, and resuming it compares the value, not the key."""
    from omegaconf import OmegaConf

    from falqon_dist.train.run_dir import check_resume
    from falqon_dist.train.saved_config import load_run_config

    stage = ["deepspeed.zero_stage=2"]
    cfg = OmegaConf.to_container(
        compose_cfg([f"method={method}", f"run.dir={tmp_path}", *stage]), resolve=True
    )
    cfg["method"].pop("cache_weight_transpose", None)
    cfg["fp8"]["cache_weight_transpose"] = True
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "config.yaml")
    _, settings = load_run_config(tmp_path)
    assert getattr(settings.method.config, "cache_weight_transpose", True) is True
    same = [f"method={method}", f"run.dir={tmp_path}", *stage] + (
        ["method.cache_weight_transpose=true"] if method == "falqon" else []
    )
    warnings = check_resume(tmp_path, compose_cfg(same), 2, 2)
    assert not any("cache_weight_transpose" in w for w in warnings)
    if method == "falqon":
        with pytest.raises(ConfigError, match=r"method\.cache_weight_transpose: True -> False"):
            check_resume(tmp_path, compose_cfg([f"run.dir={tmp_path}", *stage]), 2, 2)


def test_a_moved_key_on_the_command_line_is_renamed_with_a_notice(capsys):
    from falqon_dist.train.bootstrap import move_overrides

    assert move_overrides(["fp8.cache_weight_transpose=true", "train.lr=1"]) == [
        "method.cache_weight_transpose=true",
        "train.lr=1",
    ]
    assert (
        "fp8.cache_weight_transpose is now method.cache_weight_transpose" in capsys.readouterr().err
    )


# ------------------------------------------------------------- FALQON's old merge keys (method.merge now)
def _saved_run(tmp_path, method_keys: dict, drop: tuple[str, ...] = ("merge", "topk")) -> Path:
    """A run directory whose config.yaml is today's default but for its method section: ``drop``
    removed, ``method_keys`` written (as a run saved by an older version)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(compose_cfg([f"run.dir={tmp_path}"]), resolve=True)
    for key in drop:
        cfg["method"].pop(key)
    cfg["method"].update(method_keys)
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "config.yaml")
    return tmp_path


@pytest.mark.parametrize(
    "saved, merge, topk",
    [
        (
            {"topk": "all", "unmerged": "keep", "carry_residual": True},
            "every_row",
            None,
        ),  # the last shipped default
        (
            {"topk": "all", "unmerged": "discard", "carry_residual": True},
            "every_row",
            None,
        ),  # unmerged was moot
        ({"topk": None, "unmerged": "keep", "carry_residual": True}, "topk_carry", None),
        ({"topk": 4, "unmerged": "keep", "carry_residual": False}, "topk_keep", 4),
        (
            {"topk": None, "unmerged": "keep"},
            "topk_keep",
            None,
        ),  # saved before carry_residual: trained without it
        (
            {"topk": 8, "unmerged": "discard", "carry_residual": True},
            "paper",
            8,
        ),  # the carry was inert
        ({"topk": None}, "paper", None),  # saved before unmerged: the paper's merge
        ({}, "paper", None),  # saved before any merge key: the paper's merge
    ],
)
def test_a_saved_config_with_the_old_merge_keys_reads_as_their_recipe(saved, merge, topk, tmp_path):
    from falqon_dist.train.saved_config import load_run_config

    _, settings = load_run_config(_saved_run(tmp_path, saved))
    assert (settings.method.config.merge, settings.method.config.topk) == (merge, topk)


def test_old_stochastic_runs_read_as_their_recipe(tmp_path):
    from falqon_dist.train.saved_config import load_run_config

    saved = {
        "topk": None,
        "unmerged": "keep",
        "carry_residual": False,
        "merge_rounding": "stochastic",
    }
    _, settings = load_run_config(
        _saved_run(tmp_path, saved, drop=("merge", "topk", "merge_rounding"))
    )
    assert (settings.method.config.merge, settings.method.config.merge_rounding) == (
        "topk_keep",
        "stochastic",
    )


@pytest.mark.parametrize(
    "saved, drop, key, valid",
    [
        (
            {"topk": "all", "unmerged": "keep", "carry_residual": False},
            ("merge", "topk"),
            "method.carry_residual=false",
            "write method.merge=every_row",
        ),
        (
            {"unmerged": "keep"},
            (),
            "method.unmerged no longer exists",
            "method.merge=every_row says",
        ),
        (
            {"topk": None, "unmerged": "hold"},
            ("merge", "topk"),
            "method.unmerged must be keep or discard",
            "every_row | topk_carry",
        ),
    ],
)
def test_a_saved_config_with_a_merge_no_longer_offered_is_refused_naming_file_and_key(
    saved, drop, key, valid, tmp_path
):
    from falqon_dist.train.saved_config import RestoreError, load_run_config

    with pytest.raises(RestoreError) as refused:
        load_run_config(_saved_run(tmp_path, saved, drop))
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'config.yaml'}: {key}") and valid in message, message


def test_resuming_a_run_saved_with_the_old_merge_keys_compares_the_recipe(tmp_path):
    from falqon_dist.train.run_dir import check_resume

    _saved_run(tmp_path, {"topk": "all", "unmerged": "keep", "carry_residual": True})
    warnings = check_resume(tmp_path, compose_cfg([f"run.dir={tmp_path}"]), 2, 2)
    assert not any("merge" in w or "topk" in w or "carry" in w for w in warnings), warnings
    with pytest.raises(ConfigError, match=r"method\.merge: 'every_row' -> 'paper'"):
        check_resume(tmp_path, compose_cfg([f"run.dir={tmp_path}", "method.merge=paper"]), 2, 2)


@pytest.mark.parametrize(
    "argv, merge, topk",
    [
        (["method.topk=all"], "every_row", "null"),
        (
            ["method.unmerged=discard"],
            "every_row",
            "null",
        ),  # topk=all, the former default: unmerged was moot
        (
            ["method.topk=null"],
            "topk_carry",
            "null",
        ),  # unmerged=keep and the carry: the former defaults
        (["method.topk=4", "method.carry_residual=false"], "topk_keep", "4"),
        (
            ["+method.unmerged=keep", "method.topk=null", "method.carry_residual=False"],
            "topk_keep",
            "null",
        ),
        (["method.topk=null", "method.unmerged=discard"], "paper", "null"),
        (
            ["method.topk=16", "method.unmerged=discard", "method.carry_residual=true"],
            "paper",
            "16",
        ),
    ],
)
def test_old_merge_keys_on_the_command_line_become_one_recipe_with_one_notice(
    argv, merge, topk, capsys
):
    from falqon_dist.train.bootstrap import move_overrides

    mapped = move_overrides(["train.lr=1", *argv, "train.max_steps=3"])
    assert mapped == [
        "train.lr=1",
        f"method.merge={merge}",
        f"method.topk={topk}",
        "train.max_steps=3",
    ]
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and notice[0].startswith(
        "falqon_dist: FALQON's merge is one key now, method.merge: read "
    )
    assert all(arg in notice[0] for arg in argv) and notice[0].endswith(
        f"as method.merge={merge} method.topk={topk}"
    )
    config = validate(compose_cfg(mapped)).method.config
    assert config.merge == merge and config.topk == (None if topk == "null" else int(topk))


def test_a_repeated_old_merge_key_counts_once_its_last_value_as_hydra_reads_it(capsys):
    from falqon_dist.train.bootstrap import move_overrides

    assert move_overrides(["method.topk=4", "train.lr=1", "method.topk=null"]) == [
        "method.merge=topk_carry",
        "method.topk=null",
        "train.lr=1",
    ]


def test_new_merge_keys_on_the_command_line_pass_unchanged(capsys):
    from falqon_dist.train.bootstrap import move_overrides

    argv = ["method.merge=paper", "method.topk=4", "method.merge_rounding=stochastic"]
    assert move_overrides(argv) == argv and capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["method.carry_residual=false"],
            "method.carry_residual=false with method.topk=all (every row merged, what FP8 "
            "rounding drops lost) is no longer offered: write method.merge=every_row",
        ),
        (
            ["method.topk=all", "method.carry_residual=false", "method.merge_rounding=stochastic"],
            "or a top-k merge without the carry, method.merge=topk_keep or method.merge=paper",
        ),
        (
            ["method.merge=paper", "method.unmerged=keep"],
            "method.unmerged no longer exists: method.merge, given too",
        ),
        (
            ["method.carry_residual=maybe"],
            "method.carry_residual must be true or false, got 'maybe'",
        ),
        (
            ["method.topk=null", "method.unmerged=hold"],
            "method.unmerged must be keep or discard, got 'hold'",
        ),
    ],
)
def test_old_merge_keys_no_longer_offered_are_refused_on_the_command_line(argv, message, capsys):
    from falqon_dist.train.bootstrap import move_overrides

    with pytest.raises(SystemExit) as stopped:
        move_overrides(argv)
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("falqon_dist: error: ") and message in err[0], err


# ------------------------------------------------------------------------- the user's DeepSpeed JSON
@pytest.mark.parametrize(
    "user, message",
    [
        ({"fp16": {"enabled": True}}, "fp16.enabled=true is not supported"),
        (
            {"zero_optimization": {"stage": 2}},
            "sets zero_optimization.stage=2 but deepspeed.zero_stage=3",
        ),
        ({"bf16": {"enabled": False}}, "sets bf16.enabled=false but model.dtype='bf16'"),
        (
            {"zero_optimization": {"stage": 3, "zero_quantized_weights": True}},
            "zero_quantized_weights=true",
        ),
        ([1, 2], "must hold a JSON object"),
    ],
)
def test_a_deepspeed_json_that_contradicts_the_run_names_file_and_key(user, message, tmp_path):
    import json

    from falqon_dist.train.preflight import run_ds_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    settings = validate(compose_cfg([f"deepspeed.config={path}"]))
    with pytest.raises(ConfigError, match=rf"deepspeed\.config='{path}'") as err:
        run_ds_config(settings, world_size=2)
    assert message in str(err.value)


def test_a_coherent_deepspeed_json_is_the_base_of_the_run(tmp_path):
    import json

    from falqon_dist.train.preflight import run_ds_config

    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": 3, "overlap_comm": True},
                "bf16": {"enabled": True},
                "optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}},
            }
        )
    )
    settings = validate(compose_cfg([f"deepspeed.config={path}", "train.micro_batch_size=4"]))
    config = run_ds_config(settings, world_size=2)
    assert (
        config["zero_optimization"]["overlap_comm"] is True
        and config["zero_optimization"]["stage"] == 3
    )
    assert config["optimizer"]["params"] == {
        "betas": [0.9, 0.95],
        "lr": settings.train.lr,
        "weight_decay": 0.0,
    }
    assert config["train_batch_size"] == 4 * settings.train.grad_accum * 2


# ------------------------------------------------------------------------------ the model, before its load
@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["method.rank=256"],
            r"^method\.rank cannot exceed min\(in_features, out_features\) of a layer it converts, "
            r"and 'model\.layers\.0\.self_attn\.q_proj' \(128→128\) has 128: .*, got 256$",
        ),
        (
            ["method.merge=paper", "method.topk=512"],
            r"^method\.topk cannot exceed the out_features of a layer it converts, and "
            r"'model\.layers\.0\.self_attn\.q_proj' \(128→128\) has 128: .*, got 512$",
        ),
    ],
)
def test_falqon_rank_and_topk_are_checked_against_the_models_layers(overrides, message):
    """From the model's config on the meta device: no weight loaded, the failing layer named, the key
    the one the config's check blames (its InvalidField.field)."""
    with pytest.raises(ConfigError, match=message):
        check_for_training(overrides)
    check_for_training(["method.rank=128"])  # the smallest converted layer is 128 x 128


def test_a_model_directory_needs_its_config_json(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ConfigError, match=r"model\.name_or_path=.*: no config\.json there"):
        check_for_training([f"model.name_or_path={tmp_path / 'model'}"])
    (tmp_path / "model" / "config.json").write_text("{not json")
    with pytest.raises(
        ConfigError, match=r"model\.name_or_path=.*: its config\.json cannot be read"
    ):
        check_for_training([f"model.name_or_path={tmp_path / 'model'}"])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "method.target_modules=[qkv_proj]",
            r"method\.target_modules: 'qkv_proj' names no nn\.Linear .* q_proj",
        ),
        (
            "method.exclude_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
            "leave no layer to adapt",
        ),
        ("method.target_modules=q_proj", r"method\.target_modules must be null or a list"),
        (
            "method.target_modules=['(']",
            r"method\.target_modules holds '\(', which is not a valid regular expression",
        ),
    ],
)
def test_target_modules_are_checked_before_any_work(override, message):
    for method in ("falqon", "lora"):
        with pytest.raises(ConfigError, match=message):
            check_for_training([f"method={method}", override])
    settings = check_for_training(
        [
            "method.target_modules=[q_proj,v_proj]",
            "method.exclude_modules=[layers.0.self_attn.v_proj]",
        ]
    )
    assert settings.method.target_modules == ("q_proj", "v_proj")


def test_warmup_is_a_fraction_of_the_run_unless_steps_are_given():
    assert validate(compose_cfg([])).train.warmup_steps == 30  # 10% of 300
    assert validate(compose_cfg(["train.max_steps=4"])).train.warmup_steps == 0
    assert validate(compose_cfg(["train.warmup_steps=5"])).train.warmup_steps == 5
    assert (
        validate(compose_cfg(["train.warmup_ratio=0.25", "train.max_steps=100"])).train.warmup_steps
        == 25
    )
    for bad in ("train.warmup_ratio=1", "train.warmup_ratio=-0.1"):
        with pytest.raises(ConfigError, match=r"train\.warmup_ratio must be"):
            validate(compose_cfg([bad]))


# ------------------------------------------------------------------ the export / eval command lines
def test_export_and_eval_configs_compose_with_overrides():
    from falqon_dist.train.cli import compose_cli

    cfg = compose_cli(
        "export", ["run.dir=/some/run", "tag=300", "overwrite=true"], "launch/export.py"
    )
    assert (cfg.run.dir, cfg.tag, cfg.out, cfg.overwrite, cfg.max_shard_size) == (
        "/some/run",
        300,
        None,
        True,
        "2GB",
    )
    cfg = compose_cli("eval", ["path=/some/export", "batch_size=8", "json=null"], "launch/eval.py")
    assert (cfg.path, cfg.samples, cfg.generate, cfg.batch_size, cfg.dequantize) == (
        "/some/export",
        128,
        64,
        8,
        True,
    )
    with pytest.raises(
        ValueError,
        match=r"unknown key 'outt'; valid keys: run\.dir, tag, out, overwrite, max_shard_size",
    ):
        compose_cli("export", ["run.dir=/r", "outt=x"], "launch/export.py")
    with pytest.raises(ValueError, match=r"path=\.\.\. is required"):
        compose_cli("eval", [], "launch/eval.py")
    with pytest.raises(ValueError, match=r"cannot read the overrides path=/p samples=\[1"):
        compose_cli("eval", ["path=/p", "samples=[1"], "launch/eval.py")


def test_max_length_null_takes_the_models_own_context_and_the_config_records_the_real_model(
    tmp_path,
):
    """model=tiny with model.name_or_path=DIR: not the tiny preset's 128 tokens nor its name."""
    from omegaconf import OmegaConf

    from falqon_dist.train.preflight import CONTEXT_CAP, resolve_model_context
    from tests.models import tiny_llama

    cfg = compose_cfg([])
    settings = resolve_model_context(validate(cfg), cfg)
    assert (
        settings.model.max_length == settings.data.max_length == 128 and cfg.model.max_length == 128
    )
    assert settings.model.name == "tiny"
    for context, expected in ((512, 512), (32768, CONTEXT_CAP)):
        model_dir = tmp_path / f"my-model-{context}"
        model = tiny_llama()
        model.config.max_position_embeddings = context
        model.config.save_pretrained(model_dir)
        cfg = compose_cfg([f"model.name_or_path={model_dir}"])
        settings = resolve_model_context(
            check_for_training([f"model.name_or_path={model_dir}"]), cfg
        )
        assert (settings.model.max_length, settings.data.max_length) == (expected, expected)
        saved = OmegaConf.to_container(cfg, resolve=True)["model"]  # what config.yaml records
        assert saved["max_length"] == expected and saved["name"] == model_dir.name
    cfg = compose_cfg([f"model.name_or_path={model_dir}", "model.max_length=256"])
    assert resolve_model_context(validate(cfg), cfg).data.max_length == 256  # a number given stays
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "config.json").write_text('{"model_type": "mamba"}')
    cfg = compose_cfg([f"model.name_or_path={tmp_path / 'bare'}", "method=full"])
    with pytest.raises(
        ConfigError,
        match=r"model\.max_length=null takes the model's own context.*model\.max_length=N",
    ):
        resolve_model_context(validate(cfg), cfg)


def test_epochs_replace_max_steps_once_the_data_is_counted():
    train = validate(compose_cfg(["train.epochs=1.5", "train.grad_accum=2"])).train
    resolved = train.for_steps_per_epoch(11)
    assert resolved.max_steps == 9 and resolved.warmup_steps == 1  # ceil(1.5 * 11 / 2); 10% of 9
    fixed = validate(
        compose_cfg(["train.epochs=2", "train.warmup_steps=3"])
    ).train.for_steps_per_epoch(10)
    assert (fixed.max_steps, fixed.warmup_steps) == (20, 3)
    plain = validate(compose_cfg([])).train
    assert plain.for_steps_per_epoch(11) is plain
    with pytest.raises(ConfigError, match=r"train\.epochs must be a finite number > 0"):
        validate(compose_cfg(["train.epochs=0"]))
