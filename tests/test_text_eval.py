"""The text-conditional family's evaluation end to end (issue 20, item 6): Sim Score, its
background and share above 0.5, CLIP score and the authors' FID from the settings, with stand-in
networks saved in the real formats (a random TorchScript SSCD of 1024-d features, a tiny
``CLIPModel`` folder); Sim Score against a brute-force numpy reference on planted near-copies,
unavailable networks as empty columns with their reasons, ``iet-agc evaluate`` on a saved
StableDiffusionPipeline, and the settings' refusals. The columns in ``rounds.csv`` of a real text
run: tests/test_text_federated.py (its run carries the stand-ins, so no second federation runs)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from test_text_federated import _config, clip_folder, folders, sd_base, sscd_file  # noqa: F401 - fixtures

from ddpm.data import load_dataset
from evaluation.clip_score import clip_score, load_clip
from evaluation.columns import CLIP_SCORE, FID_AUTHORS, SIM_BACKGROUND, SIM_SCORE, SIM_SHARE
from evaluation.crops import dcr_crops
from evaluation.evaluator import MemorizationEvaluator
from evaluation.text_metrics import text_scorers
from fl_app.config import eval_config, settings_from_message, settings_from_run_config
from fl_app.model import model_family
from fl_app.settings import Settings
from iet_agc.cli import main

TEXT_COLUMNS = (SIM_SCORE, SIM_BACKGROUND, SIM_SHARE, CLIP_SCORE)


def _settings(sd_base, folders, tmp_path, **more) -> Settings:  # noqa: F811
    cfg = _config(sd_base, folders, tmp_path, **{"fid-cache-dir": str(tmp_path / "cache"), **more})
    return settings_from_run_config({}, cfg)


def _planted(data, sources=(2, 7, 11), extra=3):
    """Near-copies of the training images ``sources`` (noise sd 0.02) and ``extra`` fresh noise images."""
    g = torch.Generator().manual_seed(5)
    train = data.images[list(sources)].float() / 255 if data.images.dtype == torch.uint8 else data.images[list(sources)]
    copies = (train + 0.02 * torch.randn(train.shape, generator=g)).clamp(0, 1)
    return torch.cat([copies, torch.rand(extra, *train.shape[1:], generator=g)])


def _numpy_reference(net_file: str, generated: torch.Tensor, train: torch.Tensor) -> dict[str, float]:
    """Brute force: every feature by the TorchScript file, every cosine in one numpy product."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        net = torch.jit.load(net_file)
    with torch.no_grad():
        g, t = (net(dcr_crops(x)).double().numpy() for x in (generated, train))
    g, t = (f / np.linalg.norm(f, axis=1, keepdims=True) for f in (g, t))
    best = (g @ t.T).max(axis=1)
    tt = t @ t.T
    np.fill_diagonal(tt, -np.inf)
    return {
        SIM_SCORE: float(np.percentile(best, 95)),
        SIM_BACKGROUND: float(np.percentile(tt.max(axis=1), 95)),
        SIM_SHARE: float(np.mean(best > 0.5)),
        "nearest": (g @ t.T).argmax(axis=1),
    }


def test_sim_score_of_the_evaluator_equals_a_brute_force_reference(sd_base, folders, tmp_path, sscd_file, clip_folder):  # noqa: F811
    settings = _settings(sd_base, folders, tmp_path, **{"sscd-weights": sscd_file, "clip-model": clip_folder})
    data = load_dataset(**settings.dataset_kwargs())
    config = eval_config(settings)
    ev = MemorizationEvaluator(
        config, data, tmp_path / "eval", torch.device("cpu"), model_family(settings, data), text_scorers(config, "cpu")
    )
    generated = _planted(data)
    prompts = [data.captions[i][0] for i in (2, 7, 11)] + ["a red square", "x", "two dogs"]
    result = ev.evaluate_images(generated, "final", prompts=prompts)
    ref = _numpy_reference(sscd_file, generated, data.images)
    for key in (SIM_SCORE, SIM_BACKGROUND, SIM_SHARE):
        assert result.metrics[key] == pytest.approx(ref[key], abs=1e-5), key
    assert ref["nearest"][:3].tolist() == [2, 7, 11]  # the planted copies are found ...
    assert ev.scorers[0].pairs()[0].tolist() == ref["nearest"].tolist()  # ... and drawn beside their sources
    assert result.metrics[SIM_SHARE] >= 0.5 and result.metrics[SIM_SCORE] > 0.9
    expected_clip = clip_score(generated, prompts, load_clip(clip_folder))
    assert result.metrics[CLIP_SCORE] == pytest.approx(expected_clip, abs=1e-4)
    assert result.metrics[FID_AUTHORS] is None  # fid = false: the authors' FID is empty, not zero
    report = result.report.read_text()
    assert "## Text-to-image metrics" in report and f"Sim Score (`{SIM_SCORE}`): {ref[SIM_SCORE]:.4f}" in report
    assert "sha256 " in report and "CLIP score (`clip_score`)" in report
    assert "fid_authors: unavailable (disabled by setting fid = false)" in report and "NOT comparable" in report
    assert (tmp_path / "eval" / "pairs_final.png").stat().st_size > 1000
    assert list((tmp_path / "cache" / "sscd").glob(f"imagefolder-{data.fingerprint}-sscd-*.npy"))  # cached


