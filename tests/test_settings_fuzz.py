"""Property test: for every run-config key, bad values are refused before submission, naming the key.

The check is the one ``iet-agc run`` makes before it submits (and the ServerApp before round 1):
``fl_app.config.settings_from_run_config`` over the pyproject defaults. The allowed ranges are
written out here again, independently of ``fl_app.settings``, so a range lost there fails here.
Valid values drawn from the same table must pass, so a check that refuses everything fails too.
``pytest --hypothesis-show-statistics`` shows how many values were tried per key.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_app.config import settings_from_run_config
from fl_app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
with open(ROOT / "pyproject.toml", "rb") as _fh:
    DEFAULTS = tomllib.load(_fh)["tool"]["flwr"]["app"]["config"]

# The specification (README's settings table), under the pyproject defaults: digits, train-size 400.
INTS = {  # key: (lowest, highest) allowed
    "image-size": (4, 1024),  # and a power of two
    "train-size": (2, 1796),  # digits: 1797 images, at least one held out
    "holdout-size": (0, 1397),  # digits: at most the 1797 - train-size left (0 = all of them)
    "data-seed": (-1, 2**31 - 1),  # -1: the run's seed
    "num-shards": (1, 400),  # <= train-size
    "num-rounds": (1, 10_000),
    "local-epochs": (1, 10_000),
    "batch-size": (1, 65_536),
    "warmup-epochs": (0, 10_000),
    "local-steps": (0, 100_000_000),  # 0: local-epochs decides
    "warmup-steps": (-1, 100_000_000),  # -1: warmup-epochs decides
    "min-nodes": (1, 1_000),
    "max-failed-rounds": (1, 10_000),
    "node-max-failures": (1, 10_000),
    "messages-per-node": (1, 1_000),
    "shards-per-message": (0, 1_000),
    "seed": (0, 2**31 - 1),
    "randaugment-magnitude": (0, 30),
    "randaugment-ops": (1, 14),
    "eval-every": (0, 10_000),
    "eval-num-images": (1, 1_000_000),
    "eval-batch-size": (0, 65_536),  # 0 (or "auto"): what fills the device
    "sample-steps": (1, 1_000),
    "mq-neighbours": (1, 400),  # <= train-size
    "lora-rank": (1, 1024),
    "dp-max-physical-batch": (0, 65_536),
}
GOOD_INTS = {"train-size": (50, 1796)}  # and >= num-shards (4) and mq-neighbours (50)
FLOATS = {  # key: (low, low included, high or None, high included, +inf allowed)
    "lr": (0.0, False, 1.0, True, False),
    "grad-clip": (0.0, False, None, False, False),
    "round-timeout": (0.0, False, 604_800.0, True, False),
    "skip-threshold": (0.0, False, 10.0, True, False),
    "bank-eta": (0.0, False, 1.0, False, False),
    "aug-range": (1.0, False, None, False, True),
    "max-update-ratio": (1.0, False, None, False, True),
    "aug-sharpness": (0.0, False, None, False, False),
    "input-noise-variance": (0.0, True, 10.0, True, False),
    "dp-noise-multiplier": (0.0, True, 1000.0, True, False),
    "dp-target-epsilon": (0.0, True, 1e6, True, False),
    "dp-delta": (0.0, False, 1.0, False, False),
    "dp-max-grad-norm": (0.0, False, 1e6, True, False),
    "ambient-p": (0.0, True, 1.0, False, False),
    "ambient-delta": (0.0, True, 1.0, False, False),
    "ambient-max-snr": (0.0, False, None, False, True),
    "msr-proportion": (0.0, True, 1.0, False, False),
    "lora-alpha": (0.0, False, None, False, False),
    "fedprox-mu": (0.0, False, None, False, False),
    "fedavgm-lr": (0.0, False, None, False, False),
    "fedavgm-momentum": (0.0, True, 1.0, False, False),
    "fedadam-eta": (0.0, False, None, False, False),
    "fedadam-tau": (0.0, False, None, False, False),
    "fedtrimmedavg-beta": (0.0, True, 0.5, False, False),
    "guidance-scale": (1.0, True, None, False, False),
    "weight-decay": (0.0, True, 1.0, True, False),
}
BOOLS = (
    "download",
    "hflip",
    "class-conditional",
    "agc",
    "taa",
    "fid",
    "lora-freeze-a",
    "save-adapter",
    "input-noise-fixed",
    "dp-sgd",
    "ambient",
    "compile",
)
CHOICES = {
    "dataset": ("digits", "cifar10", "cifar100", "imagefolder"),
    "model": ("tiny", "cifar", "afhq64"),
    "msr": ("memory", "random", "none"),
    "skip-counts": ("reset", "cumulative"),
    "aggregation": ("fedavg", "fedprox", "fedavgm", "fedadam", "fedtrimmedavg", "fedmedian"),
    "adapter": ("none", "lora", "difffit"),
    "data-split": ("train", "spare"),
    "lora-targets": ("attention", "attention+conv"),
    "dp-accountant": ("prv", "rdp", "gdp"),
    "tracker": ("none", "tensorboard", "mlflow", "wandb"),
    "class-embedding": ("added", "per-block"),
    "model-init": ("diffusers", "authors"),
    "taa-interpolation": ("bilinear", "nearest"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "channels-last": ("auto", "true", "false"),
    "optimizer": ("adam", "adamw"),
}
PATHS = (
    "data-root",
    "holdout-root",
    "captions",
    "fid-weights",
    "fid-cache-dir",
    "out-dir",
    "resume",
    "init-from",
    "tracker-dir",
    "sscd-weights",
    "clip-model",
)
NAMES = ("tracker-project", "tracker-run-name", "tracker-group")  # empty allowed but for tracker-project
OTHER = ("device", "mq-thresholds", "tracker-uri", "tracker-tags", *NAMES)


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    """A regular file (paths under it can never be made, even by root) and an existing folder."""
    base = tmp_path_factory.mktemp("fuzz")
    (base / "file").write_text("x")
    from diffusers import DDPMPipeline

    from ddpm.schedule import train_scheduler
    from ddpm.unet import build_unet

    pipeline = base / "pipeline"  # a base that fits the defaults (8x8, one channel)
    DDPMPipeline(unet=build_unet("tiny", 8, 1), scheduler=train_scheduler()).save_pretrained(pipeline)
    return {"file": str(base / "file"), "dir": str(base), "missing": str(base / "missing"), "base": str(pipeline)}


def test_the_table_covers_every_key():
    spec = set(INTS) | set(FLOATS) | set(BOOLS) | set(CHOICES) | set(PATHS) | set(OTHER)
    assert spec == set(Settings.keys()) == set(DEFAULTS)


# ---- bad values --------------------------------------------------------------------------------
NOT_A_NUMBER = st.none() | st.lists(st.integers(), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers())
FLOATS_ANY = st.floats(allow_nan=True, allow_infinity=True)


def _bad_int(key: str) -> st.SearchStrategy:
    lo, hi = INTS[key]
    fractions = st.floats(allow_nan=True, allow_infinity=True).filter(lambda x: not float(x).is_integer())
    out_of_range = st.integers(max_value=lo - 1) | st.integers(min_value=hi + 1) | st.just(10**400)
    integral_floats = st.integers(min_value=hi + 1, max_value=10**15).map(float) | st.just(float(lo - 1))
    words = st.text(max_size=8).filter(lambda w: key != "eval-batch-size" or w.strip().lower() != "auto")
    bad = st.booleans() | fractions | out_of_range | integral_floats | words | NOT_A_NUMBER
    if key == "image-size":
        bad = bad | st.integers(lo, hi).filter(lambda n: n & (n - 1))
    return bad


def _float_ok(key: str, x: float) -> bool:
    lo, lo_in, hi, hi_in, inf_ok = FLOATS[key]
    if math.isnan(x) or x == -math.inf:
        return False
    if x == math.inf:
        return inf_ok
    return (x >= lo if lo_in else x > lo) and (hi is None or (x <= hi if hi_in else x < hi))


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bad_float(key: str) -> st.SearchStrategy:
    numbers = (FLOATS_ANY | st.integers(-(10**6), 10**6)).filter(lambda x: not _float_ok(key, float(x)))
    text = st.text(max_size=8).filter(lambda s: not _parses_as_float(s))
    specials = st.sampled_from([math.nan, -math.inf, "nan", "-inf", "NaN", 10**400, -(10**400)])
    if not FLOATS[key][4]:
        specials = specials | st.sampled_from([math.inf, "inf", "Infinity"])
    return numbers | numbers.map(repr) | text | specials | st.booleans() | NOT_A_NUMBER


def _bad_bool(key: str) -> st.SearchStrategy:
    text = st.text(max_size=8).filter(lambda s: s.strip().lower() not in ("true", "false"))
    return st.integers() | FLOATS_ANY | text | st.sampled_from(["yes", "no", "1", "0", "on", "t"]) | NOT_A_NUMBER


NOT_A_STRING = st.integers() | FLOATS_ANY | st.booleans() | NOT_A_NUMBER


def _device_ok(text: str) -> bool:
    if text in ("auto", "cpu", "mps", "cuda", "xpu"):
        return True
    kind, colon, index = text.partition(":")
    return (
        kind in ("cuda", "xpu")
        and bool(colon)
        and index.isascii()
        and index.isdigit()
        and len(index) <= 3
        and (index == "0" or not index.startswith("0"))
    )


NEAR_DEVICES = ["cuda:", "cuda:-1", "CUDA", " cpu", "cpu ", "cuda:0:1", "gpu", "mps:0", "cuda:1x", "cuda:\u0663"]
NEAR_DEVICES += ["xpu:abc", "", "tpu", "cuda:1000", "cuda:01", "auto:0", "cuda 0", "cpu\n"]


def _thresholds_ok(text: str) -> bool:
    try:
        values = [float(p) for p in text.split(",")]
    except ValueError:
        return False
    distinct = len({f"{v:g}" for v in values}) == len(values)
    return distinct and all(0 < v <= 1 for v in values)  # NaN and inf fail the comparison


GOOD_T = st.floats(min_value=0, max_value=1, exclude_min=True)
BAD_T = st.floats(max_value=0) | st.floats(min_value=1, exclude_min=True) | st.sampled_from([math.nan, math.inf])


def _bad_thresholds() -> st.SearchStrategy:
    one_bad = st.tuples(st.lists(GOOD_T, max_size=3), BAD_T).map(lambda p: ",".join(map(repr, [*p[0], p[1]])))
    repeated = GOOD_T.map(lambda t: f"{t!r},{t!r}")
    garbage = st.text(max_size=12).filter(lambda s: not _thresholds_ok(s))
    near = st.sampled_from(["", ",", "0.4,", ",0.5", "0.4,,0.5", "0.4;0.5", "0.5,0.50", "nan", "inf", "-0.1", "0"])
    return one_bad | repeated | garbage | near | NOT_A_STRING


NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.+=,@ -")


def _name_ok(key: str, text: str) -> bool:
    """A tracker name: 1-128 of letters, digits and _ . + = , @ - or space, the first a letter or digit."""
    if text == "":
        return key != "tracker-project"
    return len(text) <= 128 and set(text) <= NAME_CHARS and text[0].isascii() and text[0].isalnum()


def _uri_ok(text: str) -> bool:
    """Empty, databricks, or scheme://rest (the scheme a letter then letters, digits, + . -; no whitespace)."""
    if text in ("", "databricks"):
        return True
    scheme, sep, rest = text.partition("://")
    ok_scheme = bool(scheme) and scheme[0].isascii() and scheme[0].isalpha()
    ok_scheme = ok_scheme and all(c.isascii() and (c.isalnum() or c in "+.-") for c in scheme)
    return bool(sep) and ok_scheme and 0 < len(rest) <= 2000 and not any(c.isspace() for c in rest)


