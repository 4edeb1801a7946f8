"""The checkpoint door: an edited, foreign or out-of-order checkpoint is refused, naming the file,
before anything is submitted or written, and no lock is left behind.

Each case builds a run folder with ``save_checkpoint`` on tiny arrays (no simulation), damages it
one way, and checks three readers: ``load_checkpoint``, ``checkpoint_settings`` (what the ServerApp
reads first) and ``iet-agc run --resume`` (exit 2, one line, no submission).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from fl_app.checkpoint import (
    FORMAT,
    MANIFEST,
    RUN_KEY_FILE,
    Checkpoint,
    CheckpointError,
    checkpoint_settings,
    load_checkpoint,
    save_checkpoint,
)
from fl_app.resume import check_run_folder_free, run_folder_lock
from fl_app.run_folder import RunWriter
from fl_app.settings import Settings
from iet_agc.cli import build_parser
from iet_agc.cli import main as cli_main
from iet_agc.run import prepare_run

ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(r: int, key: str = "abc", lr: float = 0.0002) -> Checkpoint:
    return Checkpoint(
        server_round=r,
        weights={"w": np.arange(64, dtype=np.float32).reshape(8, 8) * r},
        ledger_meta={"k": r},
        ledger_arrays={"shard-0": np.arange(3)},
        rows=[{"round": i, "train_loss": 0.5, "fid": float("nan")} for i in range(1, r + 1)],
        settings={**Settings().to_run_config(), "lr": lr},
        run_key=key,
        fingerprint="3-x",
    )


def _tables(run: Path, rounds: int) -> None:
    """rounds.csv and assignments.csv as a run leaves them after ``rounds`` rounds."""
    (run / "rounds.csv").write_text("round,train_loss\n" + "".join(f"{i},0.5\n" for i in range(1, rounds + 1)))
    (run / "assignments.csv").write_text(
        "round,shard,sample_id\n" + "".join(f"{i},0,{j}\n" for i in range(1, rounds + 1) for j in range(3))
    )


def _run(tmp: Path, rounds: int = 2) -> Path:
    """A run folder after ``rounds`` rounds: tables, then each round's checkpoint (as the recorder)."""
    run = tmp / "run"
    run.mkdir()
    for r in range(1, rounds + 1):
        _tables(run, r)
        save_checkpoint(run, _checkpoint(r))
    return run


def _ckpt(run: Path, r: int = 2) -> Path:
    return run / "checkpoint" / f"round-{r:06d}"