def test_the_authors_fid_joins_beside_fid_for_the_text_family(sd_base, folders, tmp_path, monkeypatch):  # noqa: F811
    """With FID weights (here a mean-colour stand-in for Inception) the text family gets both
    ``fid`` and ``fid_authors`` with their intervals, the two different numbers."""
    import evaluation.fid as fidmod

    class MeanColour(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean(dim=(2, 3)), x.pow(2).mean(dim=(2, 3))], dim=1)

    monkeypatch.setattr(fidmod, "inception", lambda *a, **k: MeanColour())
    settings = _settings(sd_base, folders, tmp_path, fid=True, **{"clip-model": ""})
    data = load_dataset(**settings.dataset_kwargs())
    config = eval_config(settings)
    ev = MemorizationEvaluator(
        config, data, tmp_path / "e", "cpu", model_family(settings, data), text_scorers(config, "cpu")
    )
    result = ev.evaluate_images(_planted(data, extra=5), "final", prompts=["p"] * 8)
    m = result.metrics
    assert m["fid"] is not None and m[FID_AUTHORS] is not None and m[FID_AUTHORS] != pytest.approx(m["fid"])
    assert {f"{FID_AUTHORS}_lo", f"{FID_AUTHORS}_hi", f"{FID_AUTHORS}_floor"} <= set(m)
    assert "- fid_authors: " in result.report.read_text()


def test_unavailable_networks_leave_empty_columns_and_say_why(sd_base, folders, tmp_path):  # noqa: F811
    missing = str(tmp_path / "no-clip-here")
    settings = _settings(sd_base, folders, tmp_path)  # sscd-weights "" by default
    data = load_dataset(**settings.dataset_kwargs())
    config = eval_config(settings.replace(clip_model=missing))
    ev = MemorizationEvaluator(
        config, data, tmp_path / "eval", "cpu", model_family(settings, data), text_scorers(config, "cpu")
    )
    result = ev.evaluate_images(_planted(data), "round001", prompts=["a"] * 6)
    assert all(result.metrics[k] is None for k in TEXT_COLUMNS)
    report = result.report.read_text()
    assert "Sim Score: unavailable (sscd-weights is empty: Sim Score needs a local copy of sscd_disc_large" in report
    assert "CC-BY-NC" in report and f"CLIP score: unavailable (CLIP model {missing}: no such folder" in report
    assert (tmp_path / "eval" / "pairs_round001.png").is_file()  # by pixels, SSCD being unavailable


def _evaluate(sd_base, folders, tmp_path, capsys, *more: str) -> tuple[int, dict | str]:  # noqa: F811
    keys = (
        f"dataset=imagefolder train-size=0 data-root={folders['train']} holdout-root={folders['held']} sample-steps=2 "
        f"mq-neighbours=4 fid=false device=cpu eval-batch-size=4 fid-cache-dir={tmp_path / 'cache'}"
    )
    args = ["evaluate", sd_base, "--num-images", "4", "--out", str(tmp_path / "out"), "--set", keys]
    code = main([*args, *(x for m in more for x in ("--set", m))])
    captured = capsys.readouterr()
    return code, json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else captured.err


def test_iet_agc_evaluate_takes_a_stable_diffusion_pipeline(sd_base, folders, tmp_path, capsys, sscd_file, clip_folder):  # noqa: F811
    code, got = _evaluate(sd_base, folders, tmp_path, capsys, f"sscd-weights={sscd_file} clip-model={clip_folder}")
    assert code == 0, got
    assert got["n_generated"] == 4 and got["mq_0.5"] is not None and got["unavailable"] == {}
    assert all(isinstance(got[k], float) for k in TEXT_COLUMNS) and got[FID_AUTHORS] is None
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == got
    report = (tmp_path / "out" / "eval_final.md").read_text()
    assert "Text-conditional: each image's prompt drawn with replacement from the first captions of the 16" in report
    assert (tmp_path / "out" / "pairs_final.png").is_file()
    code, got = _evaluate(sd_base, folders, tmp_path, capsys, "clip-model=''")  # no SSCD file, CLIP off
    assert code == 0, got
    assert got[SIM_SCORE] is None and got[CLIP_SCORE] is None
    assert got["unavailable"]["Sim Score"].startswith("sscd-weights is empty")
    assert got["unavailable"]["CLIP score"] == "clip-model is empty: CLIP score is off"
    code, err = _evaluate(sd_base, folders, tmp_path, capsys, f"sscd-weights={tmp_path / 'none.pt'}")
    assert code == 2 and "sscd-weights: must be an existing file" in err


def test_the_metric_settings_are_checked_and_server_only(sd_base, folders, tmp_path, sscd_file):  # noqa: F811
    pixel = {"fid": False, "out-dir": str(tmp_path / "runs")}
    with pytest.raises(ValueError, match=r"^sscd-weights: .*text-conditional.*init-from is empty"):
        settings_from_run_config(pixel, {"sscd-weights": sscd_file})
    assert settings_from_run_config(pixel).clip_model == "openai/clip-vit-base-patch16"  # unused there, not refused
    with pytest.raises(ValueError, match=r"^sscd-weights: must be an existing file .*CC-BY-NC.*no such file"):
        _settings(sd_base, folders, tmp_path, **{"sscd-weights": str(tmp_path / "missing.pt")})
    with pytest.raises(ValueError, match=r"^clip-model: must be a CLIP model folder .*no such folder"):
        _settings(sd_base, folders, tmp_path, **{"clip-model": str(tmp_path / "no" / "clip" / "here")})
    ok = _settings(sd_base, folders, tmp_path, **{"sscd-weights": sscd_file})
    node = settings_from_message({**ok.to_run_config(), "shard": 0})
    assert node.sscd_weights == "" and node.clip_model == ""  # a node never evaluates
