"""Model and data names (issue 25, "Trust"): local path or hub id, decided before any load; a model's
own Python never runs unless ``model.trust_remote_code=true``.

* A local-looking name that does not exist (``mymodels/llama`` when ``mymodels/`` is here, ``a/b/c``,
  ``./x``) is one ConfigError naming it, and the hub is never asked (every hub function is replaced
  by one that fails the test).
* A hub id is accepted from the local cache (offline too); offline or unreachable and not cached, it
  is refused naming it, before any rank loads anything.
* A model whose config.json needs its own code is refused with ``trust_remote_code=false``, without
  running that code and without transformers' interactive prompt; every transformers load in the
  product passes ``trust_remote_code`` explicitly (checked on the source, call by call).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import json
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
from hydra import compose, initialize_config_dir

from falqon_dist.data import DataConfig
from falqon_dist.data.sources import is_hub_dataset, load_records
from falqon_dist.hub_names import hub_id_problem, is_local, local_reason
from falqon_dist.train import model_setup
from falqon_dist.train.preflight import check_model_source, preflight
from falqon_dist.train.settings import ConfigError, validate

REPO = Path(__file__).resolve().parents[2]
CONF = REPO / "conf"
HUB_FUNCTIONS = ("get_hf_file_metadata", "hf_hub_download", "try_to_load_from_cache")


def compose_cfg(overrides: list[str], run_dir: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[f"run.dir={run_dir}", *overrides])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding a local ``mymodels/`` and ``mydata/`` (relative names resolve here)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mymodels").mkdir()
    (tmp_path / "mydata").mkdir()
    return tmp_path


@pytest.fixture
def no_hub(monkeypatch):
    """Every hub function huggingface_hub offers the checks fails the test if called."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"the hub was asked: {args} {kwargs}")

    for name in HUB_FUNCTIONS:
        monkeypatch.setattr(huggingface_hub, name, forbidden)


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return cache


def http_error(cls: type[HfHubHTTPError], status: int) -> HfHubHTTPError:
    """A huggingface_hub HTTP error as the hub would raise it (its response type is the library's own)."""
    http = importlib.import_module(HfHubHTTPError.__mro__[1].__module__.split(".")[0])
    request = http.Request("HEAD", "https://huggingface.co/org/name/resolve/main/config.json")
    return cls(f"{status} Client Error", response=http.Response(status, request=request))


# ------------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize(
    "name, local",
    [
        ("/models/llama", True),
        ("./llama", True),
        ("../llama", True),
        ("~/llama", True),
        ("a/b/c", True),
        ("org/name/", True),  # more than one '/': never a hub id
        ("mymodels/llama", True),  # its first component exists here
        ("mymodels", True),  # exists
        ("org/name", False),
        ("meta-llama/Llama-2-7b-hf", False),
        ("gpt2", False),
    ],
)
def test_local_or_hub(name, local, workdir):
    assert is_local(name) is local, local_reason(name)


def test_hub_id_validity():
    assert hub_id_problem("org/name") is None and hub_id_problem("Qwen/Qwen2.5-7B") is None
    for bad in ("org/na me", "org--x/name", "org/name.git", "-org/name"):
        assert hub_id_problem(bad), bad


# ------------------------------------------------------------------------------ model.name_or_path


@pytest.mark.parametrize(
    "name, reason",
    [
        ("mymodels/llama", "its first component 'mymodels/' exists here"),
        ("a/b/c", "it has more than one '/' (a hub id is 'org/name')"),
        ("./llama", "it starts with '.'"),
    ],
)
def test_a_missing_local_model_is_one_error_and_never_a_hub_lookup(name, reason, workdir, no_hub):
    with pytest.raises(ConfigError) as caught:
        check_model_source(name)
    assert str(caught.value) == (
        f"model.name_or_path={name!r}: no such model directory (a local path, as {reason}: "
        "never looked up on the Hugging Face hub)"
    )
    # through the training checks: refused by preflight, before the run directory or the data is touched
    with pytest.raises(ConfigError, match=r"no such model directory"):
        preflight(
            validate(compose_cfg([f"model.name_or_path={name}"], workdir / "run")), world_size=2
        )
    assert not (workdir / "run").exists()


def test_export_and_eval_of_a_run_whose_model_moved_say_so(workdir, no_hub):
    """resolve_model_path (restore, export, eval) runs the same check: a moved base model is named."""
    settings = validate(compose_cfg(["model.name_or_path=mymodels/llama"], workdir / "run"))
    with pytest.raises(
        ConfigError, match=r"^model\.name_or_path='mymodels/llama': no such model directory"
    ):
        model_setup.resolve_model_path(settings)
    (workdir / "mymodels" / "llama").mkdir()
    (workdir / "mymodels" / "llama" / "config.json").write_text("{}")
    assert model_setup.resolve_model_path(settings) == "mymodels/llama"


