"""The launcher end to end: 2 ranks with deepspeed (with/without --no_local_rank) and torchrun,
outputs in run.dir written by rank 0 only, and fail-fast errors for bad overrides."""

from __future__ import annotations

import os
import re
import sys

import pytest
import yaml

from falqon_dist.distributed.safe_load import load_file
from tests import processes
from tests.e2e.conftest import QUICK, REPO, launch, read_metrics

REQUIRED = {"step", "loss", "lr", "tokens_per_s", "step_time_s"}


def check_run_dir(run_dir, steps: int, method: str = "falqon"):
    assert (run_dir / "train.log").is_file()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"]["dir"] == str(run_dir) and config["method"]["name"] == method
    metrics = read_metrics(run_dir)
    train = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train] == list(range(1, steps + 1))
    for m in train:
        assert m.keys() >= REQUIRED, m
        if method == "falqon":
            assert m["rows_merged"] > 0 and m["saturated"] >= 0
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, steps]
    assert all("eval_exact_match" in m for m in evals)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{steps:08d}"
    # only rank 0 writes: no per-rank Hydra output, no second log
    assert not (run_dir / ".hydra").exists()
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".lock",
        "checkpoints",
        "config.yaml",
        "metrics.jsonl",
        "train.log",
    ]
    return metrics


@pytest.mark.parametrize("kind", ["deepspeed", "deepspeed-no-local-rank", "torchrun"])
def test_two_ranks_zero3_falqon(kind, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch(kind, [*QUICK, f"run.dir={run_dir}"])
    check_run_dir(run_dir, 4)
    assert "falqon_dist run summary" in proc.stdout and str(run_dir) in proc.stdout
    log = (run_dir / "train.log").read_text()
    assert "falqon_dist run summary" in log  # the summary is kept with the run
    assert re.search(r"\[step 1/4 \(25%\), [\d.]+ s/step, eta 0:00:\d\d\] step=1 loss=", log), log[
        -3000:
    ]
    assert "[step 4/4 (100%)" in log


def test_single_process_lora_zero0(tmp_path):
    run_dir = tmp_path / "run"
    launch(
        "python",
        [*QUICK, f"run.dir={run_dir}", "method=lora", "deepspeed.zero_stage=0", "model.dtype=fp32"],
    )
    check_run_dir(run_dir, 4, method="lora")


def test_two_ranks_qlora_zero2(tmp_path):
    """QLoRA through the launcher: NF4 backbone + LoRA on 2 ranks, ZeRO-2, checkpoint with the quant state."""
    pytest.importorskip("bitsandbytes")
    import torch

    from falqon_dist.models.tiny import tiny_config

    run_dir = tmp_path / "run"
    launch("deepspeed", [*QUICK, f"run.dir={run_dir}", "method=qlora", "deepspeed.zero_stage=2"])
    metrics = check_run_dir(run_dir, 4, method="qlora")
    evals = [m for m in metrics if "eval_loss" in m]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    state = load_file(run_dir / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt")[
        "module"
    ]
    key = "model.layers.0.mlp.up_proj.base_layer.weight"
    config = tiny_config()
    assert state[key].dtype == torch.uint8  # two NF4 codes per byte:
    assert state[key].numel() * 2 == config.hidden_size * config.intermediate_size
    assert {
        f"{key}.absmax",
        f"{key}.nested_absmax",
        f"{key}.quant_state.bitsandbytes__nf4",
    } <= state.keys()
    assert "model.layers.0.mlp.up_proj.lora_B.default.weight" in state
    # the FP8 CLIs refuse a qlora run with one clear line, no traceback
    groups = [
        processes.ProcessGroup(
            [sys.executable, str(REPO / "launch" / script), arg], cwd=REPO, env=dict(os.environ)
        )
        for script, arg in (("eval.py", f"path={run_dir}"), ("export.py", f"run.dir={run_dir}"))
    ]
    try:
        for group in groups:
            proc = group.wait(timeout=120)
            err = proc.stderr
            assert proc.returncode == 2, proc.stdout + err
            assert (
                "method.name='qlora'" in err
                and "need method=falqon" in err
                and "Traceback" not in err
            ), err
    finally:
        for group in groups:
            group.kill()


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.micro_batch_size=0", "train.micro_batch_size must be a positive integer"),
        ("deepspeed.zero_stage=5", "deepspeed.zero_stage must be one of (0, 1, 2, 3)"),
        ("method=adapterx", "method"),
        ("train.nonexistent=1", "nonexistent"),
        # every row merged without the carry: no longer offered, refused before the process group starts
        (
            "method.carry_residual=false",
            "method.carry_residual=false with method.topk=all (every row merged, what FP8 "
            "rounding drops lost) is no longer offered: write method.merge=every_row",
        ),
    ],
)
def test_bad_override_fails_before_work(override, message, tmp_path):
    run_dir = tmp_path / "run"
    proc = launch("python", [override, f"run.dir={run_dir}"], check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (run_dir / "metrics.jsonl").exists()


def test_old_merge_override_is_read_as_its_recipe_with_one_notice(tmp_path):
    """``method.topk=null method.unmerged=discard`` (the paper's merge, as it was written) trains as
    method.merge=paper: one notice, and the run's config.yaml records the recipe."""
    run_dir = tmp_path / "run"
    proc = launch(
        "python",
        [
            *QUICK,
            "train.max_steps=1",
            "train.eval_every=0",
            "method.topk=null",
            "method.unmerged=discard",
            f"run.dir={run_dir}",
        ],
        timeout=300,
    )
    notices = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if "FALQON's merge is one key now" in line
    ]
    assert notices == [
        "falqon_dist: FALQON's merge is one key now, method.merge: read method.topk=null "
        "method.unmerged=discard (with the former defaults method.carry_residual=true) as "
        "method.merge=paper method.topk=null"
    ], notices
    saved = (run_dir / "config.yaml").read_text()
    assert "merge: paper" in saved and "unmerged" not in saved and "carry_residual" not in saved


