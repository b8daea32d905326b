"""Rank-0 metric sinks: ``metrics.jsonl``, Weights & Biases, and the console.

``metrics.jsonl`` is always written (one object per ``log`` call, appended and flushed, so a
crash keeps everything logged before it); the report reads it. W&B is optional: "auto" goes
online only when an API key is configured and otherwise writes an offline run that
``wandb sync`` can upload later. The run config is scrubbed of secret-looking keys before it
reaches W&B, so an API key or hub token in a config never lands in a run directory.

On non-main processes every method is a no-op, so the training loop calls them unguarded.
"""

from __future__ import annotations

import json
import netrc
import os
import re
import secrets
import string
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlparse

from tqdm.auto import tqdm

from cot2align_ds.atomic import write_text_atomic
from cot2align_ds.errors import UserError

METRICS_FILENAME = "metrics.jsonl"
WandbMode = Literal["disabled", "offline", "online", "auto"]
_WANDB_MODES = ("disabled", "offline", "online", "auto")
_RESERVED_KEYS = ("step", "time")
# A config key is secret-looking when one of its words ends with a marker: "api_key",
# "hfToken", "WANDB_SECRET", "db_password". Whole words, so "max_new_tokens" and "tokenizer"
# (training settings worth tracking) are kept.
_SECRET_MARKERS = ("key", "token", "secret", "password", "passwd")
# Environment variables whose values must never appear in anything we write.
_SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


# metrics.jsonl keeps the project's names; W&B gets the names TRL and the HF Trainer use, so
# runs of either overlay on one dashboard: train/* and eval/*, plotted against train/global_step.
_DASHBOARD_NAMES = {
    "loss/total": "train/loss",
    "grad_norm": "train/grad_norm",
    "epoch": "train/epoch",
    "lr/student_decay": "train/learning_rate",
}
STEP_METRIC = "train/global_step"


def dashboard_name(name: str) -> str:
    """The W&B name of a metrics.jsonl metric: ``eval/*`` as is, the TRL name where there is
    one, else ``train/<name>``."""
    if name.startswith("eval/"):
        return name
    return _DASHBOARD_NAMES.get(name, f"train/{name}")


RUN_ID_FILENAME = "wandb_run_id"


def new_run_id() -> str:
    """A W&B run id: 8 lowercase letters and digits, like the ones W&B makes."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


class TrackingError(UserError):
    """Tracking is misconfigured (unknown W&B mode, reserved metric name)."""


def is_secret_name(name: str) -> bool:
    words = re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower())
    return any(word.endswith(_SECRET_MARKERS) for word in words if word)


def _secret_values(env: Mapping[str, str]) -> list[str]:
    return [env[name] for name in _SECRET_ENV_VARS if env.get(name)]


def scrub_secrets(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """A copy of ``value`` without secret-looking keys or values equal to a secret env var."""
    secrets = _secret_values(os.environ if env is None else env)
    return _scrub(value, secrets)


def _scrub(value: Any, secrets: Sequence[str]) -> Any:
    if isinstance(value, Mapping):
        return {
            key: _scrub(item, secrets)
            for key, item in value.items()
            if not is_secret_name(str(key)) and not _holds_secret(item, secrets)
        }
    if isinstance(value, list | tuple):
        return [_scrub(item, secrets) for item in value if not _holds_secret(item, secrets)]
    return value


def _holds_secret(value: Any, secrets: Sequence[str]) -> bool:
    return isinstance(value, str) and any(secret in value for secret in secrets)


def _netrc_has_entry(host: str, env: Mapping[str, str]) -> bool:
    path = Path(env.get("NETRC") or Path.home() / ".netrc")
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False  # an unreadable netrc is "no key", not a crash


def resolve_wandb_mode(mode: str, env: Mapping[str, str] | None = None) -> str:
    """The concrete W&B mode; "auto" is online iff an API key is configured (env or netrc)."""
    if mode not in _WANDB_MODES:
        raise TrackingError(f"unknown wandb mode '{mode}'; choose one of {list(_WANDB_MODES)}")
    if mode != "auto":
        return mode
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or ""
    return "online" if _netrc_has_entry(host, env) else "offline"


def format_metrics(metrics: Mapping[str, float]) -> str:
    """A compact one-line rendering: ``loss/total 1.234 | tokens_per_s 5.6e+03``."""
    return " | ".join(f"{name} {_short(value)}" for name, value in metrics.items())


def _short(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class _Progress:
    """The training-loop progress bar: ``update(n, postfix)`` advances and shows metrics."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = tqdm(total=total, disable=not enabled, dynamic_ncols=True, unit="step")

    def update(self, n: int = 1, postfix: Mapping[str, float] | None = None) -> None:
        if postfix:
            self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


