"""A saved config never resolves the reader's environment (issue 25, "Trust").

A run's ``config.yaml`` and an export's ``falqon_run.json`` are written resolved; reading one back
(restore / export, eval, a resume's comparison) must never run a resolver: ``${oc.env:...}`` put into
someone else's run directory would read *this* machine's environment, and an export would write the
value into its ``falqon_run.json``. Every read-back refuses a string holding ``${``, naming the file
and the dotted key, before anything could resolve it. Checked with a resolver that records every call
(it must never be called) and an environment variable holding a stand-in secret (it must appear in no
message and no file).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from falqon_dist.export.read_back import find_interpolation
from falqon_dist.export.run_info import RUN_INFO, read_run_info
from falqon_dist.train.config_errors import ConfigError
from falqon_dist.train.run_dir import check_resume
from falqon_dist.train.saved_config import (
    RestoreError,
    load_run_config,
    read_saved_config,
    validate_saved_config,
)

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
SECRET = "sk-falqon-test-secret-0123456789"
SECRET_VAR = "FALQON_TEST_SECRET"


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv(SECRET_VAR, SECRET)
    return SECRET


@pytest.fixture
def spy():
    """A resolver ``${falqon_spy:...}`` that records every call: a saved config must never call it."""
    calls: list[tuple] = []
    OmegaConf.register_new_resolver(
        "falqon_spy", lambda *args: calls.append(args) or "resolved", replace=True
    )
    yield calls
    OmegaConf.clear_resolver("falqon_spy")


def resolved_default(run_dir: Path, overrides: tuple[str, ...] = ()) -> dict:
    """The shipped default config as training writes it: composed, then resolved (``to_yaml(resolve=True)``)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"run.dir={run_dir}", *overrides])
    return yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))