def _own_data(kind: str, root) -> str:
    """A chat (messages and ShareGPT rows, multi-turn) or text (.txt files) dataset built from the
    synthetic task, so the tiny model has something learnable in it."""
    import json

    from falqon_dist.data.synthetic import finetune_splits

    records, _ = finetune_splits("shift", 96, 8, seed=5)
    pairs = list(zip(records[0::2], records[1::2], strict=True))
    if kind == "chat":
        path = root / "chat.jsonl"
        rows = []
        for i, (a, b) in enumerate(pairs):
            if i % 2:
                rows.append(
                    {
                        "conversations": [
                            {"from": "human", "value": a["prompt"]},
                            {"from": "gpt", "value": a["response"]},
                            {"from": "human", "value": b["prompt"]},
                            {"from": "gpt", "value": b["response"]},
                        ]
                    }
                )
            else:
                rows.append(
                    {
                        "messages": [
                            {"role": "system", "content": "Answer exactly."},
                            {"role": "user", "content": a["prompt"]},
                            {"role": "assistant", "content": a["response"]},
                            {"role": "user", "content": b["prompt"]},
                            {"role": "assistant", "content": b["response"]},
                        ]
                    }
                )
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return str(path)
    folder = root / "texts"
    folder.mkdir()
    for i in range(8):
        chunk = records[i * 12 : (i + 1) * 12]
        (folder / f"doc{i}.txt").write_text("\n".join(r["prompt"] + r["response"] for r in chunk))
    return str(folder)


@pytest.mark.parametrize("kind", ["chat", "text"])
def test_chat_and_text_data_through_the_launcher(kind, tmp_path):
    """data=chat (template-rendered, loss on assistant turns) and data=text (packed, every token,
    train.epochs=1 instead of max_steps) on 2 ranks: both train and evaluate before and after."""
    run_dir = tmp_path / "run"
    path = _own_data(kind, tmp_path)
    # text: one pass over the data instead of max_steps
    length = ["train.epochs=1"] if kind == "text" else []
    launch(
        "torchrun",
        [
            *QUICK[:4],
            f"run.dir={run_dir}",
            f"data={kind}",
            f"data.path={path}",
            "data.eval_fraction=0.25",
            "deepspeed.zero_stage=2",
            *length,
        ],
    )
    steps = 4
    if kind == "text":
        found = re.search(
            r"train\.epochs=1: (\d+) optimizer steps \((\d+) micro-batches of 4 per rank",
            (run_dir / "train.log").read_text(),
        )
        assert found and int(found[1]) == int(found[2]) > 0, (run_dir / "train.log").read_text()[
            -2000:
        ]
        steps = int(found[1])
    evals = [m for m in read_metrics(run_dir) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, steps] and all(0 < m["eval_loss"] < 20 for m in evals)
    # only the synthetic task has exact answers
    assert not any("eval_exact_match" in m for m in evals)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["name"] == kind and config["data"]["packing"] is True