def _tags_ok(text: str) -> bool:
    """Empty, or 1-32 key=value pairs joined by ;: key 1-64 of [A-Za-z0-9_.-], value 0-500 of no ; or control."""
    if text == "":
        return True
    pairs = text.split(";")
    key_chars = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not 1 <= len(key) <= 64 or not set(key) <= key_chars:
            return False
        if len(value) > 500 or any(ord(c) < 32 for c in value):
            return False
    return len(pairs) <= 32


def _bad_tracker_text(key: str) -> st.SearchStrategy:
    if key == "tracker-uri":
        near = ["http://", "http:// x", "://x", "1http://x", "x", "http:/x", "file:///a b", "databricks ", "h_t://x"]
        return NOT_A_STRING | st.sampled_from(near) | st.text(max_size=12).filter(lambda s: not _uri_ok(s))
    if key == "tracker-tags":
        near = ["a", "=1", "a=1;", ";a=1", "a b=1", "a=1\n", "a=1;b", "k" * 65 + "=1", ";".join(["a=1"] * 33)]
        return NOT_A_STRING | st.sampled_from(near) | st.text(max_size=12).filter(lambda s: not _tags_ok(s))
    near = [" a", "-a", "a/b", "..", ".", "a\\b", "a" * 129, "a\n", "a:b", "a#b", "a?b", "a%b", "é"]
    near += [] if key != "tracker-project" else [""]
    return NOT_A_STRING | st.sampled_from(near) | st.text(max_size=12).filter(lambda s: not _name_ok(key, s))


