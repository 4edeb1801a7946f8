"""``iet-agc sweep``: its caps and every file it reads. A sweep over the caps, and a sweep file, base
preset, ``results.csv`` or run folder table that cannot be read, exit 2 with one line that names the
file (and the cap), no traceback, before anything runs.

Everything runs in-process through ``iet_agc.cli.main``; no simulation starts (``run_sweep`` is
replaced, or runs a stand-in that writes a finished run folder).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from fl_app.config import toml_value
from fl_app.settings import Settings
from iet_agc import cli
from iet_agc import sweep as sw
from iet_agc import sweep_file as sf
from iet_agc import sweep_report as sr
from iet_agc.inputs import InputError, read_table, read_text, read_toml

PREFIX = "iet-agc sweep: error: "
GOOD_RESULTS = "cell,row,seed,config_hash,run\n"


def one_line(capsys, argv: list[str], *named: str) -> str:
    """``iet-agc sweep ARGV`` exits 2: its last stderr line names what it must, no traceback."""
    assert cli.main(["sweep", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.splitlines()[-1]
    assert err.endswith("\n") and line.startswith(PREFIX), err
    for part in named:
        assert part in line, (part, line)
    return line


@pytest.fixture
def nothing_runs(monkeypatch):
    monkeypatch.setattr(sw, "run_sweep", lambda *a, **k: pytest.fail("ran despite a refused input"))


def write(folder: Path, text: str | bytes, name: str = "s.toml") -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ---- caps -------------------------------------------------------------------------------------
def _grid(keys: int, values: int) -> str:
    """A [grid] of ``keys`` keys with ``values`` values each (valid values, never expanded)."""
    names = ["lr", "skip-threshold", "aug-strength", "local-epochs", "num-rounds", "batch-size", "ema-decay"]
    return "[grid]\n" + "".join(f"{k} = [{', '.join(str(i + 1) for i in range(values))}]\n" for k in names[:keys])


CAPS = [
    # (sweep file, extra arguments, what the line names)
    (_grid(6, 10), [], ["asks for 1000000 cells", "at most 1000 cells (MAX_CELLS)"]),
    (_grid(7, 100), [], ["asks for 100000000000000 cells", "MAX_CELLS"]),
    ("".join(f"[rows.r{i}]\n" for i in range(1001)), [], ["asks for 1001 cells", "1001 rows x 1 grid points"]),
    ("".join(f"[rows.r{i}]\n" for i in range(11)) + _grid(1, 100), [], ["asks for 1100 cells", "11 rows x 100"]),
    ("[vary]\nlr = [" + ", ".join(f"{i + 1}e-4" for i in range(1001)) + "]\n", [], ["+ 1001 vary values", "MAX_CELLS"]),
    (_grid(3, 10) + "[vary]\nnum-shards = [" + ", ".join(map(str, range(1, 3))) + "]\n", [], ["asks for 1002 cells"]),
    (f"seeds = {list(range(101))}\n", [], ["seeds: 101 seeds", "at most 100 (MAX_SEEDS)"]),
    (f"seeds = {list(range(10**5))}\n", [], ["seeds: 100000 seeds", "MAX_SEEDS"]),
    ("seeds = [0]\n", ["--seeds", ",".join(map(str, range(101)))], ["--seeds: 101 seeds", "MAX_SEEDS"]),
    ("seeds = [0]\n", ["--seeds", "0," * 10**6 + "0"], ["--seeds: 1000001 seeds", "MAX_SEEDS"]),
    (
        f"seeds = {list(range(100))}\n[vary]\nlr = [" + ", ".join(f"{i + 1}e-4" for i in range(101)) + "]\n",
        [],
        ["101 cells x 100 seeds = 10100 runs", "at most 10000 (MAX_RUNS)"],  # lr=10e-4 is the base
    ),
    ("x = 1\n" + "#" * 2**20, [], ["1.0 MiB, larger than any such file (1 MiB)"]),
]


@pytest.mark.parametrize(("text", "extra", "named"), CAPS)
def test_a_sweep_over_a_cap_is_refused_before_anything_is_made(tmp_path, capsys, nothing_runs, text, extra, named):
    path = write(tmp_path, text)
    one_line(capsys, [str(path), "--out", str(tmp_path / "out"), *extra], "" if extra else str(path), *named)
    assert not (tmp_path / "out").exists()


def test_the_cell_cap_comes_before_any_cell_is_made_or_checked(tmp_path, capsys, nothing_runs, monkeypatch):
    monkeypatch.setattr(sf, "Settings", None)  # a cell checked, hashed or expanded would need it
    monkeypatch.setattr(sf, "expand_cells", None)
    path = write(tmp_path, _grid(7, 100))  # 10^14 cells
    one_line(capsys, [str(path)], str(path), "asks for 100000000000000 cells")


def test_the_cell_count_is_exact_at_the_cap():
    rows = {f"r{i}": {} for i in range(10)}
    sf._check_cell_count("s.toml", rows, {"lr": list(range(99))}, {"seed-x": list(range(10))})  # 990 + 10
    with pytest.raises(sf.SweepError, match=r"s.toml: asks for 1001 cells"):
        sf._check_cell_count("s.toml", rows, {"lr": list(range(99))}, {"seed-x": list(range(11))})
    assert sf._seed_list(list(range(100)), "s.toml") == list(range(100))


def test_the_runs_cap_counts_the_cells_picked(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sf, "MAX_RUNS", 4)
    ran = []
    monkeypatch.setattr(sw, "run_sweep", lambda sweep, *a, **k: ran.append(len(sweep.cells) * len(sweep.seeds)))
    path = write(tmp_path, "seeds = [0, 1]\n[rows.a]\n[rows.b]\nlr = 0.002\n[rows.c]\nlr = 0.003\n")
    out = str(tmp_path / "out")
    one_line(capsys, [str(path), "--out", out], str(path), "3 cells x 2 seeds = 6 runs", "at most 4 (MAX_RUNS)")
    assert cli.main(["sweep", str(path), "--out", out, "--cells", "a,c"]) == 0 and ran == [4]


# ---- the sweep file and its base preset ---------------------------------------------------------
SWEEP_FILES = [
    # (name -> file contents, or None: a folder; the line names)
    ({"s.toml": b"seeds = [0]\n[set]\nlr = 0.002 # caf\xe9\n"}, ["not UTF-8 text (byte 0xe9 on line 3)"]),
    ({"s.toml": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"}, ["not UTF-8 text (byte 0x89 on line 1)"]),
    ({"s.toml": b"seeds = [0]\n\x00\n"}, ["line 2", "invalid TOML"]),
    ({"s.toml": "seeds = [0]\n[set]\nlr = \n"}, ["line 3 (lr): invalid TOML"]),
    ({"s.toml": "seeds = [0]\nseeds = [1]\n"}, ["line 2 (seeds): invalid TOML"]),
    ({"s.toml": "[set\n"}, ["line 1", "invalid TOML"]),
    ({"s.toml": '[set]\nlr = "0.1\n'}, ["line 2 (lr): invalid TOML"]),
    ({"s.toml": None}, ["is a folder, not a file"]),
    ({}, ["does not exist"]),
    ({"s.toml": 'base = "p.toml"\n'}, ["base: preset", "p.toml: does not exist"]),
    ({"s.toml": 'base = "p.toml"\n', "p.toml": b"lr = 0.1 # \xff\n"}, ["base: preset", "not UTF-8 text"]),
    ({"s.toml": 'base = "p.toml"\n', "p.toml": "lr = 0.1\nlr = 0.2\n"}, ["p.toml: line 2 (lr): invalid TOML"]),
    ({"s.toml": 'base = "p.toml"\n', "p.toml": None}, ["p.toml: is a folder, not a file"]),
    ({"s.toml": 'base = "p.toml"\n', "p.toml": "x = 1\n" + " " * 2**20}, ["p.toml: 1.0 MiB, larger than"]),
]


@pytest.mark.parametrize(("files", "named"), SWEEP_FILES)
def test_an_unreadable_sweep_file_or_preset_is_refused_naming_it(tmp_path, capsys, nothing_runs, files, named):
    for name, data in files.items():
        if data is None:
            (tmp_path / name).mkdir()
        else:
            write(tmp_path, data, name)
    path = tmp_path / "s.toml"
    one_line(capsys, [str(path), "--out", str(tmp_path / "out")], str(path), *named)


def test_a_symlink_loop_and_a_pipe_are_refused_naming_them(tmp_path, capsys, nothing_runs):
    (tmp_path / "s.toml").symlink_to(tmp_path / "s.toml")
    one_line(capsys, [str(tmp_path / "s.toml")], f"{tmp_path / 's.toml'}: cannot read it (")
    os.mkfifo(tmp_path / "fifo.toml")  # read_bytes would wait for a writer forever
    one_line(capsys, [str(tmp_path / "fifo.toml")], "fifo.toml: is not a regular file")


def test_a_file_the_system_refuses_is_refused_naming_it(tmp_path, capsys, nothing_runs, monkeypatch):
    path = write(tmp_path, "[rows.a]\n")
    real = Path.read_bytes

    def denied(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", denied)
    one_line(capsys, [str(path)], f"{path}: cannot read it (Permission denied")


# ---- results.csv ------------------------------------------------------------------------------
RESULTS = [
    (b"\x00\x01\xfe\xff garbage", "not UTF-8 text"),
    (b"", "empty (no header line)"),
    (b'cell,seed,config_hash,run\n"a,0,abc,x\n', "cannot read it as CSV"),
    (b"cell,seed,config_hash,run\na,0,abc,x\nb,0,abc,x,extra,fields\n", "cannot read it as CSV"),
    (b"a,b\n1,2\n", "no column cell, seed, config_hash, run (its columns: a, b)"),
    (b"cell,seed,config_hash\na,0,abc\n", "no column run"),
    (b"cell,seed,config_hash,run\na,x,abc,r\n", "line 2: seed 'x', not a results row"),
    (b"cell,seed,config_hash,run\na,0,abc,r\na,1.5,abc,r\n", "line 3: seed '1.5'"),
    (b"cell,seed,config_hash,run\na,-1,abc,r\n", "line 2: seed '-1'"),
    (b"cell,seed,config_hash,run\na,,abc,r\n", "line 2: seed empty"),
    (b"cell,seed,config_hash,run\n,0,abc,r\n", "line 2: a row without a cell name"),
    (None, "is a folder, not a file"),
]


@pytest.mark.parametrize(("data", "named"), RESULTS)
def test_a_corrupt_results_table_is_refused_naming_it(tmp_path, capsys, nothing_runs, data, named):
    path = write(tmp_path, "[rows.a]\n")
    table = tmp_path / "out" / sw.RESULTS
    table.parent.mkdir()
    if data is None:
        table.mkdir()
    else:
        table.write_bytes(data)
    line = one_line(capsys, [str(path), "--out", str(tmp_path / "out")], f"{table}: ", named)
    assert line.endswith("move it aside to rebuild it from the finished run folders")


def test_a_results_table_with_a_header_only_is_a_sweep_not_begun(tmp_path):
    write(tmp_path, GOOD_RESULTS, sw.RESULTS)
    frame = sw.read_results(tmp_path / sw.RESULTS)
    assert frame.empty and list(frame.columns) == ["cell", "row", "seed", "config_hash", "run"]


# ---- the run folders' tables, read as the sweep goes ------------------------------------------
ROUNDS = "round,skip_rate,aug_rate,moved,seconds,copy_5,mq_0.5,digit_fd\n1,0.1,0.2,3,1.5,0.01,0.2,9.5\n"


def finished_folder(config, rounds: str = ROUNDS, settings: str | None = None) -> Path:
    """What a finished run leaves in its out-dir: settings.toml, rounds.csv, report.md."""
    run = Path(config["out-dir"]) / "run-001"
    run.mkdir(parents=True)
    saved = Settings.from_run_config(config).to_run_config()
    text = "".join(f"{k} = {toml_value(v)}\n" for k, v in saved.items())
    (run / "settings.toml").write_text(settings if settings is not None else text)
    (run / "rounds.csv").write_text(rounds)
    (run / "report.md").write_text("# run\n")
    return run


def stand_in(monkeypatch, **folder) -> list:
    """``run_sweep`` with a runner that writes a finished folder (no simulation); returns its calls."""
    calls: list = []

    def runner(config):
        calls.append(config["out-dir"])
        finished_folder(config, **folder)

    monkeypatch.setattr(sw, "run_sweep", functools.partial(sw.run_sweep, runner=runner, progress=False))
    for plot in ("plot_tradeoff", "plot_metrics"):  # a second each; the tables are what is read here
        monkeypatch.setattr(sr, plot, lambda *a: None)
    return calls


def test_a_sweep_through_the_stand_in_records_its_row_and_does_not_rerun(tmp_path, capsys, monkeypatch):
    calls = stand_in(monkeypatch)
    path, out = write(tmp_path, "[rows.a]\n"), str(tmp_path / "out")
    assert cli.main(["sweep", str(path), "--out", out]) == 0 and len(calls) == 1
    assert cli.main(["sweep", str(path), "--out", out]) == 0 and len(calls) == 1
    frame = sw.read_results(tmp_path / "out" / sw.RESULTS)
    assert frame["cell"].tolist() == ["a"] and frame["seed"].tolist() == [0] and frame["copy_5"].tolist() == [0.01]
    assert "| a " in (tmp_path / "out" / sr.SUMMARY).read_text()
    (tmp_path / "out" / sw.RESULTS).unlink()  # lost: the finished folder gives the row back
    assert cli.main(["sweep", str(path), "--out", out]) == 0 and len(calls) == 1
    assert sw.read_results(tmp_path / "out" / sw.RESULTS)["cell"].tolist() == ["a"]
    frame = sw.read_results(tmp_path / "out" / sw.RESULTS)
    frame.assign(config_hash="0123456789abcdef").to_csv(tmp_path / "out" / sw.RESULTS, index=False)
    assert cli.main(["sweep", str(path), "--out", out]) == 0 and len(calls) == 1  # its folder says it is done


ROUND_TABLES = [
    ("round,skip_rate,aug_rate,moved,seconds\n", "rounds.csv: 0 rows, expected at least 1"),
    ("round,skip_rate,aug_rate,moved\n1,0.1,0.2,3\n", "rounds.csv: no column seconds"),
    ("round,skip_rate,aug_rate,moved,seconds\n1,x,0.2,3,1.5\n", "rounds.csv: cannot make the run's row (TypeError"),
    ("round,skip_rate\n\x00\x00\n", "rounds.csv: no column aug_rate, moved, seconds"),
    ('round,skip_rate,aug_rate,moved,seconds\n"1,0.1\n', "rounds.csv: cannot read it as CSV"),
    ("", "rounds.csv: empty (no header line)"),
]


@pytest.mark.parametrize(("rounds", "named"), ROUND_TABLES)
def test_a_finished_run_with_a_bad_rounds_table_is_refused_naming_it(tmp_path, capsys, monkeypatch, rounds, named):
    stand_in(monkeypatch, rounds=rounds)
    path = write(tmp_path, "[rows.a]\n")
    one_line(capsys, [str(path), "--out", str(tmp_path / "out")], str(tmp_path / "out" / "cells" / "a"), named)
    assert not (tmp_path / "out" / sw.RESULTS).exists()


SAVED_SETTINGS = [
    ("lr = \n", "settings.toml: line 1 (lr): invalid TOML"),
    ("bogus-setting = 1\n", "settings.toml: bogus-setting: unknown setting"),
    ("lr = 0.1 # \xe9\n", "settings.toml: not UTF-8"),
]


@pytest.mark.parametrize(("settings", "named"), SAVED_SETTINGS)
def test_a_run_folder_with_bad_settings_is_refused_naming_it(tmp_path, capsys, monkeypatch, settings, named):
    path, out = write(tmp_path, "[rows.a]\n"), tmp_path / "out"
    sweep = sf.load_sweep(path, out=out)
    run = finished_folder(sweep.config(sweep.cells[0], 0))  # finished before, its row lost
    (run / "settings.toml").write_bytes(settings.encode("latin-1"))
    monkeypatch.setattr(sw, "run_sweep", functools.partial(sw.run_sweep, runner=pytest.fail, progress=False))
    one_line(capsys, [str(path), "--out", str(out)], str(run / "settings.toml"), named)


def test_a_stopped_run_with_bad_settings_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    path, out = write(tmp_path, "[rows.a]\n"), tmp_path / "out"
    sweep = sf.load_sweep(path, out=out)
    stopped = Path(sweep.config(sweep.cells[0], 0)["out-dir"]) / "run-001"
    (stopped / "checkpoint").mkdir(parents=True)
    (stopped / "settings.toml").write_text("[broken\n")
    monkeypatch.setattr(sw, "run_sweep", functools.partial(sw.run_sweep, runner=pytest.fail, progress=False))
    one_line(capsys, [str(path), "--out", str(out)], str(stopped / "settings.toml"), "line 1", "invalid TOML")


# ---- the helpers themselves -------------------------------------------------------------------
def test_the_readers_name_the_file_as_told(tmp_path):
    write(tmp_path, b"a = 1\n", "ok.toml")
    assert read_toml(tmp_path / "ok.toml") == {"a": 1} and read_text(tmp_path / "ok.toml") == "a = 1\n"
    with pytest.raises(InputError, match=r"^--thing: x.csv: does not exist$"):
        read_table(tmp_path / "x.csv", what="--thing: x.csv")
    write(tmp_path, "a,b\n1,2\n", "t.csv")
    assert read_table(tmp_path / "t.csv", columns=("a",), min_rows=1)["b"].tolist() == [2]
    wide = ",".join(f"c{i}" for i in range(30))
    write(tmp_path, wide + "\n", "wide.csv")
    with pytest.raises(InputError, match=r"no column a \(its columns: c0, .*c11, \.\.\.\)$"):
        read_table(tmp_path / "wide.csv", columns=("a",))
    assert issubclass(sf.SweepError, InputError)
