"""``iet-agc sweep``: cells from a sweep file, refused files, mean ± sd over seeds, resumable runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_RUN

from fl_app.simulation import run_in_process
from iet_agc import sweep as sw
from iet_agc import sweep_file as sf
from iet_agc import sweep_report as sr
from iet_agc.cli import main


def _write(tmp_path, text: str, name: str = "s.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_cells_rows_times_grid_then_one_at_a_time_without_duplicates():
    cells = sf.expand_cells({"a": {"agc": False}, "b": {}}, {"num-shards": [2, 4]}, {})
    assert [c.name for c in cells] == ["a num-shards=2", "a num-shards=4", "b num-shards=2", "b num-shards=4"]
    assert cells[1].changes == {"agc": False, "num-shards": 4} and cells[1].params == {"num-shards": 4}
    assert [c.row for c in cells] == ["a", "a", "b", "b"]
    vary = sf.expand_cells({}, {}, {"lr": [0.1, 0.2], "seedless": [1]})
    assert [(c.name, c.changes) for c in vary] == [
        ("base", {}),
        ("lr=0.1", {"lr": 0.1}),
        ("lr=0.2", {"lr": 0.2}),
        ("seedless=1", {"seedless": 1}),
    ]
    grid = sf.expand_cells({}, {"agc": [True, False], "taa": [False]}, {})
    assert [c.name for c in grid] == ["agc=true,taa=false", "agc=false,taa=false"]
    # one-at-a-time values equal to the base collapse onto the base cell (the sweep compares settings)
    same = sf.expand_cells({}, {}, {"skip-threshold": [0.4, 0.5]}, lambda ch: ch.get("skip-threshold", 0.5))
    assert [c.name for c in same] == ["base", "skip-threshold=0.4"]


def test_shipped_sweeps_load_with_the_papers_rows():
    table3 = sf.load_sweep("configs/sweeps/table3.toml")
    assert [c.name for c in table3.cells] == [
        "default-ddpm",
        "agc",
        "agc+iet",
        "agc+iet+taa",
        "iet-agc+",
        "iet-agc+ random-msr",
    ]
    assert table3.seeds == [0, 1, 2] and table3.quality == "digit_fd"
    ddpm = table3.config(table3.cells[0], 1)
    assert ddpm["num-shards"] == 1 and ddpm["agc"] is False and ddpm["taa"] is False and ddpm["msr"] == "none"
    assert ddpm["seed"] == 1 and ddpm["out-dir"].endswith("cells/default-ddpm/seed1")
    sens = sf.load_sweep("configs/sweeps/sensitivity.toml")
    assert len(sens.cells) == 7 and sens.swept == ["skip-threshold", "msr-proportion", "num-shards"]


def test_summary_mean_and_sd_are_exact():
    frame = pd.DataFrame(
        {
            "cell": ["b", "a", "b", "b", "a", "c"],
            "seed": [0, 0, 1, 2, 1, 0],
            "copy_5": [1.0, 4.0, 2.0, 3.0, 8.0, 0.5],
            "digit_fd": [10.0, 1.0, 10.0, 13.0, 3.0, math.nan],
        }
    )
    s = sr.summarize(frame, ["copy_5", "digit_fd", "absent"], order=["a", "b", "c"])
    assert list(s.index) == ["a", "b", "c"] and s["n"].tolist() == [2, 3, 1]
    assert s["copy_5_mean"].tolist() == [6.0, 2.0, 0.5]
    assert s["copy_5_sd"].tolist()[:2] == pytest.approx([math.sqrt(8.0), 1.0])  # ddof 1
    assert math.isnan(s.loc["c", "copy_5_sd"]) and "absent_mean" not in s
    assert s["digit_fd_mean"].tolist()[:2] == [2.0, 11.0] and s.loc["b", "digit_fd_sd"] == pytest.approx(math.sqrt(3))
    table = sr.markdown_table(s, ["copy_5", "digit_fd"])
    assert "| a      |       2 | 6 ± 2.8  | 2 ± 1.4    |" in table
    assert "| c      |       1 | 0.5      | n/a        |" in table


def test_tradeoff_plot_names_every_cell_in_its_legend_with_distinct_markers():
    frame = pd.DataFrame(
        {
            "cell": ["lora", "difffit", "lora", "difffit", "full"],
            "seed": [0, 0, 1, 1, 0],
            "copy_5": [0.010, 0.011, 0.012, 0.010, 0.13],
            "digit_fd": [3.1, 2.7, 3.0, 2.6, 7.2],
            "digit_fd_floor": [2.9, 2.9, 3.0, 3.0, 2.9],
        }
    )
    s = sr.summarize(frame, ["copy_5", "digit_fd", "digit_fd_floor"], order=["full", "lora", "difffit"])
    fig = sr.tradeoff_figure(s, "digit_fd")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["digit_fd floor (real)", "full", "lora", "difffit"]
    assert not ax.texts  # no names printed beside the points
    markers = [c.lines[0].get_marker() for c in ax.containers]
    assert len(set(markers)) == 3
    assert ax.containers[1].lines[0].get_xydata().tolist() == [[pytest.approx(3.05), pytest.approx(0.011)]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seeds = [0]\nbogus = 1\n", "s.toml: bogus: unknown key"),
        ("[rows.plain]\nagc = false\nbogus-key = 1\n", "s.toml: rows.plain: bogus-key: unknown setting"),
        ("[grid]\nskip-threshold = [0.5, -1.0]\n", "s.toml: grid.skip-threshold: skip-threshold: must be"),
        ("[vary]\nnum-shards = []\n", "s.toml: vary.num-shards: must be a non-empty list"),
        ("[set]\nseed = 3\n", "s.toml: set: seed: set by the sweep itself"),
        ("seeds = [0, 0]\n", "s.toml: seeds: must not repeat"),
        ("seeds = [-1]\n", "s.toml: seeds: must be a non-empty list of integers >= 0"),
        ('base = "nope.toml"\n', "s.toml: base: preset .*nope.toml: does not exist"),
        ('quality = "inception"\n', "s.toml: quality: must be one of fid, digit_fd"),
        ("[grid]\nlr = [0.1]\n[vary]\nlr = [0.2]\n", "s.toml: lr: in both"),
        ("[set\n", "s.toml: line 1 .*: invalid TOML"),
        ('[set]\nholdout-size = 900\n[pretrain]\ndata-split = "spare"\n', "s.toml: set: data-seed: must be fixed"),
        ("[set]\ndata-seed = 1\nholdout-size = 900\n[pretrain]\n", 's.toml: pretrain: data-split: must be "spare"'),
        (
            '[set]\ndata-seed = 1\nholdout-size = 900\n[pretrain]\ndata-split = "spare"\n[rows.a]\ntrain-size = 300\n',
            "s.toml: cell 'a': train-size: must equal the base run's",
        ),
        ('[pretrain]\ndata-split = "spare"\n', "s.toml: pretrain: data-split: 'spare' trains on the digits neither"),
        ('[pretrain]\nout-dir = "x"\n', "s.toml: pretrain: out-dir: set by the sweep itself"),
        ('[pretrain]\n[rows.a]\ninit-from = "x"\n', "s.toml: rows.a: init-from: set by the sweep itself"),
        ("[pretrain]\nbogus = 1\n", "s.toml: pretrain: bogus: unknown setting"),
    ],
)
def test_bad_sweep_files_name_the_file_and_the_key(tmp_path, text, message):
    with pytest.raises(sf.SweepError, match=message.replace("[", r"\[")):
        sf.load_sweep(_write(tmp_path, text), out=tmp_path / "out")


def test_cli_refuses_a_bad_file_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sw, "run_sweep", lambda *a, **k: pytest.fail("ran despite a bad sweep file"))
    bad = _write(tmp_path, "[rows.ok]\n[rows.bad]\nnum-shard = 2\n")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"iet-agc sweep: error: {bad}: rows.bad: num-shard: unknown setting" in err
    assert not (tmp_path / "out").exists()
    assert main(["sweep", str(_write(tmp_path, "[rows.ok]\n", "ok.toml")), "--cells", "nope"]) == 2
    assert "--cells: no cell 'nope'" in capsys.readouterr().err
    assert main(["sweep", str(bad.with_name("ok.toml")), "--set", "train-size=0"]) == 2
    assert "iet-agc sweep: error: train-size: must be" in capsys.readouterr().err


def test_config_hash_follows_the_settings_not_the_spelling():
    assert sf.config_hash({"lr": 0.001}) == sf.config_hash({}) == sf.config_hash({"out-dir": "elsewhere"})
    assert sf.config_hash({"skip-threshold": 0.4}) != sf.config_hash({})


def test_sweep_runs_tiny_cells_resumes_and_writes_tables_and_plots(tmp_path):
    tiny = "\n".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_RUN.items())
    path = _write(tmp_path, f"seeds = [0]\n[set]\n{tiny}\n[vary]\nnum-shards = [2, 4]\n")
    sweep = sf.load_sweep(path, out=tmp_path / "out")
    assert [c.name for c in sweep.cells] == ["base", "num-shards=2"]  # K = 4 is TINY_RUN's own
    calls = []

    def interrupted(config):
        if calls:
            raise KeyboardInterrupt  # Ctrl-C as the second run starts
        calls.append(config["num-shards"])
        run_in_process(config)

    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(sweep, interrupted, progress=False)
    first = pd.read_csv(tmp_path / "out" / sw.RESULTS)
    assert first["cell"].tolist() == ["base"] and calls == [4]

    def counting(config):
        calls.append(config["num-shards"])
        run_in_process(config)

    results = sw.run_sweep(sweep, counting, progress=False)
    assert calls == [4, 2]  # the finished cell was not run again
    assert results["cell"].tolist() == ["base", "num-shards=2"] and results["seed"].tolist() == [0, 0]
    for col in ("copy_5", "mq_0.5", "digit_fd", "digit_fd_lo", "digit_fd_hi", "digit_fd_floor", "skip_rate"):
        assert results[col].notna().all(), col
    assert (results["digit_fd_lo"] <= results["digit_fd"]).all() and (
        results["digit_fd"] <= results["digit_fd_hi"]
    ).all()
    summary = (tmp_path / "out" / sr.SUMMARY).read_text()
    assert "| num-shards=2 |" in summary and "digit_fd_width" in summary and "digit_fd_floor" in summary
    for name in (sr.TRADEOFF, sr.METRICS_PLOT):
        assert (tmp_path / "out" / name).stat().st_size > 5000

    # a run that finished but whose row was lost (killed in between) is recorded, not rerun
    first.to_csv(tmp_path / "out" / sw.RESULTS, index=False)
    again = sw.run_sweep(sweep, lambda config: pytest.fail("reran a finished run"), progress=False)
    assert again["cell"].tolist() == ["base", "num-shards=2"]
    assert again.loc[1, "digit_fd"] == pytest.approx(results.loc[1, "digit_fd"])

    # a setting added after these runs (absent from their settings.toml and the row's old hash) at
    # its default changes nothing: the runs stay done; a changed value makes its cell run again
    for run in again["run"]:
        saved = Path(run) / "settings.toml"
        saved.write_text("".join(line for line in saved.open() if not line.startswith("aggregation =")))
    again.assign(config_hash="0123456789abcdef").to_csv(tmp_path / "out" / sw.RESULTS, index=False)
    kept = sw.run_sweep(sweep, lambda config: pytest.fail("reran a finished run"), progress=False)
    assert (kept["config_hash"] != "0123456789abcdef").all()
    saved = Path(kept.loc[1, "run"]) / "settings.toml"
    saved.write_text(saved.read_text().replace("lr = 0.001", "lr = 0.002"))
    kept.assign(config_hash="0123456789abcdef").to_csv(tmp_path / "out" / sw.RESULTS, index=False)
    rerun = []

    class Stop(Exception):
        pass

    def record(config):
        rerun.append(config["num-shards"])
        raise Stop

    with pytest.raises(Stop):
        sw.run_sweep(sweep, record, progress=False)
    assert rerun == [2]


def test_base_preset_file_is_read_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "presets").mkdir()
    (tmp_path / "presets" / "small.toml").write_text('train-size = 100\nseed = 7\nout-dir = "x"\nlr = 0.002\n')
    path = _write(tmp_path, 'base = "presets/small.toml"\nseeds = [3]\n[rows.a]\nlr = 0.003\n[rows.b]\n')
    sweep = sf.load_sweep(path, out=tmp_path / "out")
    a, b = (sweep.config(c, 3) for c in sweep.cells)
    assert a["train-size"] == b["train-size"] == 100 and (a["lr"], b["lr"]) == (0.003, 0.002)
    assert a["seed"] == 3 and a["out-dir"] == str(tmp_path / "out" / "cells" / "a" / "seed3")  # the sweep's own
    (tmp_path / "presets" / "small.toml").write_text("train-size = 100\nbogus = 1\n")
    with pytest.raises(sf.SweepError, match=r"s.toml: base \(.*small.toml\): bogus: unknown setting"):
        sf.load_sweep(path, out=tmp_path / "out")


def test_a_run_that_finishes_nothing_stops_the_sweep(tmp_path):
    sweep = sf.load_sweep(_write(tmp_path, "[rows.a]\n"), out=tmp_path / "out")
    with pytest.raises(RuntimeError, match="cell 'a', seed 0: the run left no finished run folder"):
        sw.run_sweep(sweep, lambda config: None, progress=False)
    assert not (tmp_path / "out" / sw.RESULTS).exists()


def test_shipped_finetune_sweep_shares_one_split_and_fine_tunes_one_base(tmp_path):
    sweep = sf.load_sweep("configs/sweeps/finetune.toml", out=tmp_path / "out")
    assert [c.name for c in sweep.cells] == [
        "full ddpm",
        "full iet-agc+",
        "lora ddpm",
        "lora iet-agc+",
        "difffit ddpm",
        "difffit iet-agc+",
    ]
    assert sweep.seeds == [0, 1, 2] and sweep.init_from == ""  # no base run yet
    base = sweep.base_config()
    assert base["data-split"] == "spare" and base["out-dir"] == str(tmp_path / "out" / "base")
    configs = [sweep.config(c, s) for c in sweep.cells for s in sweep.seeds]
    assert {c["init-from"] for c in configs} == {sf.pending_base(tmp_path / "out")}
    for key in ("data-seed", "train-size", "holdout-size"):
        assert {c[key] for c in configs} == {base[key]}, key
    assert {c["adapter"] for c in configs} == {"none", "lora", "difffit"}
    short = sf.load_sweep("configs/sweeps/finetune.toml", out=tmp_path / "out", extra={"num-rounds": 2})
    assert short.base_config()["num-rounds"] == 2  # --set reaches the base run too


def test_sweep_pretrains_the_base_once_and_fine_tunes_it_in_every_cell(tmp_path):
    from ddpm.adapters import trainable_state
    from fl_app.checkpoint import load_checkpoint
    from fl_app.model import initial_model
    from fl_app.settings import Settings
    from strategies.replies import record_bytes

    tiny = "\n".join(f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in TINY_RUN.items())
    text = (
        f"seeds = [0]\n[set]\n{tiny}\nholdout-size = 1500\ndata-seed = 3\n"
        '[pretrain]\ndata-split = "spare"\nnum-rounds = 1\nlocal-epochs = 1\n'
        '[rows.full]\nadapter = "none"\n[rows.lora]\nadapter = "lora"\nlora-rank = 2\n'
    )
    path = _write(tmp_path, text)
    calls = []

    def counting(config):
        calls.append(dict(config))
        run_in_process(config)

    results = sw.run_sweep(sf.load_sweep(path, out=tmp_path / "out"), counting, progress=False)
    base, *cells = calls
    assert base["out-dir"] == str(tmp_path / "out" / "base") and base["data-split"] == "spare"
    (base_run,) = (tmp_path / "out" / "base").iterdir()
    assert (base_run / "pipeline" / "unet").is_dir()
    assert [c["init-from"] for c in cells] == [str(base_run / "pipeline")] * 2
    assert load_checkpoint(base_run).fingerprint.startswith("177-")  # the spare digits: 1797 - 120 - 1500
    assert load_checkpoint(Path(results.set_index("cell").loc["full", "run"])).fingerprint.startswith("120-")
    # bytes: what travels, per message and per round (K = 4 out and back); LoRA's a small part of full
    full, lora = results.set_index("cell").loc[["full", "lora"], ["reply_bytes", "round_bytes"]].to_numpy()
    assert (full[1], lora[1]) == (8 * full[0], 8 * lora[0]) and lora[0] * 50 < full[0]
    lora_settings = Settings.from_run_config({**cells[1], "out-dir": str(tmp_path)})
    assert lora[0] == record_bytes(trainable_state(initial_model(lora_settings, 1)))
    summary = (tmp_path / "out" / sr.SUMMARY).read_text()
    assert "round_MB" in summary and f"fine-tunes the base run `{base_run}`" in summary
    # the base itself is the reference row: evaluated as a cell is, on the cells' training digits
    ref = results.set_index("cell").loc[sf.REFERENCE]
    assert ref["run"] == str(tmp_path / "out" / "reference" / "seed0")
    assert 0 <= ref["copy_5"] <= 1 and ref["digit_fd"] > 0 and math.isnan(ref["reply_bytes"])
    saved = json.loads((Path(ref["run"]) / "metrics.json").read_text())
    assert saved["copy_5"] == ref["copy_5"] and saved["digit_fd"] == pytest.approx(ref["digit_fd"])
    assert summary.index(f"| {sf.REFERENCE}") < summary.index("| full ")
    done = sw.run_base(sf.load_sweep(path, out=tmp_path / "out"), lambda c: pytest.fail("base ran again"), False)
    reference_config = done.reference_config(0)
    assert Settings.from_run_config(reference_config).data_split == "train" and reference_config["adapter"] == "none"
    assert reference_config["init-from"] == str(base_run / "pipeline")
    # evaluate_base is exactly a cell's final evaluation, so a cell evaluated by it gives its row
    cell_run = Path(results.set_index("cell").loc["full", "run"])
    same = sw.evaluate_base({**cells[0], "init-from": str(cell_run / "pipeline"), "out-dir": str(tmp_path / "re")})
    for key in ("copy_1", "copy_5", "mq_0.5"):
        assert same[key] == results.set_index("cell").loc["full", key], key

    # the same command again: neither the base nor a cell runs again
    again = sf.load_sweep(path, out=tmp_path / "out")
    assert again.init_from == str(base_run / "pipeline")
    sw.run_sweep(
        again,
        lambda config: pytest.fail(f"ran {config['out-dir']} again"),
        progress=False,
        reference=lambda config: pytest.fail("evaluated the base again"),
    )
    # another base (its settings changed): the cells' init-from waits for it, so they run again too
    path.write_text(text.replace("local-epochs = 1\n", "local-epochs = 2\n"))
    changed = sf.load_sweep(path, out=tmp_path / "out")
    assert changed.init_from == "" and changed.config(changed.cells[0], 0)["init-from"] != str(base_run / "pipeline")
