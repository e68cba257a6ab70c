"""Files in a run directory: never written through a symbolic link, replaced atomically; a fresh
run never lands on an old one (refused, or the old run moved aside with run.overwrite=true)."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from falqon_dist import files
from falqon_dist.files import UnsafeFileError, check_plain_file, open_no_follow, write_atomic
from falqon_dist.train import logging_utils
from falqon_dist.train.logging_utils import MetricsWriter, note_before_logging, setup_logging
from falqon_dist.train.run_dir import (
    RunDirBusy,
    RunDirLock,
    check_resume,
    check_run_dir_use,
    prepare_run_dir,
)
from falqon_dist.train.settings import ConfigError, validate

CONF = Path(__file__).resolve().parents[2] / "conf"
VICTIM_TEXT = "precious: not a run's file\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text(VICTIM_TEXT)
    return path


def _snapshot(directory: Path) -> dict[str, tuple]:
    """Every entry under ``directory``: its kind, bytes (files), target (links) and mtime."""
    out = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        if path.is_symlink():
            out[str(path)] = ("link", os.readlink(path), info.st_mtime_ns)
        elif path.is_file():
            out[str(path)] = ("file", path.read_bytes(), info.st_mtime_ns)
        else:
            out[str(path)] = ("dir", info.st_mtime_ns)
    return out


# ---------------------------------------------------------------- falqon_dist.files


@pytest.mark.parametrize("mode", ["r", "a", "a+", "w", "r+", "x", "ab"])
def test_a_symbolic_link_at_the_name_is_refused_naming_it(tmp_path, victim, mode):
    link = tmp_path / "train.log"
    link.symlink_to(victim)
    with pytest.raises(
        UnsafeFileError, match=f"^{link} is a symbolic link; falqon_dist writes only regular files"
    ):
        open_no_follow(link, mode)
    assert victim.read_text() == VICTIM_TEXT  # not truncated ("w"), not appended to
    dangling = tmp_path / "metrics.jsonl"
    dangling.symlink_to(tmp_path / "would_be_created")
    with pytest.raises(UnsafeFileError, match="is a symbolic link"):
        open_no_follow(dangling, "a")
    assert not (tmp_path / "would_be_created").exists()


def test_a_symlinked_directory_above_the_name_is_followed(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "run").symlink_to(real, target_is_directory=True)
    with open_no_follow(tmp_path / "run" / "train.log", "a") as handle:
        handle.write("line\n")
    write_atomic(tmp_path / "run" / "config.yaml", "a: 1\n")
    assert (real / "train.log").read_text() == "line\n" and (
        real / "config.yaml"
    ).read_text() == "a: 1\n"


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "train.log"
    os.mkfifo(fifo)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            open_no_follow(fifo, "a")
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome.append(error)

    # O_WRONLY on a FIFO without reader, O_RDWR on one: both refused at once
    for mode in ("a", "a+"):
        outcome.clear()
        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(5)
        assert outcome and isinstance(outcome[0], UnsafeFileError), (mode, outcome)
        assert "is not a regular file" in str(outcome[0]) and str(fifo) in str(outcome[0])


def test_a_hard_linked_file_is_not_written_in_place_but_may_be_replaced(tmp_path):
    copy = tmp_path / "other_run_train.log"
    copy.write_text("the other run's log\n")
    log = tmp_path / "train.log"
    os.link(copy, log)  # what `cp -al runs/a runs/b` leaves
    for mode in ("a", "w"):
        with pytest.raises(UnsafeFileError, match=f"{log} has 1 other hard link"):
            open_no_follow(log, mode)
    assert copy.read_text() == "the other run's log\n"  # "w" did not truncate it before refusing
    with pytest.raises(UnsafeFileError, match="other hard link"):
        check_plain_file(log)
    check_plain_file(log, in_place=False)  # replaced whole: the other name keeps its bytes
    write_atomic(log, "new\n")
    assert log.read_text() == "new\n" and copy.read_text() == "the other run's log\n"


def test_open_no_follow_opens_and_creates_like_open(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with open_no_follow(path, "a") as handle:
        handle.write("1\n")
    with open_no_follow(path, "a") as handle:
        handle.write("2\n")
    with open_no_follow(path, "r") as handle:
        assert handle.read() == "1\n2\n"
    with open_no_follow(path, "w") as handle:
        handle.write("3\n")
    assert path.read_text() == "3\n"
    with pytest.raises(FileExistsError):
        open_no_follow(path, "x")
    with pytest.raises(FileNotFoundError):
        open_no_follow(tmp_path / "missing", "r")
    with pytest.raises(ValueError, match="unsupported mode"):
        open_no_follow(path, "q")
    with open_no_follow(path, "r") as handle:  # O_CLOEXEC: no child process inherits a run's file
        assert not os.get_inheritable(handle.fileno())
        assert fcntl.fcntl(handle.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC


def test_write_atomic_replaces_the_name_never_a_links_target(tmp_path, victim):
    path = tmp_path / "config.yaml"
    write_atomic(path, "a: 1\n")
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "a: 1\n" and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    path.chmod(0o600)
    write_atomic(path, b"a: 2\n")
    # keeps its mode
    assert path.read_text() == "a: 2\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    link = tmp_path / "wandb_run_id"
    link.symlink_to(victim)
    with pytest.raises(UnsafeFileError, match=f"{link} is a symbolic link"):
        write_atomic(link, "abc")
    assert victim.read_text() == VICTIM_TEXT and link.is_symlink()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.yaml", "victim.txt", "wandb_run_id"]  # no temp left


def test_write_atomic_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old\n")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n"
    # the temporary file is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_write_atomic_over_a_link_planted_after_the_check_replaces_the_link(
    tmp_path, victim, monkeypatch
):
    """The race: a link planted between the check and the rename. os.replace replaces the link."""
    path = tmp_path / "config.yaml"
    real_mkstemp = files.tempfile.mkstemp

    def plant_then_mkstemp(**kwargs):
        path.symlink_to(victim)
        return real_mkstemp(**kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", plant_then_mkstemp)
    write_atomic(path, "a: 1\n")
    assert (
        not path.is_symlink() and path.read_text() == "a: 1\n" and victim.read_text() == VICTIM_TEXT
    )


# ---------------------------------------------------------------- the run's writers


def test_train_log_through_a_link_is_refused(tmp_path, victim):
    (tmp_path / "train.log").symlink_to(victim)
    with pytest.raises(UnsafeFileError, match=f"{tmp_path / 'train.log'} is a symbolic link"):
        setup_logging(tmp_path, rank=0)
    assert victim.read_text() == VICTIM_TEXT


def test_train_log_gets_the_lines_said_before_it_existed(tmp_path, capsys):
    note_before_logging("run.overwrite=true: moved the previous run in X to Y")
    assert (
        "falqon_dist: run.overwrite=true: moved the previous run in X to Y"
        in capsys.readouterr().err
    )
    logger = setup_logging(tmp_path, rank=0)
    logger.info("first line of the run")
    for handler in logger.handlers:
        handler.flush()
    text = (tmp_path / "train.log").read_text()
    assert text.index("moved the previous run in X to Y") < text.index("first line of the run")
    assert logging_utils._EARLY_NOTES == []
    setup_logging(tmp_path, rank=0)  # said once, not again by the next set-up
    assert (tmp_path / "train.log").read_text().count("moved the previous run") == 1
    logging.getLogger(logging_utils.LOGGER_NAME).handlers.clear()


def test_metrics_through_a_link_are_refused_and_a_resume_rewrites_atomically(tmp_path, victim):
    metrics = tmp_path / "metrics.jsonl"
    metrics.symlink_to(victim)
    writer = MetricsWriter(metrics, enabled=True)
    with pytest.raises(UnsafeFileError, match="is a symbolic link"):
        writer.write({"step": 1})
    with pytest.raises(UnsafeFileError, match="is a symbolic link"):
        MetricsWriter(metrics, enabled=True, resume_step=1)
    assert victim.read_text() == VICTIM_TEXT
    metrics.unlink()
    metrics.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    MetricsWriter(metrics, enabled=True, resume_step=2).write({"step": 3, "loss": 1.0})
    assert metrics.read_text() == '{"step": 1}\n{"step": 2}\n{"loss": 1.0, "step": 3}\n'


def test_the_lock_through_a_link_is_refused(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(ConfigError, match=f"{run / '.lock'} is a symbolic link"):
        RunDirLock(run)
    assert victim.read_text() == VICTIM_TEXT  # neither locked nor emptied


# ---------------------------------------------------------------- a used run directory


def _previous_run(run: Path) -> None:
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000002")
    (run / "config.yaml").write_text("run: {dir: x}\n")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    (run / "train.log").write_text("old log\n")
    (run / ".lock").write_text("")  # released at the end of the old run


@pytest.mark.parametrize(
    "name",
    [".lock", "config.yaml", "train.log", "metrics.jsonl", "wandb_run_id", "error_rank1.txt"],
)
def test_a_link_at_any_name_a_run_writes_is_refused_before_anything_is_written(
    tmp_path, victim, name
):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    before = _snapshot(tmp_path)
    for resume in (False, True):
        with pytest.raises(
            ConfigError,
            match=f"^{run / name} is a symbolic link; falqon_dist writes only regular "
            "files in a run directory — remove it$",
        ):
            prepare_run_dir(run, resume=resume, overwrite=False)
    assert _snapshot(tmp_path) == before


def test_a_fresh_run_into_a_used_run_dir_is_refused_naming_both_ways_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _previous_run(run)
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError) as error:
        prepare_run_dir(run, resume=False, overwrite=False)
    message = str(error.value)
    assert (
        f"run.dir {run} already holds a run (checkpoints, config.yaml, metrics.jsonl, train.log)"
        in message
    )
    assert (
        "train.resume=true" in message and "run.overwrite=true" in message and "\n" not in message
    )
    assert _snapshot(tmp_path) == before  # nothing changed
    assert prepare_run_dir(run, resume=True, overwrite=False) is None  # continuing it is fine
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("leftover", [None, ".lock", "hostfile"])
def test_an_empty_dir_or_a_stale_lock_or_a_users_file_is_a_fresh_start(tmp_path, leftover):
    run = tmp_path / "run"
    run.mkdir()
    if leftover:
        (run / leftover).write_text(
            "host a, pid 1, since 2020-01-01T00:00:00\n" if leftover == ".lock" else "n1 slots=8\n"
        )
    before = _snapshot(tmp_path)
    assert prepare_run_dir(run, resume=False, overwrite=False) is None
    assert prepare_run_dir(tmp_path / "missing", resume=False, overwrite=False) is None
    assert _snapshot(tmp_path) == before and not (tmp_path / "missing").exists()


def test_overwrite_moves_the_old_run_aside_and_says_where(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    run = tmp_path / "run"
    run.symlink_to(real, target_is_directory=True)  # a symlinked run.dir is the user's choice: fine
    _previous_run(run)
    (run / "error_rank0.txt").write_text("Traceback ...\n")
    (run / "hostfile").write_text("n1 slots=8\n")  # not the run's: stays
    old = {p.relative_to(real): p.read_bytes() for p in real.rglob("*") if p.is_file()}
    line = prepare_run_dir(run, resume=False, overwrite=True)
    aside = Path(line.rsplit(" to ", 1)[1])
    assert line == (
        f"run.overwrite=true: moved the previous run in {run} (checkpoints, config.yaml, "
        f"error_rank0.txt, metrics.jsonl, train.log) to {aside}"
    )
    assert aside.parent == tmp_path and aside.name.startswith("real.old-") and run.is_symlink()
    moved = {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()}
    # every byte, nothing lost
    assert moved == {k: v for k, v in old.items() if str(k) not in (".lock", "hostfile")}
    assert sorted(p.name for p in real.iterdir()) == [".lock", "hostfile"]
    _previous_run(run)  # a second start-over in the same second gets its own directory
    second = Path(prepare_run_dir(run, resume=False, overwrite=True).rsplit(" to ", 1)[1])
    assert (
        second != aside
        and second.is_dir()
        and (second / "config.yaml").exists()
        and (aside / "config.yaml").exists()
    )


def test_overwrite_of_a_fresh_dir_moves_nothing(tmp_path):
    (tmp_path / "run").mkdir()
    assert prepare_run_dir(tmp_path / "run", resume=False, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_dir_held_by_a_live_run_is_busy_and_never_moved(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _previous_run(run)
    lock = RunDirLock(run)
    try:
        before = _snapshot(tmp_path)
        for resume, overwrite in ((False, True), (False, False), (True, False)):
            with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
                prepare_run_dir(run, resume=resume, overwrite=overwrite)
        assert _snapshot(tmp_path) == before
    finally:
        lock.release()
    # a lock the probe found free stays free: a real run takes it next
    assert prepare_run_dir(run, resume=True, overwrite=False) is None
    RunDirLock(run).release()


def test_the_busy_probe_sees_another_process_and_creates_no_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert prepare_run_dir(run, resume=False, overwrite=False) is None
    assert not (run / ".lock").exists()  # looking created nothing
    code = (
        "import sys, time; from pathlib import Path; from falqon_dist.train.run_dir import RunDirLock\n"
        f"lock = RunDirLock(Path({str(run)!r})); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        # after DeepSpeed's notice
        assert any(line.strip() == "locked" for line in iter(holder.stdout.readline, ""))
        with pytest.raises(
            RunDirBusy, match=f"in use by another run \\(host .*, pid {holder.pid}, since"
        ):
            prepare_run_dir(run, resume=False, overwrite=True)
    finally:
        holder.kill()
        holder.wait()


def test_check_run_dir_use_raises_the_same_on_one_rank(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _previous_run(run)
    with pytest.raises(ConfigError, match="already holds a run"):
        check_run_dir_use(run, resume=False, overwrite=False)
    check_run_dir_use(run, resume=True, overwrite=False)


# ---------------------------------------------------------------- run.overwrite in the config


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["run.dir=/tmp/falqon-test-run", *overrides])


def test_run_overwrite_is_a_bool_defaulting_to_false_and_excludes_resume():
    assert validate(_cfg([])).run_overwrite is False
    assert validate(_cfg(["run.overwrite=true"])).run_overwrite is True
    with pytest.raises(ConfigError, match=r"^run\.overwrite must be true or false, got 'maybe'$"):
        validate(_cfg(["run.overwrite=maybe"]))
    with pytest.raises(
        ConfigError, match=r"train\.resume=true and run\.overwrite=true contradict each other"
    ):
        validate(_cfg(["run.overwrite=true", "train.resume=true"]))
    saved = OmegaConf.to_container(_cfg([]))
    del saved["run"]["overwrite"]  # a config.yaml written before the key existed
    assert validate(saved).run_overwrite is False


def test_run_overwrite_never_blocks_or_warns_a_resume(tmp_path):
    saved = OmegaConf.to_container(
        _cfg([f"run.dir={tmp_path}", "run.overwrite=true"]), resolve=True
    )
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")  # the run that started over
    resumed = _cfg([f"run.dir={tmp_path}", "train.resume=true"])
    assert check_resume(tmp_path, resumed, world_size=1, saved_world_size=1) == []
    # saved before run.overwrite existed: not "a key the saved config lacks"
    del saved["run"]["overwrite"]
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    assert check_resume(tmp_path, resumed, world_size=1, saved_world_size=1) == []
