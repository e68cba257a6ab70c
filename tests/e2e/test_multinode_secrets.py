"""The W&B key never reaches a file others can read, a command line or a log (issue 25, "Trust").

``launch/multinode.sh`` used to write ``WANDB_API_KEY`` into ``./.deepspeed_env`` (0644, left
behind); DeepSpeed's launcher then put it on pdsh's command line (``export WANDB_API_KEY=...;``,
visible in ``ps``) and logged that command at INFO. Now the key goes into a 0600 file removed at
exit, only its path travels, and rank 0 reads it just before W&B starts.

Checked through the real DeepSpeed launcher with a stand-in ``pdsh`` on PATH: it records its argv,
its environment and what the forwarded key file holds (a hash, a mode), then runs the remote command
as ssh would, in a fresh environment without the key, so rank 0 can only get the key from the file.
A stand-in ``deepspeed`` checks the script's own part quickly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest

from tests import processes
from tests.distributed.launcher import free_port
from tests.e2e.conftest import MODEL_CACHE, QUICK, REPO, VENV_BIN

SCRIPT = str(REPO / "launch" / "multinode.sh")
SECRET = "wandb-test-key-0123456789abcdef0123456789abcdef"
SECRET_SHA = hashlib.sha256(SECRET.encode()).hexdigest()

#: Runs the remote command of DeepSpeed's pdsh launch on every host as ssh would (the arguments joined
#: into one shell command, %n the host's index, a login environment: nothing of the launcher's), after
#: recording argv, environment and the forwarded key file (its sha256 and mode, never its text).
STAND_IN_PDSH = textwrap.dedent("""\
    #!{python}
    import hashlib, json, os, re, subprocess, sys
    args = sys.argv[1:]
    hosts = args[args.index("-w") + 1].split(",")
    command = " ".join(args[args.index("-w") + 2:])
    found = re.search(r"FALQON_WANDB_KEY_FILE=(\\S+?);", command)
    key_file = {{}}
    if found:
        data = open(found.group(1), "rb").read().strip()
        key_file = {{"path": found.group(1), "sha256": hashlib.sha256(data).hexdigest(),
                    "mode": os.stat(found.group(1)).st_mode & 0o777}}
    with open({record!r}, "w") as out:
        json.dump({{"argv": sys.argv, "env": dict(os.environ), "key_file": key_file}}, out)
    login = {{"HOME": os.environ["HOME"], "PATH": {path!r}, "LANG": "C.UTF-8", "USER": "falqon-test"}}
    procs = [subprocess.Popen(["bash", "-c", command.replace("%n", str(i))], env=login) for i in range(len(hosts))]
    sys.exit(max(p.wait() for p in procs))
""")

#: A stand-in ``deepspeed``: records its argv, its environment, the env file DS_ENV_FILE names and
#: the key file that one names (sha256 and mode), then exits with $STAND_IN_RC.
STAND_IN_DEEPSPEED = textwrap.dedent("""\
    #!{python}
    import hashlib, json, os, sys
    env_file = os.environ.get("DS_ENV_FILE")
    lines = open(env_file).read().splitlines() if env_file else []
    entries = dict(line.split("=", 1) for line in lines)
    key = entries.get("FALQON_WANDB_KEY_FILE")
    key_file = {{}}
    if key:
        key_file = {{"sha256": hashlib.sha256(open(key, "rb").read().strip()).hexdigest(),
                    "mode": os.stat(key).st_mode & 0o777, "inherited": os.environ.get("FALQON_WANDB_KEY_FILE")}}
    with open({record!r}, "w") as out:
        json.dump({{"argv": sys.argv, "env": dict(os.environ), "env_file": env_file, "lines": lines,
                   "env_file_mode": os.stat(env_file).st_mode & 0o777 if env_file else None,
                   "key_file": key_file, "key_path": key}}, out)
    sys.exit(int(os.environ.get("STAND_IN_RC", "0")))