def _flip_byte(path: Path, at: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _edit_lr_same_length(d: Path) -> None:
    text = (d / "state.json").read_text()
    assert '"lr": 0.0002' in text
    (d / "state.json").write_text(text.replace('"lr": 0.0002', '"lr": 0.0009'))  # same size: only sha256 tells


def _edit_lr(d: Path) -> None:
    state = json.loads((d / "state.json").read_text())
    state["settings"]["lr"] = 0.01
    (d / "state.json").write_text(json.dumps(state, indent=1))


def _foreign(run: Path) -> None:
    """Another run's round-3 checkpoint copied into this run's checkpoint folder."""
    other = run.parent / "other"
    other.mkdir()
    save_checkpoint(other, _checkpoint(3, key="xyz"))
    shutil.copytree(_ckpt(other, 3), _ckpt(run, 3))
    shutil.rmtree(other)


def _older(run: Path) -> None:
    """Rows up to round 4 written, the newest checkpoint round 2's (newer ones deleted, or an old
    copy put back in their place)."""
    _tables(run, 4)


def _downgrade_format(d: Path) -> None:
    """A format-2 checkpoint dressed as format 1 without removing its manifest."""
    state = json.loads((d / "state.json").read_text())
    state["format"] = 1
    (d / "state.json").write_text(json.dumps(state, indent=1))


# (what is done to the run folder, the file the refusal names, words of the refusal)
CASES = {
    "weights byte edited": (lambda run: _flip_byte(_ckpt(run) / "weights.safetensors"), "weights.safetensors", "chang"),
    "ledger byte edited": (lambda run: _flip_byte(_ckpt(run) / "ledger.safetensors"), "ledger.safetensors", "changed"),
    "lr edited (same size)": (lambda run: _edit_lr_same_length(_ckpt(run)), "state.json", "changed since it was"),
    "lr edited": (lambda run: _edit_lr(_ckpt(run)), "state.json", "truncated or edited"),
    "format edited to 1": (lambda run: _downgrade_format(_ckpt(run)), "state.json", "changed since it was"),
    "weights removed": (lambda run: (_ckpt(run) / "weights.safetensors").unlink(), "weights.safetensors", "missing"),
    "state removed": (lambda run: (_ckpt(run) / "state.json").unlink(), "state.json", "missing"),
    "manifest removed": (lambda run: (_ckpt(run) / MANIFEST).unlink(), MANIFEST, "missing"),
    "extra file": (lambda run: (_ckpt(run) / "extra.safetensors").write_bytes(b"x"), "extra.safetensors", "not in"),
    "weights truncated": (
        lambda run: os.truncate(_ckpt(run) / "weights.safetensors", 100),
        "weights.safetensors",
        "truncated",
    ),
    "manifest edited": (
        lambda run: _replace(_ckpt(run) / MANIFEST, '"round": 2', '"round": 3'),
        "round-000002",
        "does not match the round",
    ),
    "foreign checkpoint": (_foreign, "round-000003", "run xyz"),
    "round folder renamed": (lambda run: _ckpt(run).rename(_ckpt(run, 5)), "round-000005", "renamed or out of order"),
    "older than the rows": (_older, "rounds.csv", "out of order"),
    "run key removed": (lambda run: (run / RUN_KEY_FILE).unlink(), RUN_KEY_FILE, "missing"),
    "run key changed": (lambda run: (run / RUN_KEY_FILE).write_text("zzz\n"), RUN_KEY_FILE, "another run's checkpoint"),
    "table row edited": (
        lambda run: _replace(run / "assignments.csv", "1,0,2", "1,0,1"),
        "assignments.csv",
        "changed since",
    ),
    "table truncated": (
        lambda run: (run / "assignments.csv").write_text("round,shard,sample_id\n1,0,0\n"),
        "assignments.csv",
        "truncated",
    ),
    "table removed": (lambda run: (run / "assignments.csv").unlink(), "assignments.csv", "missing"),
}


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _assert_unlocked(run: Path) -> None:
    assert not (run / ".lock").exists(), "a lock file was left behind"


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_checkpoint_is_refused_naming_the_file(tmp_path, case):
    damage, name, words = CASES[case]
    run = _run(tmp_path)
    damage(run)
    before = _snapshot(run)
    for read in (load_checkpoint, checkpoint_settings):
        with pytest.raises(CheckpointError) as err:
            read(run)
        message = str(err.value)
        assert name in message and words in message, (read.__name__, message)
    assert _snapshot(run) == before  # nothing written
    _assert_unlocked(run)


@pytest.mark.parametrize("case", list(CASES))
def test_resume_of_a_tampered_checkpoint_exits_2_before_submitting(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr("iet_agc.run.subprocess.Popen", lambda *a, **k: pytest.fail("a run was submitted"))
    damage, name, words = CASES[case]
    run = _run(tmp_path)
    damage(run)
    before = _snapshot(run)
    code = cli_main(["run", str(ROOT), "--resume", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("iet-agc run: error: --resume: ") and name in err and words in err, err
    assert _snapshot(run) == before
    _assert_unlocked(run)


def test_a_good_checkpoint_resumes_and_the_lock_probe_writes_nothing(tmp_path):
    run = _run(tmp_path)
    before = _snapshot(run)
    ckpt = load_checkpoint(run)
    assert ckpt.server_round == 2 and ckpt.format == FORMAT and ckpt.run_key == "abc"
    assert ckpt.settings["lr"] == 0.0002 and [row["round"] for row in ckpt.rows] == [1, 2]
    assert set(ckpt.tables) == {"assignments.csv"}  # the carried tables the folder has
    assert sorted(p.name for p in _ckpt(run).iterdir()) == [
        "ledger.safetensors",
        MANIFEST,
        "state.json",
        "weights.safetensors",
    ]
    args = build_parser().parse_args(["run", str(ROOT), "--resume", str(run), "--supernodes", "2"])
    cmd = prepare_run(args)
    assert "--run-config" in cmd and f"resume={json.dumps(str(run.resolve()))}" in cmd[cmd.index("--run-config") + 1]
    assert _snapshot(run) == before
    _assert_unlocked(run)


def test_rows_of_the_round_in_flight_are_allowed_and_cut_back_exactly(tmp_path):
    """A crash between the round's tables and its checkpoint leaves one round more in the tables:
    accepted, and the resume cuts each carried table back to the bytes the checkpoint recorded."""
    run = tmp_path / "run"
    run.mkdir()
    settings = Settings()
    writer = RunWriter(run, settings)
    for r in (1, 2):
        writer.add_assignment(r, [np.array([0, 1]), np.array([2])], [np.array([1]), np.array([])])
        save_checkpoint(run, _checkpoint(r))
    at_round_2 = {n: (run / n).read_bytes() for n in ("assignments.csv", "moved.csv", "shards.csv", "dropped.csv")}
    writer.add_assignment(3, [np.array([0]), np.array([1, 2])], [np.array([0]), np.array([])])  # then the crash
    writer.add_round({"round": 3})
    ckpt = load_checkpoint(run)
    assert ckpt.server_round == 2
    RunWriter(run, settings, rows=ckpt.rows, completed_round=2, table_bytes=ckpt.tables)
    assert {n: (run / n).read_bytes() for n in at_round_2} == at_round_2


def test_a_format_1_checkpoint_is_read_with_a_warning_and_its_own_checks(tmp_path, capsys):
    run = _run(tmp_path)
    d = _ckpt(run)
    (d / MANIFEST).unlink()
    state = json.loads((d / "state.json").read_text())
    (d / "state.json").write_text(json.dumps({**state, "format": 1}, indent=1))
    (run / RUN_KEY_FILE).unlink()  # format-1 runs had none
    ckpt = load_checkpoint(run)
    assert ckpt.format == 1 and ckpt.server_round == 2 and ckpt.tables == {}
    args = build_parser().parse_args(["run", str(ROOT), "--resume", str(run), "--supernodes", "2"])
    prepare_run(args)
    assert "format 1 carries no checksums" in capsys.readouterr().err
    d.rename(_ckpt(run, 4))  # the checks that need no checksum still hold
    with pytest.raises(CheckpointError, match="round-000004: the folder's name does not match"):
        load_checkpoint(run)
    _ckpt(run, 4).rename(d)
    _tables(run, 4)
    with pytest.raises(CheckpointError, match="rounds.csv already holds round 4"):
        load_checkpoint(run)


def test_a_checkpoint_of_another_run_is_not_written_into_a_run_folder(tmp_path):
    save_checkpoint(tmp_path, _checkpoint(1))
    with pytest.raises(CheckpointError, match=f"{RUN_KEY_FILE}: this folder is run abc; refusing .* run xyz"):
        save_checkpoint(tmp_path, _checkpoint(2, key="xyz"))
    assert [p.name for p in (tmp_path / "checkpoint").iterdir()] == ["round-000001"]


def test_the_server_app_refuses_under_the_lock_and_releases_it(tmp_path):
    """A deployment resumed without the CLI: the ServerApp's own check, the lock released after."""
    from fl_app.server_app import run as server_run

    run = _run(tmp_path)
    _flip_byte(_ckpt(run) / "weights.safetensors")
    with pytest.raises(CheckpointError, match="weights.safetensors: changed"):
        server_run(None, Settings(resume=str(run), train_size=120))
    check_run_folder_free(run)  # not held
    with run_folder_lock(run), open(run / ".lock") as fh:  # and free to take
        with pytest.raises(BlockingIOError):
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_the_lock_probe_refuses_a_held_folder(tmp_path):
    with run_folder_lock(tmp_path):
        with pytest.raises(RuntimeError, match="in use by process"):
            check_run_folder_free(tmp_path)
    check_run_folder_free(tmp_path)


def test_the_checked_tables_are_the_ones_a_resume_carries_on():
    from fl_app.checkpoint import CARRIED_TABLES, ORDER_TABLES
    from fl_app.run_folder import round_columns, tables

    assert set(CARRIED_TABLES) == set(tables())
    assert all(h.startswith("round,") for n, h in tables().items() if n in ORDER_TABLES)
    assert round_columns()[0] == "round"