def test_a_name_that_is_neither_is_refused(workdir, no_hub):
    with pytest.raises(
        ConfigError,
        match=r"model\.name_or_path='org/bad name' is neither an existing local directory "
        r"nor a Hugging Face hub id",
    ):
        check_model_source("org/bad name")


def test_offline_and_not_cached_fails_fast_naming_it(workdir, empty_cache, no_hub, monkeypatch):
    # the real cache lookup; the network stays forbidden
    monkeypatch.setattr(
        huggingface_hub,
        "try_to_load_from_cache",
        importlib.import_module("huggingface_hub.file_download").try_to_load_from_cache,
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as caught:
        check_model_source("org/missing-model")
    message = str(caught.value)
    assert message.startswith(
        "model.name_or_path='org/missing-model' is neither a local directory nor reachable: "
        "the Hugging Face hub is off here (HF_HUB_OFFLINE=1)"
    ), message
    assert str(empty_cache) in message and "hf download org/missing-model" in message


def test_a_cached_hub_model_passes_offline(workdir, empty_cache, no_hub, monkeypatch):
    monkeypatch.setattr(
        huggingface_hub,
        "try_to_load_from_cache",
        importlib.import_module("huggingface_hub.file_download").try_to_load_from_cache,
    )
    snapshot = empty_cache / "models--org--cached" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (empty_cache / "models--org--cached" / "refs").mkdir()
    (empty_cache / "models--org--cached" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_model_source("org/cached")  # no error, no network


@pytest.mark.parametrize(
    "failure, message",
    [
        (
            ConnectionError("[Errno -2] Name or service not known"),
            "is neither a local directory nor reachable: the Hugging Face hub cannot be reached (ConnectionError: "
            "[Errno -2] Name or service not known)",
        ),
        (
            http_error(RepositoryNotFoundError, 404),
            "no such local directory, and no model org/name on the Hugging Face hub",
        ),
        (http_error(GatedRepoError, 401), "the hub model org/name is gated"),
    ],
)
def test_online_the_hub_is_asked_once_and_its_answer_named(
    failure, message, workdir, empty_cache, monkeypatch
):
    calls = []

    def head(url, timeout=None, **kwargs):
        calls.append((url, timeout))
        raise failure

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", head)
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda *a, **k: pytest.fail("downloaded after a failure"),
    )
    with pytest.raises(ConfigError) as caught:
        check_model_source("org/name")
    assert str(caught.value).startswith("model.name_or_path='org/name'") and message in str(
        caught.value
    )
    assert (
        len(calls) == 1
        and calls[0][0].endswith("org/name/resolve/main/config.json")
        and calls[0][1] == 10
    )


def test_online_a_reachable_hub_model_has_its_config_fetched(workdir, empty_cache, monkeypatch):
    fetched = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(
        huggingface_hub, "get_hf_file_metadata", lambda url, timeout=None, **k: object()
    )
    monkeypatch.setattr(
        huggingface_hub,
        "hf_hub_download",
        lambda repo, name, **k: fetched.append((repo, name)) or "p",
    )
    check_model_source("org/name")
    assert fetched == [("org/name", "config.json")]


# ------------------------------------------------------------------------------------- data paths


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["data=alpaca", "data.path=mydata/alpaca"],
            "data.path='mydata/alpaca': no such file or directory (a local path, as its first "
            "component 'mydata/' exists here: never looked up on the Hugging Face hub)",
        ),
        (
            ["data=alpaca", "data.path=org/alpaca.json"],
            "no such file or directory (a local path, as it ends with '.json'",
        ),
        (["data=alpaca", "data.path=a/b/c"], "as it has more than one '/'"),
        (
            ["data=alpaca", "data.path=alpaca"],
            "data.path='alpaca': no such file or directory, and not a Hugging Face hub dataset id",
        ),
        (
            ["data=alpaca", "data.path='org/bad name'"],
            "and not a Hugging Face hub dataset id: Repo id must use",
        ),
        (["data=jsonl", "data.path=org/name"], "as data=jsonl reads local files only"),
    ],
)
def test_a_missing_local_data_path_is_refused_before_any_work(overrides, message, workdir, no_hub):
    with pytest.raises(ConfigError) as caught:
        preflight(validate(compose_cfg(overrides, workdir / "run")), world_size=1)
    assert message in str(caught.value), str(caught.value)


def test_a_hub_dataset_id_is_left_to_the_hub_and_the_loader_agrees(workdir, no_hub):
    preflight(
        validate(compose_cfg(["data=alpaca", "data.path=org/alpaca"], workdir / "run")),
        world_size=1,
    )
    assert is_hub_dataset("alpaca", "org/alpaca") and not is_hub_dataset("alpaca", "mydata/alpaca")
    assert not is_hub_dataset("jsonl", "org/alpaca") and not is_hub_dataset("alpaca", "org/a.jsonl")
    with pytest.raises(
        FileNotFoundError,
        match=r"dataset path not found: mydata/alpaca \(a local path, as its first",
    ):
        load_records(DataConfig(name="alpaca", path="mydata/alpaca"))