""")


def write_exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def files_holding(root: Path, needle: str) -> list[str]:
    """Every file under ``root`` (hidden ones included) whose bytes hold ``needle``."""
    hits = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink() and needle.encode() in path.read_bytes():
                hits.append(str(path))
    return hits


def repo_env_file() -> bytes | None:
    path = REPO / ".deepspeed_env"
    return path.read_bytes() if path.is_file() else None


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return home


def script_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "HOME": str(home),
        "WANDB_API_KEY": SECRET,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        **extra,
    }
    env.pop("FALQON_SECRETS_DIR", None)
    env.pop("DS_ENV_FILE", None)
    return env


# ------------------------------------------------------------------ the script, with a stand-in launcher


def test_the_script_forwards_a_0600_key_file_by_path_and_removes_both_files(tmp_path, home):
    record = tmp_path / "deepspeed.json"
    fake = write_exe(
        tmp_path / "deepspeed", STAND_IN_DEEPSPEED.format(python=sys.executable, record=str(record))
    )
    (home / ".deepspeed_env").write_text("NCCL_DEBUG=INFO\n\nFALQON_CACHE=/somewhere\n")
    before = repo_env_file()
    env = script_env(home, DEEPSPEED=str(fake), WANDB_PROJECT="proj", WANDB_MODE="offline")
    proc = processes.run(
        ["bash", SCRIPT, "hosts", "--master_port", "29600", "--", "train.lr=1"],
        cwd=REPO,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = json.loads(record.read_text())
    assert seen["argv"][1:] == [
        "--hostfile",
        "hosts",
        "--master_port",
        "29600",
        "launch/train.py",
        "train.lr=1",
    ]
    secrets = home / ".cache" / "falqon_dist" / "secrets"
    assert Path(seen["env_file"]).parent == secrets and seen["env_file_mode"] == 0o600
    assert seen["lines"][:2] == [
        "NCCL_DEBUG=INFO",
        "FALQON_CACHE=/somewhere",
    ]  # ~/.deepspeed_env still applies
    assert "WANDB_PROJECT=proj" in seen["lines"] and "WANDB_MODE=offline" in seen["lines"]
    assert seen["lines"][-1] == f"PYTHONPATH={REPO}"
    assert (
        Path(seen["key_path"]).parent == secrets
        and seen["key_file"]["inherited"] == seen["key_path"]
    )
    assert seen["key_file"]["sha256"] == SECRET_SHA and seen["key_file"]["mode"] == 0o600
    # every rank gets the key from the file, local ones too
    assert "WANDB_API_KEY" not in seen["env"]
    assert SECRET not in json.dumps(seen) and SECRET not in proc.stdout + proc.stderr
    assert list(secrets.iterdir()) == []  # both temporary files removed at exit
    assert repo_env_file() == before  # ./.deepspeed_env neither written nor read
    assert files_holding(home, SECRET) == []


def test_no_key_no_key_file_and_a_failing_launcher_still_cleans_up(tmp_path, home):
    record = tmp_path / "deepspeed.json"
    fake = write_exe(
        tmp_path / "deepspeed", STAND_IN_DEEPSPEED.format(python=sys.executable, record=str(record))
    )
    env = script_env(home, DEEPSPEED=str(fake), STAND_IN_RC="3")
    env.pop("WANDB_API_KEY")
    secrets = tmp_path / "shared-secrets"
    env["FALQON_SECRETS_DIR"] = str(secrets)
    proc = processes.run(["bash", SCRIPT, "hosts", "train.lr=1"], cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 3  # the launcher's status
    seen = json.loads(record.read_text())
    assert seen["key_path"] is None and not any(
        line.startswith("FALQON_WANDB_KEY_FILE") for line in seen["lines"]
    )
    assert Path(seen["env_file"]).parent == secrets and list(secrets.iterdir()) == []
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700


@pytest.mark.parametrize("where", ["home", "ds_env_file"])
def test_an_env_file_holding_the_key_is_refused_naming_it(where, tmp_path, home):
    record = tmp_path / "deepspeed.json"
    fake = write_exe(
        tmp_path / "deepspeed", STAND_IN_DEEPSPEED.format(python=sys.executable, record=str(record))
    )
    env = script_env(home, DEEPSPEED=str(fake))
    target = home / ".deepspeed_env" if where == "home" else tmp_path / "my_env"
    if where == "ds_env_file":
        env["DS_ENV_FILE"] = str(target)
    target.write_text(f"NCCL_DEBUG=INFO\n  WANDB_API_KEY={SECRET}\n")
    proc = processes.run(["bash", SCRIPT, "hosts", "train.lr=1"], cwd=REPO, env=env, timeout=60)
    assert proc.returncode == 2 and not record.exists()  # refused before the launcher starts
    assert proc.stderr.startswith(
        f"launch/multinode.sh: error: {target} holds WANDB_API_KEY: DeepSpeed would put it "
        "on pdsh's command line"
    ), proc.stderr
    assert SECRET not in proc.stdout + proc.stderr


# ---------------------------------------------------------------- the training side: load_key_file


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return monkeypatch


def test_rank_0_reads_the_key_file_into_its_environment_never_logging_it(tmp_path, key_env, caplog):
    from falqon_dist.train.wandb_logger import KEY_FILE_VAR, has_credentials, load_key_file

    key = tmp_path / "key"
    key.write_text(SECRET + "\n")
    key.chmod(0o600)
    key_env.setenv(KEY_FILE_VAR, str(key))
    with caplog.at_level(logging.INFO, logger="falqon_dist"):
        assert load_key_file() is True
    assert os.environ["WANDB_API_KEY"] == SECRET and has_credentials()
    assert [r.getMessage() for r in caplog.records] == [f"W&B key read from {key} ({KEY_FILE_VAR})"]
    key.write_text("other\n")
    # a key already set wins
    assert load_key_file() is False and os.environ["WANDB_API_KEY"] == SECRET


@pytest.mark.parametrize(
    "case, words",
    [
        ("missing", "cannot be read (No such file or directory)"),
        ("empty", "holds nothing, not one line with the key"),
        ("two-lines", "holds 2 lines, not one line with the key"),
        ("world-readable", "is readable by other users (mode 644)"),
    ],
)
def test_a_key_file_that_does_not_fit_is_a_warning_naming_it(
    case, words, tmp_path, key_env, caplog
):
    from falqon_dist.train.wandb_logger import KEY_FILE_VAR, load_key_file

    key = tmp_path / "key"
    if case != "missing":
        key.write_text(
            {"empty": "\n", "two-lines": f"{SECRET}\nmore\n", "world-readable": SECRET}[case]
        )
        key.chmod(0o644 if case == "world-readable" else 0o600)
    key_env.setenv(KEY_FILE_VAR, str(key))
    with caplog.at_level(logging.INFO, logger="falqon_dist"):
        loaded = load_key_file()
    assert (
        loaded is (case == "world-readable")
        and (os.environ.get("WANDB_API_KEY") == SECRET) is loaded
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1 and f"{KEY_FILE_VAR}={key} on " in warnings[0] and words in warnings[0]
    ), warnings
    assert all(SECRET not in r.getMessage() for r in caplog.records)


# ------------------------------------------------------ through DeepSpeed's launcher and a stand-in pdsh


def test_through_deepspeeds_pdsh_launch_the_key_is_on_no_command_line_log_or_file(tmp_path, home):
    """One "remote" host (--force_multi: DeepSpeed's pdsh path), one rank training 1 step with
    logger=wandb offline. The key's value is in no pdsh argument, not in pdsh's environment, not in
    the launcher's output (its logged ``cmd = pdsh ...`` included), in no file left anywhere under
    the test's directories or in ./.deepspeed_env; the file pdsh forwarded held it (0600) while the
    job ran, rank 0 read it, and it is gone afterwards."""
    record = tmp_path / "pdsh.json"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    login_path = f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin"
    write_exe(
        bin_dir / "pdsh",
        STAND_IN_PDSH.format(python=sys.executable, record=str(record), path=login_path),
    )
    # what a user keeps in ~/.deepspeed_env for the remote ranks (the tiny model's cache, threads)
    (home / ".deepspeed_env").write_text(f"FALQON_CACHE={MODEL_CACHE}\nOMP_NUM_THREADS=1\n")
    (tmp_path / "hostfile").write_text("remote-host slots=1\n")
    run_dir = tmp_path / "run"
    before = repo_env_file()
    env = script_env(
        home, PATH=f"{bin_dir}:{VENV_BIN}:{os.environ.get('PATH', '')}", WANDB_MODE="offline"
    )
    proc = processes.run(
        [
            "bash",
            SCRIPT,
            str(tmp_path / "hostfile"),
            "--force_multi",
            "--no_ssh_check",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            "--",
            *QUICK,
            "train.max_steps=1",
            "train.eval_generate_samples=0",
            "logger=wandb",
            "wandb.mode=offline",
            f"run.dir={run_dir}",
        ],
        cwd=REPO,
        env=env,
        timeout=600,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]

    seen = json.loads(record.read_text())
    assert seen["argv"][1:6] == [
        "-S",
        "-f",
        "1024",
        "-w",
        "remote-host",
    ]  # DeepSpeed's pdsh command, for real
    assert not any(SECRET in arg for arg in seen["argv"]), "the key is on pdsh's command line"
    assert SECRET not in json.dumps(seen["env"]) and "WANDB_API_KEY" not in seen["env"]
    forwarded = " ".join(seen["argv"])
    secrets = home / ".cache" / "falqon_dist" / "secrets"
    assert f"export FALQON_WANDB_KEY_FILE={secrets}/wandb_key." in forwarded
    # ~/.deepspeed_env still reaches the ranks
    assert f"export FALQON_CACHE={MODEL_CACHE};" in forwarded
    assert seen["key_file"]["sha256"] == SECRET_SHA and seen["key_file"]["mode"] == 0o600

    # DeepSpeed's INFO line: the path, not the key
    assert "cmd = pdsh" in output and SECRET not in output
    log = (run_dir / "train.log").read_text()
    assert f"W&B key read from {seen['key_file']['path']} (FALQON_WANDB_KEY_FILE)" in log, log[
        -3000:
    ]
    assert "offline mode" in log and SECRET not in log
    assert not Path(seen["key_file"]["path"]).exists() and list(secrets.iterdir()) == []
    assert files_holding(tmp_path, SECRET) == []  # run dir (wandb/ included), home, records
    assert repo_env_file() == before