def set_key(tree: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        tree = tree[key]
    tree[last] = value


def write_run(run_dir: Path, edits: dict[str, object]) -> Path:
    """A run directory (config.yaml + checkpoints/) whose resolved config has ``edits`` written into it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    tree = resolved_default(run_dir)
    for key, value in edits.items():
        set_key(tree, key, value)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return run_dir


def cli_module(name: str):
    spec = importlib.util.spec_from_file_location(
        f"falqon_trust_{name}", REPO / "launch" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ATTACKS = [
    ("wandb.name", "${oc.env:" + SECRET_VAR + "}"),
    (
        "wandb.project",
        "proj-${oc.env:" + SECRET_VAR + "}",
    ),  # a string interpolation, inside other text
    ("wandb.group", "${falqon_spy:anything}"),  # any resolver, not only oc.env
    (
        "train.lr",
        "${method.lr}",
    ),  # a plain node interpolation too: a saved config holds values only
    (
        "wandb.entity",
        "\\${oc.env:" + SECRET_VAR + "}",
    ),  # escaped: still not something training writes
]


def test_what_training_writes_holds_no_interpolation_and_reads_back(tmp_path, spy):
    """The shipped default has interpolations (``train.lr: ${method.lr}``); written resolved, as the
    trainer writes config.yaml, none is left, and the file restores to the same settings."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        composed = compose(config_name="config", overrides=[f"run.dir={tmp_path}"])
    assert find_interpolation(composed) is not None  # the unresolved composition does have some
    run_dir = write_run(tmp_path / "run", {})
    assert find_interpolation(yaml.safe_load((run_dir / "config.yaml").read_text())) is None
    cfg, settings = load_run_config(run_dir)
    assert cfg.train.lr == settings.train.lr == composed.method.lr and spy == []


@pytest.mark.parametrize("key, value", ATTACKS)
def test_an_interpolation_in_config_yaml_is_refused_naming_the_file_and_key(
    key, value, tmp_path, secret, spy
):
    run_dir = write_run(tmp_path / "run", {key: value})
    with pytest.raises(RestoreError) as caught:
        load_run_config(run_dir)
    message = str(caught.value)
    assert message.startswith(
        f"{run_dir / 'config.yaml'}: key {key} holds an interpolation {value!r}"
    ), message
    assert "written resolved" in message and "replace it with the plain value" in message
    assert secret not in message and spy == []


def test_a_list_item_is_named_with_its_index(tmp_path, secret, spy):
    run_dir = write_run(tmp_path / "run", {"wandb.tags": ["ok", "${oc.env:" + SECRET_VAR + "}"]})
    with pytest.raises(RestoreError, match=r"key wandb\.tags\[1\] holds an interpolation"):
        read_saved_config(run_dir / "config.yaml")


def test_a_saved_config_that_is_not_a_yaml_mapping_is_named(tmp_path):
    bad = tmp_path / "config.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RestoreError, match=rf"^{bad}: not a readable YAML config"):
        read_saved_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(RestoreError, match=rf"^{bad}: expected a mapping"):
        read_saved_config(bad)
    with pytest.raises(RestoreError, match=r"no such file"):
        read_saved_config(tmp_path / "missing.yaml")


def test_validate_saved_config_refuses_before_resolving_a_dictconfig_or_a_dict(
    tmp_path, secret, spy
):
    tree = resolved_default(tmp_path)
    tree["wandb"]["name"] = "${falqon_spy:x}"
    for cfg in (tree, OmegaConf.create(tree)):
        with pytest.raises(
            RestoreError, match=r"^somewhere: key wandb\.name holds an interpolation"
        ):
            validate_saved_config(cfg, "somewhere")
    assert spy == []


def test_falqon_run_json_config_is_refused_naming_the_file_and_key(tmp_path, secret, spy):
    export = tmp_path / "export"
    export.mkdir()
    config = resolved_default(tmp_path / "run")
    config["wandb"]["name"] = "${oc.env:" + SECRET_VAR + "}"
    (export / RUN_INFO).write_text(
        json.dumps({"run_dir": "x", "tag": "t", "step": 1, "base_model": "m", "config": config})
    )
    with pytest.raises(RestoreError) as caught:
        read_run_info(export)
    assert str(caught.value).startswith(
        f"{export / RUN_INFO}: config: key wandb.name holds an interpolation"
    )
    assert secret not in str(caught.value) and spy == []


def test_eval_reads_every_saved_config_source_unresolved(tmp_path, secret, spy, capsys):
    """launch/eval.py on an export: config=, the export's falqon_run.json and ../config.yaml are each
    refused (naming the file and key) before the export is loaded; the CLI exits 2 with that line."""
    eval_cli = cli_module("eval")
    run_dir = write_run(tmp_path / "run", {"wandb.name": "${oc.env:" + SECRET_VAR + "}"})
    # training's own export lives in RUN_DIR/export: ../config.yaml is the run's
    export = run_dir / "export"
    export.mkdir()
    (export / "config.json").write_text(
        json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}})
    )

    with pytest.raises(RestoreError, match=rf"^{run_dir / 'config.yaml'}: key wandb\.name"):
        eval_cli.export_settings(export, None)  # ../config.yaml
    with pytest.raises(RestoreError, match=rf"^{run_dir / 'config.yaml'}: key wandb\.name"):
        eval_cli.export_settings(export, str(run_dir))  # config=RUN_DIR
    info = {
        "run_dir": str(run_dir),
        "tag": "t",
        "step": 1,
        "base_model": "m",
        "config": resolved_default(run_dir, ("wandb.name=x",)),
    }
    info["config"]["data"]["name"] = "${falqon_spy:data}"
    (export / RUN_INFO).write_text(json.dumps(info))
    with pytest.raises(RestoreError, match=rf"^{export / RUN_INFO}: config: key data\.name"):
        eval_cli.export_settings(export, None)  # falqon_run.json wins over ../config.yaml

    assert eval_cli.main([f"path={export}"]) == 2
    err = capsys.readouterr().err
    assert (
        f"launch/eval.py: error: {export / RUN_INFO}: config: key data.name holds an interpolation"
        in err
    )
    assert secret not in err and spy == []

    (export / RUN_INFO).unlink()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_default(run_dir)))
    # a resolved config reads back as before
    settings, source = eval_cli.export_settings(export, None)
    assert source == str(run_dir / "config.yaml") and settings.data.name == "synthetic"
    settings, source = eval_cli.export_settings(tmp_path / "nowhere" / "export", None)
    # our own composed config is resolved, as training resolves it
    assert "shipped default" in source


def test_export_cli_refuses_and_writes_nothing(tmp_path, secret, spy, capsys):
    """The attack end to end: launch/export.py on a run directory whose config.yaml holds
    ``wandb.name: ${oc.env:...}`` used to write the secret into falqon_run.json; now it exits 2 before
    the checkpoint is read, and the export directory is never created."""
    export_cli = cli_module("export")
    run_dir = write_run(tmp_path / "run", {"wandb.name": "${oc.env:" + SECRET_VAR + "}"})
    out = tmp_path / "out"
    assert export_cli.main([f"run.dir={run_dir}", f"out={out}"]) == 2
    captured = capsys.readouterr()
    assert (
        f"launch/export.py: error: {run_dir / 'config.yaml'}: key wandb.name holds an interpolation"
        in captured.err
    )
    assert secret not in captured.out + captured.err and spy == []
    assert not out.exists()


def test_a_resume_compares_the_saved_config_unresolved(tmp_path, secret, spy):
    run_dir = write_run(tmp_path / "run", {"wandb.name": "${falqon_spy:x}"})
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        new = compose(config_name="config", overrides=[f"run.dir={run_dir}", "train.resume=true"])
    with pytest.raises(
        ConfigError, match=rf"^train\.resume=true: {run_dir / 'config.yaml'}: key wandb\.name holds"
    ):
        check_resume(run_dir, new, world_size=1, saved_world_size=1)
    assert spy == []
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_default(run_dir)))
    assert not any(
        "wandb" in w for w in check_resume(run_dir, new, world_size=1, saved_world_size=1)
    )