# ------------------------------------------------------------------------------- trust_remote_code


def custom_code_model(directory: Path, marker: Path) -> Path:
    """A model directory whose config.json needs its own Python (an unknown model_type + auto_map);
    importing that code writes ``marker``."""
    from falqon_dist.models import tiny_config

    directory.mkdir()
    config = tiny_config().to_dict()
    config.update(
        model_type="falqon_custom_test",
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'falqon_custom_test'\n"
    )
    (directory / "modeling_custom.py").write_text(
        "from transformers import LlamaForCausalLM\n\n\nclass CustomForCausalLM(LlamaForCausalLM):\n    pass\n"
    )
    return directory


def test_trust_remote_code_is_a_validated_bool_defaulting_to_false_in_every_preset(tmp_path):
    for preset in sorted(p.stem for p in (CONF / "model").glob("*.yaml")):
        assert (
            validate(compose_cfg([f"model={preset}"], tmp_path)).model.trust_remote_code is False
        ), preset
    assert (
        validate(compose_cfg(["model.trust_remote_code=true"], tmp_path)).model.trust_remote_code
        is True
    )
    with pytest.raises(
        ConfigError, match=r"^model\.trust_remote_code must be true or false, got 'yes'"
    ):
        validate(compose_cfg(["model.trust_remote_code=yes"], tmp_path))


def test_a_model_needing_its_own_code_is_refused_without_running_it_or_prompting(
    tmp_path, monkeypatch
):
    marker = tmp_path / "code-ran"
    model = custom_code_model(tmp_path / "custom", marker)
    monkeypatch.setattr(
        builtins,
        "input",
        lambda *a: pytest.fail("transformers prompted: trust_remote_code was not passed"),
    )
    for method in ("falqon", "full"):  # full trains every weight but still reads the config first
        settings = validate(
            compose_cfg([f"model.name_or_path={model}", f"method={method}"], tmp_path / "run")
        )
        with pytest.raises(ConfigError) as caught:
            preflight(settings, world_size=1)
        message = str(caught.value)
        assert message.startswith(
            f"model.name_or_path={str(model)!r} needs its own Python code to load"
        ), message
        assert (
            "configuration_custom.CustomConfig" in message
            and "model.trust_remote_code=true" in message
        )
    assert not marker.exists()


def test_the_flag_reaches_every_transformers_load(tmp_path, monkeypatch):
    """model.trust_remote_code is what preflight, the tokenizer and the model loads pass (False by default)."""
    seen: list[tuple[str, object]] = []

    def spy(kind):
        def record(*args, **kwargs):
            seen.append((kind, kwargs.get("trust_remote_code", "missing")))
            raise RuntimeError("stop here")

        return record

    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy("config"))
    monkeypatch.setattr(model_setup.AutoTokenizer, "from_pretrained", spy("tokenizer"))
    monkeypatch.setattr(model_setup.AutoModelForCausalLM, "from_pretrained", spy("model"))
    from falqon_dist.train.preflight import _model_config

    (tmp_path / "m").mkdir()
    for trust in (False, True):
        settings = validate(
            compose_cfg(
                [
                    f"model.name_or_path={tmp_path / 'm'}",
                    "method=lora",
                    f"model.trust_remote_code={str(trust).lower()}",
                ],
                tmp_path / "run",
            )
        )
        for call in (
            lambda trust=trust: _model_config(str(tmp_path / "m"), trust),
            lambda trust=trust: model_setup.load_tokenizer(
                str(tmp_path / "m"), trust_remote_code=trust
            ),
            lambda settings=settings: model_setup.build_model(str(tmp_path / "m"), settings, {}),
        ):
            with pytest.raises(RuntimeError, match="stop here"):
                call()
    assert seen == [
        ("config", False),
        ("tokenizer", False),
        ("model", False),
        ("config", True),
        ("tokenizer", True),
        ("model", True),
    ]
    with pytest.raises(RuntimeError):
        model_setup.load_tokenizer(str(tmp_path / "m"))  # the default: explicitly False
    assert seen[-1] == ("tokenizer", False)


def test_every_transformers_auto_load_in_the_product_passes_trust_remote_code():
    """Every ``Auto*.from_pretrained`` / ``Auto*.from_config`` call in falqon_dist/, launch/ and
    benchmarks/ names ``trust_remote_code`` (None, transformers' default, prompts for code)."""
    missing = set()
    files = [
        *(REPO / "falqon_dist").rglob("*.py"),
        *(REPO / "launch").glob("*.py"),
        *(REPO / "benchmarks").glob("*.py"),
    ]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("from_pretrained", "from_config")
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id.startswith("Auto")
            ):
                continue
            if not any(keyword.arg == "trust_remote_code" for keyword in node.keywords):
                missing.add((str(path.relative_to(REPO)), f"{node.func.value.id}.{node.func.attr}"))
    assert not missing, f"transformers loads without trust_remote_code: {sorted(missing)}"