def _bad_path(key: str, places: dict) -> st.SearchStrategy:
    nul = st.text(max_size=6).map(lambda s: f"{places['dir']}/{s}\0x")
    bad = NOT_A_STRING | nul
    if key == "out-dir":
        empty = st.text(alphabet=" \t\n", max_size=3)
        under_file = st.text(alphabet="abc", min_size=1, max_size=5).map(lambda s: f"{places['file']}/{s}")
        bad = bad | empty | under_file | st.just(places["file"])
    if key == "fid-cache-dir":
        bad = bad | st.text(alphabet="abc", min_size=1, max_size=5).map(lambda s: f"{places['file']}/{s}")
    if key in ("holdout-root", "resume", "init-from"):  # must be existing folders (init-from: or a Hub id)
        missing = st.text(alphabet="abc", min_size=1, max_size=5).map(lambda s: f"{places['missing']}/{s}")
        bad = bad | missing | st.just(places["file"])
    if key == "captions":  # image folders only: any captions JSON is refused under the digits defaults
        bad = bad | st.text(min_size=1, max_size=8).filter(lambda t: "\0" not in t) | st.just(places["file"])
    if key == "sscd-weights":  # the text family's only: any file is refused under the digits defaults
        bad = bad | st.text(min_size=1, max_size=8).filter(lambda t: "\0" not in t) | st.just(places["file"])
    if key == "fid-weights":  # must be an existing file
        missing = st.text(alphabet="abc", min_size=1, max_size=5).map(lambda s: f"{places['missing']}/{s}.pth")
        bad = bad | missing | st.just(places["dir"])
    return bad