def test_mixed_data_through_the_launcher(tmp_path):
    """data=mix (chat weight 3, text weight 1) on 2 ranks: rank 0 logs what each source gave, once."""
    run_dir = tmp_path / "run"
    chat, text = _own_data("chat", tmp_path), _own_data("text", tmp_path)
    launch(
        "torchrun",
        [
            *QUICK[:4],
            f"run.dir={run_dir}",
            "data=mix",
            "deepspeed.zero_stage=2",
            "data.eval_fraction=0.25",
            f"data.sources=[{{path: {chat}, format: chat, weight: 3}}, {{path: {text}, format: text}}]",
        ],
    )
    log = (run_dir / "train.log").read_text()
    shares = re.findall(
        r"data=mix: \w+ = (\S+) \((\w+), weight (\d+)\): (\d+) train records from (\d+)", log
    )
    assert [(path, fmt, weight) for path, fmt, weight, _, _ in shares] == [
        (chat, "chat", "3"),
        (text, "text", "1"),
    ], log[-3000:]
    (_, _, _, chat_taken, chat_held), (_, _, _, text_taken, text_held) = shares
    from falqon_dist.data.mixing import apportion

    total = int(chat_held) + int(text_held)  # as many records as the sources hold, 3:1
    assert [int(chat_taken), int(text_taken)] == apportion(total, [3, 1]), shares
    evals = [m for m in read_metrics(run_dir) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 4] and all(0 < m["eval_loss"] < 20 for m in evals)
    for m in evals:  # each source's loss beside the overall one, which lies between them
        low, high = sorted((m["eval_loss/chat"], m["eval_loss/texts"]))
        assert low <= m["eval_loss"] <= high, m
    # in the summary
    assert re.search(r"\n   chat +\d+\.\d+ -> +\d+\.\d+\n   texts +\d", log), log[-1500:]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["sources"][0] == {"path": chat, "format": "chat", "weight": 3}


def test_two_torchrun_nodes_on_localhost_train_as_one_job(tmp_path):
    """The README's multi-node recipe: one torchrun per node, c10d rendezvous, one rank each."""
    from tests.distributed.launcher import free_port
    from tests.e2e.conftest import TRAIN

    run_dir, port = tmp_path / "run", free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("WANDB_MODE", None)
    commands = [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            "2",
            "--nproc_per_node",
            "1",
            "--node_rank",
            str(node),
            "--rdzv_backend",
            "c10d",
            "--rdzv_endpoint",
            f"127.0.0.1:{port}",
            "--rdzv_id",
            "e2e-two-nodes",
            TRAIN,
            *QUICK,
            f"run.dir={run_dir}",
        ]
        for node in (0, 1)
    ]
    with (
        processes.ProcessGroup(commands[0], cwd=REPO, env=env) as node0,
        processes.ProcessGroup(commands[1], cwd=REPO, env=env) as node1,
    ):
        results = [node0.wait(600), node1.wait(600)]
    for result in results:
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    outputs = [(r.stdout, r.stderr) for r in results]
    check_run_dir(run_dir, 4)
    assert "2 rank(s)" in outputs[0][0] + outputs[1][0]


def test_multinode_script_and_sweep_pass_launcher_flags(tmp_path):
    """launch/multinode.sh HOSTFILE [flags] -- [overrides] hands the flags to the deepspeed launcher and
    the overrides to train.py (checked with a stand-in launcher: a hostfile run needs ssh), and
    sweep.py --launcher-args runs a real 2-rank job with them."""
    from tests.distributed.launcher import free_port

    fake = tmp_path / "deepspeed"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DEEPSPEED": str(fake)}
    script = str(REPO / "launch" / "multinode.sh")
    args = processes.run(
        [
            "bash",
            script,
            "hosts",
            "--master_port",
            "29600",
            "--include",
            "a:0@b:1",
            "--",
            "train.lr=1",
            "method=lora",
        ],
        cwd=REPO,
        env=env,
        timeout=60,
    ).stdout.split()
    assert args == [
        "--hostfile",
        "hosts",
        "--master_port",
        "29600",
        "--include",
        "a:0@b:1",
        "launch/train.py",
        "train.lr=1",
        "method=lora",
    ]
    args = processes.run(
        ["bash", script, "hosts", "train.lr=1"], cwd=REPO, env=env, timeout=60
    ).stdout.split()
    assert args == [
        "--hostfile",
        "hosts",
        "launch/train.py",
        "train.lr=1",
    ]  # no "--": all overrides

    env.pop("DEEPSPEED")
    port = free_port()
    proc = processes.run(
        [
            sys.executable,
            str(REPO / "launch" / "sweep.py"),
            "--root",
            str(tmp_path / "sweeps"),
            "--launcher-args",
            f"--master_port {port}",
            "--grid",
            "method.rank=8",
            "--",
            *QUICK,
        ],
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert f"--master_port {port}" in proc.stdout and "| method.rank=8 | 0 |" in proc.stdout