class Tracker:
    """Metric sinks of one run; only the main process writes anything."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        is_main_process: bool = True,
        wandb_mode: WandbMode | str = "disabled",
        project: str = "cot2align-ds",
        run_name: str | None = None,
        group: str | None = None,
        tags: Sequence[str] = (),
        config: Mapping[str, Any] | None = None,
        resume: bool = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.resume = resume
        self.metrics_path = self.output_dir / METRICS_FILENAME
        self.is_main_process = is_main_process
        self.wandb_mode = resolve_wandb_mode(wandb_mode)
        self._metrics_file = None
        self._wandb_run = None
        if not is_main_process:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Append: a resumed run keeps the lines logged before the interruption.
        self._metrics_file = self.metrics_path.open("a", encoding="utf-8")
        if self.wandb_mode != "disabled":
            self._wandb_run = self._init_wandb(project, run_name, group, tags, config or {})

    def _init_wandb(
        self,
        project: str,
        run_name: str | None,
        group: str | None,
        tags: Sequence[str],
        config: Mapping[str, Any],
    ) -> Any:
        import wandb  # imported lazily: slow to import and unused when disabled

        # One W&B run per training run: a resumed (or requeued) run continues the run whose id
        # the first start saved, instead of splitting into several.
        id_path = self.output_dir / RUN_ID_FILENAME
        run_id = (
            id_path.read_text(encoding="utf-8").strip() if self.resume and id_path.is_file() else ""
        )
        if not run_id:
            run_id = new_run_id()
            write_text_atomic(id_path, run_id + "\n")
        run = wandb.init(
            mode=self.wandb_mode,
            dir=str(self.output_dir),
            id=run_id,
            resume="allow",
            project=project,
            name=run_name,
            group=group,
            tags=list(tags) or None,
            config=scrub_secrets(dict(config)),
        )
        run.define_metric(STEP_METRIC)
        run.define_metric("*", step_metric=STEP_METRIC)
        return run

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Append ``{"step", "time", **metrics}`` to metrics.jsonl (flushed) and send to W&B."""
        if not self.is_main_process:
            return
        clashes = [key for key in _RESERVED_KEYS if key in metrics]
        if clashes:
            raise TrackingError(f"metric names {clashes} are reserved in metrics.jsonl")
        values = {name: float(value) for name, value in metrics.items()}
        row = {"step": int(step), "time": time.time(), **values}
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        if self._wandb_run is not None:
            named = {dashboard_name(name): value for name, value in values.items()}
            self._wandb_run.log({STEP_METRIC: int(step), **named}, step=int(step))

    def table(self, name: str, rows: Sequence[Mapping[str, Any]], step: int) -> None:
        """A table (e.g. sample completions) on the W&B dashboard; metrics.jsonl keeps numbers
        only (the predictions files hold every completion)."""
        if not self.is_main_process or self._wandb_run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        table = wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self._wandb_run.log({STEP_METRIC: int(step), name: table}, step=int(step))

    @contextmanager
    def progress(self, total: int) -> Iterator[_Progress]:
        """A progress bar (shown on the main process only) for ``total`` steps."""
        bar = _Progress(total, enabled=self.is_main_process)
        try:
            yield bar
        finally:
            bar.close()

    def summary(self, metrics: Mapping[str, float]) -> None:
        """Print one compact line (above any live bar) and record it in the W&B run summary."""
        if not self.is_main_process:
            return
        tqdm.write(format_metrics(metrics))
        if self._wandb_run is not None:
            self._wandb_run.summary.update({dashboard_name(k): v for k, v in metrics.items()})

    def warn(self, message: str) -> None:
        """One ``warning:`` line on stderr (main process, above any live bar)."""
        if self.is_main_process:
            tqdm.write(f"warning: {message}", file=sys.stderr)

    def close(self, exit_code: int = 0) -> None:
        """Close metrics.jsonl and finish the W&B run; safe to call twice."""
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(exit_code=0 if exc_type is None else 1)
