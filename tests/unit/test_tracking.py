"""Tracker: metrics.jsonl, offline W&B runs without secrets, console output, rank gating."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import wandb

from cot2align_ds.tracking import (
    METRICS_FILENAME,
    Tracker,
    TrackingError,
    is_secret_name,
    resolve_wandb_mode,
    scrub_secrets,
)

FAKE_API_KEY = "0123456789abcdef0123456789abcdef01234567"  # W&B keys are 40 hex characters


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_is_flushed_per_log_and_appended(tmp_path) -> None:
    tracker = Tracker(tmp_path / "run")
    tracker.log({"loss/total": 2.0, "tokens_per_s": 100}, step=1)
    tracker.log({"loss/total": 1.5}, step=2)
    # Readable before close: a crash right now would keep both lines.
    rows = _rows(tmp_path / "run" / METRICS_FILENAME)
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0]["loss/total"] == 2.0 and rows[0]["tokens_per_s"] == 100.0
    assert rows[0]["time"] <= rows[1]["time"]
    tracker.close()
    tracker.close()  # idempotent
    with Tracker(tmp_path / "run") as resumed:  # a resumed run appends
        resumed.log({"loss/total": 1.0}, step=3)
    assert [row["step"] for row in _rows(tmp_path / "run" / METRICS_FILENAME)] == [1, 2, 3]


def test_reserved_metric_names_are_rejected(tmp_path) -> None:
    with Tracker(tmp_path) as tracker, pytest.raises(TrackingError, match="reserved"):
        tracker.log({"step": 1.0}, step=1)


def test_non_main_process_writes_nothing(tmp_path, capsys) -> None:
    tracker = Tracker(tmp_path / "rank1", is_main_process=False, wandb_mode="offline")
    tracker.log({"loss": 1.0}, step=1)
    tracker.summary({"loss": 1.0})
    with tracker.progress(3) as bar:
        bar.update(1, {"loss": 1.0})
    tracker.close()
    assert not (tmp_path / "rank1").exists()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_and_summary_print_compact_lines(tmp_path, capsys) -> None:
    with Tracker(tmp_path) as tracker:
        with tracker.progress(4) as bar:
            bar.update(2, {"loss/total": 0.123456})
        tracker.summary({"eval/rouge_l": 25.123456, "tokens_per_s": 1234.0})
    captured = capsys.readouterr()
    assert "eval/rouge_l 25.12 | tokens_per_s 1234" in captured.out
    assert "2/4" in captured.err and "loss/total=0.1235" in captured.err


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("wandb_api_key", True),
        ("hfToken", True),
        ("DB_PASSWORD", True),
        ("client-secret", True),
        ("apikey", True),
        ("max_new_tokens", False),
        ("tokenizer", False),
        ("tokens_per_s", False),
        ("kd_rate", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_scrub_secrets_is_recursive_and_catches_leaked_values() -> None:
    config = {
        "lr": 1e-3,
        "wandb": {"api_key": "x", "project": "p"},
        "data": {"max_new_tokens": 256, "tokenizer": "tok"},
        "notes": ["fine", f"key={FAKE_API_KEY}"],
        "innocent_name": FAKE_API_KEY,
    }
    scrubbed = scrub_secrets(config, env={"WANDB_API_KEY": FAKE_API_KEY})
    assert scrubbed == {
        "lr": 1e-3,
        "wandb": {"project": "p"},
        "data": {"max_new_tokens": 256, "tokenizer": "tok"},
        "notes": ["fine"],
    }
    assert config["wandb"] == {"api_key": "x", "project": "p"}  # the input is not mutated


def test_auto_mode_goes_online_only_with_a_key(tmp_path) -> None:
    no_netrc = {"NETRC": str(tmp_path / "missing")}
    assert resolve_wandb_mode("auto", no_netrc) == "offline"
    assert resolve_wandb_mode("auto", {**no_netrc, "WANDB_API_KEY": FAKE_API_KEY}) == "online"
    netrc_path = tmp_path / "netrc"
    netrc_path.write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_API_KEY}\n")
    assert resolve_wandb_mode("auto", {"NETRC": str(netrc_path)}) == "online"
    # A self-hosted server: the netrc entry must be for that host.
    other = {"NETRC": str(netrc_path), "WANDB_BASE_URL": "https://wandb.example.com"}
    assert resolve_wandb_mode("auto", other) == "offline"
    assert resolve_wandb_mode("offline", {"WANDB_API_KEY": FAKE_API_KEY}) == "offline"
    with pytest.raises(TrackingError, match="unknown wandb mode 'cloud'"):
        resolve_wandb_mode("cloud")


def test_offline_wandb_run_has_the_metrics_and_never_the_key(tmp_path, monkeypatch) -> None:
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_API_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    output_dir = tmp_path / "run"
    config = {"lr": 1e-3, "wandb_api_key": FAKE_API_KEY, "data": {"max_new_tokens": 7}}
    with Tracker(output_dir, wandb_mode="offline", run_name="tiny", config=config) as tracker:
        for step in (1, 2, 3):
            tracker.log({"loss/total": 1.0 / step, "loss/ot_main": 0.1 * step}, step=step)
        tracker.summary({"eval/rouge_l": 12.5})
    # finish() returns before wandb-core has flushed the offline log; teardown waits for it.
    wandb.teardown()
    run_dirs = list((output_dir / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    log_files = list(run_dirs[0].glob("run-*.wandb"))
    assert len(log_files) == 1
    # The run log is protobuf records; key names and config entries appear as plain bytes.
    run_log = log_files[0].read_bytes()
    for expected in (
        b"train/loss",
        b"train/loss/ot_main",
        b"eval/rouge_l",
        b"max_new_tokens",
        b"tiny",
    ):
        assert expected in run_log
    written = [path for path in tmp_path.rglob("*") if path.is_file() and not path.is_symlink()]
    assert len(written) > 2
    for path in written:
        content = path.read_bytes()
        assert FAKE_API_KEY.encode() not in content, path
        assert b"wandb_api_key" not in content, path
    assert len(_rows(output_dir / METRICS_FILENAME)) == 3


def test_dashboard_names_follow_the_trl_convention() -> None:
    from cot2align_ds.tracking import dashboard_name

    assert dashboard_name("loss/total") == "train/loss"
    assert dashboard_name("lr/student_decay") == "train/learning_rate"
    assert dashboard_name("grad_norm") == "train/grad_norm"
    assert dashboard_name("loss/ot_main") == "train/loss/ot_main"
    assert dashboard_name("eval/rouge_l") == "eval/rouge_l"


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, monkeypatch) -> None:
    """A requeued job resumes into one W&B run (the id is kept in the run directory); a fresh
    run into the same directory (--overwrite) starts a new one."""
    from cot2align_ds.tracking import RUN_ID_FILENAME, STEP_METRIC

    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    output_dir = tmp_path / "run"
    ids = []
    for resume in (False, True, False):
        with Tracker(output_dir, wandb_mode="offline", resume=resume) as tracker:
            tracker.log({"loss/total": 1.0}, step=1)
        ids.append((output_dir / RUN_ID_FILENAME).read_text().strip())
    wandb.teardown()
    assert ids[0] == ids[1] != ids[2]
    runs = sorted(p.name for p in (output_dir / "wandb").glob("offline-run-*"))
    assert sum(f"-{ids[0]}" in name for name in runs) == 2 and len(runs) == 3
    run_log = next((output_dir / "wandb").glob(f"offline-run-*-{ids[0]}*/run-*.wandb"))
    assert b"train/loss" in run_log.read_bytes() and STEP_METRIC.encode() in run_log.read_bytes()


def test_sample_completions_go_to_the_dashboard_as_a_table(tmp_path, monkeypatch) -> None:
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    output_dir = tmp_path / "run"
    rows = [{"prompt": "2 + 2?", "reference": "4", "prediction": "four", "exact_match": 0.0}]
    with Tracker(output_dir, wandb_mode="offline") as tracker:
        tracker.table("eval/completions", rows, step=3)
        tracker.table("eval/completions", [], step=4)  # nothing to show: nothing logged
    wandb.teardown()
    run_log = next((output_dir / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    assert b"eval/completions" in run_log
    # metrics.jsonl keeps numbers only.
    assert (output_dir / METRICS_FILENAME).read_text() == ""