def bad_values(key: str, places: dict) -> st.SearchStrategy:
    if key in INTS:
        return _bad_int(key)
    if key in FLOATS:
        return _bad_float(key)
    if key in BOOLS:
        return _bad_bool(key)
    if key in CHOICES:
        return NOT_A_STRING | st.text(max_size=12).filter(lambda s: s not in CHOICES[key])
    if key == "device":
        return NOT_A_STRING | st.sampled_from(NEAR_DEVICES) | st.text(max_size=10).filter(lambda s: not _device_ok(s))
    if key == "mq-thresholds":
        return _bad_thresholds()
    if key in ("tracker-uri", "tracker-tags", *NAMES):
        return _bad_tracker_text(key)
    return _bad_path(key, places)


FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)


@pytest.mark.parametrize("key", sorted(DEFAULTS))
@FUZZ
@given(data=st.data())
def test_bad_values_are_refused_naming_the_key(key, places, data):
    value = data.draw(bad_values(key, places), label=key)
    with pytest.raises(ValueError) as err:
        settings_from_run_config(DEFAULTS, {key: value})
    assert str(err.value).startswith(f"{key}:"), f"{key}={value!r}: {err.value}"


# ---- good values (so a check that refuses everything cannot pass) ----------------------------------
def good_values(key: str, places: dict) -> st.SearchStrategy:
    if key in INTS:
        lo, hi = GOOD_INTS.get(key, INTS[key])
        if key == "image-size":
            return st.sampled_from([4, 8, 16, 32, 64, 128, 256, 512, 1024])
        return st.integers(lo, hi) | st.integers(lo, hi).map(float)
    if key in FLOATS:
        lo, lo_in, hi, hi_in, inf_ok = FLOATS[key]
        finite = st.floats(lo, hi if hi is not None else 1e300, exclude_min=not lo_in, exclude_max=not hi_in)
        return finite | finite.map(repr) | (st.just("inf") if inf_ok else finite)
    if key in BOOLS:
        return st.booleans() | st.sampled_from(["true", "false", "True", "FALSE"])
    if key in CHOICES:
        # imagefolder needs a data-root, afhq64 a larger image, an adapter an init-from, spare a holdout-size
        skip = ("imagefolder", "afhq64", "lora", "difffit", "spare", "fp16")  # fp16: CUDA only
        return st.sampled_from([c for c in CHOICES[key] if c not in skip])
    if key == "device":  # the full check also wants the device on this machine
        import torch

        cuda = ["cuda", *(f"cuda:{n}" for n in range(torch.cuda.device_count()))] if torch.cuda.is_available() else []
        return st.sampled_from(["auto", "cpu", *cuda])
    if key == "init-from":
        return st.sampled_from(["", places["base"]])
    if key == "mq-thresholds":
        return st.lists(GOOD_T, min_size=1, max_size=4, unique_by=lambda t: f"{t:g}").map(
            lambda v: ",".join(map(repr, v))
        )
    if key in ("out-dir", "fid-cache-dir"):
        return st.text(alphabet="abc", min_size=1, max_size=5).map(lambda s: f"{places['dir']}/{s}")
    if key in ("holdout-root", "resume"):
        return st.sampled_from(["", places["dir"]])
    if key in ("captions", "sscd-weights"):  # the digits defaults have no captions nor Sim Score
        return st.just("")  # (tests/test_text_federated.py, tests/test_text_eval.py: the text family's)
    if key == "clip-model":  # unused by a pixel run: any folder or Hub id is accepted there
        return st.sampled_from(["", "openai/clip-vit-base-patch16", places["dir"], "no/such"])
    if key == "fid-weights":
        return st.sampled_from(["", places["file"]])
    if key == "tracker-uri":  # with tracker none, a server is never contacted
        return st.sampled_from(["", "databricks", "http://127.0.0.1:5000", "https://api.wandb.ai", "file:///tmp/x"])
    if key == "tracker-tags":
        pair = st.tuples(st.text(alphabet="abz09_.-", min_size=1, max_size=8), st.text(alphabet="x =,+1", max_size=8))
        return st.lists(pair, max_size=4).map(lambda ps: ";".join(f"{k}={v}" for k, v in ps))
    if key in NAMES:
        first = st.sampled_from("aZ09")
        rest = st.text(alphabet="aZ09_.+=,@ -", max_size=20)
        return st.tuples(first, rest).map("".join) | st.just("" if key != "tracker-project" else "iet-agc")
    if key == "tracker-dir":
        return st.sampled_from(["", places["dir"], f"{places['dir']}/tracked"])
    return st.text(alphabet="abc/", max_size=8)  # data-root: unused by digits


@pytest.mark.parametrize("key", sorted(DEFAULTS))
@settings(
    max_examples=15,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(data=st.data())
def test_good_values_are_accepted(key, places, data):
    value = data.draw(good_values(key, places), label=key)
    settings_from_run_config(DEFAULTS, {**NEEDS.get(key, {}), key: value})


DP = {"agc": False, "taa": False, "msr": "none", "dp-noise-multiplier": 1.0}  # what dp-sgd = true needs
NEEDS = {  # what a key's every good value needs beside it
    "input-noise-fixed": {"input-noise-variance": 0.1},
    "class-embedding": {"class-conditional": True},
    "ambient": {"taa": False},  # TAA would show the network pixels outside the masks
    "dp-sgd": DP,
}


def test_error_messages_start_with_the_key():
    """The CLI greps stderr for '<key>:'; every message of the check starts that way."""
    assert re.match(r"^lr: must be a finite number in \(0, 1\], got nan$", _message({"lr": math.nan}))


def _message(override: dict) -> str:
    with pytest.raises(ValueError) as err:
        settings_from_run_config(DEFAULTS, override)
    return str(err.value)
