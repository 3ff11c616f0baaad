"""Config and CLI fuzzing (hypothesis): whatever a user types into ``--set`` ends in a loaded
config or in a one-line ConfigError naming the key — never a traceback, never a training run
started on a bad value."""
from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from imagebert_ds.config_utils import ConfigError  # noqa: E402

KEYS = ["run.seed", "run.resume", "run.out_dir", "optimizer.lr", "optimizer.betas",
        "optimizer.name", "deepspeed.zero_stage", "deepspeed.gradient_accumulation_steps",
        "deepspeed.bf16", "checkpoint.every_steps", "checkpoint.keep_last", "log.every_steps",
        "training.max_bad_steps", "data.batch_size", "data.mlm_prob", "data.on_bad_sample",
        "data.resume_data", "data.max_regions", "data.max_text_len", "stages.0.steps",
        "stages.0.lr", "stages.0.warmup_steps", "stages.0.min_lr"]
VALUES = st.one_of(
    st.integers(-10**7, 10**7).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "''", "[]", "[1, 2]", "{a: 1}", "auto", "never",
                     "skip", "error", "exact", "restart", "lamb", "-0", "1e6", "1e-300", ".nan",
                     "'5'"]),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12))
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def check_error(e: ConfigError, key: str) -> None:
    msg = str(e)
    assert "\n" not in msg.strip(), msg
    leaf = key.split(".")[-1]
    assert leaf in msg or key.replace("stages.0.", "stage") in msg or "steps" in msg, (key, msg)


@pytest.fixture(scope="module")
def cfg(toy_source, tmp_path_factory):
    from rel_helpers import run_config

    tmp = tmp_path_factory.mktemp("fuzz")
    return run_config(tmp, toy_source, tmp / "out")


@SETTINGS
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_config_overrides(cfg, key, value):
    from imagebert_ds.train.config import load_run_config

    try:
        load_run_config(cfg, [f"{key}={value}"])
    except ConfigError as e:
        check_error(e, key)


@SETTINGS
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_cli_pretrain(cfg, key, value, capsys, monkeypatch):
    """The real ``imagebert-ds pretrain --nproc 1`` up to the launch (stubbed: a valid config
    would start training): rc 0 with a launch, or rc 2 with one ``config error:`` line."""
    from imagebert_ds import cli
    from imagebert_ds.runtime import launch

    launched = []
    monkeypatch.setattr(launch, "launch", lambda n, args, *a, **k: launched.append(args) or 0)
    rc = cli.main(["pretrain", "--nproc", "1", "--config", str(cfg), "--set", f"{key}={value}"])
    err = capsys.readouterr().err
    if rc == 0:
        assert launched and not err.strip()
    else:
        assert rc == 2 and not launched, (rc, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("config error: "), err
        check_error(ConfigError(lines[0]), key)
