"""In-training dev evaluation: generate on the dev set, keep the best K checkpoints, stop early.

Under ZeRO-3 every forward gathers the student's parameters with collectives, so all ranks must
make the same forward calls. Each rank therefore generates for an equal-size shard of the dev
records (short shards are padded with a record whose score is discarded) with
``synced_gpus=True``, which keeps a rank that finished stepping until all have; the metric sums
are then all-reduced, so every rank gets the same numbers and takes the same keep/stop
decisions (saving and stopping are collective too).

Selection follows the paper: the best checkpoint by dev ROUGE-L (``eval.metric``, higher is
better); early-stopping patience counts evaluations without a strict improvement.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from cot2align_ds.atomic import write_jsonl_atomic, write_text_atomic
from cot2align_ds.config import EvalConfig
from cot2align_ds.data.records import Record
from cot2align_ds.data.templates import CHAT, TEMPLATE_NAMES, standard_prompt
from cot2align_ds.eval.metrics import EvalInputError, get_metric
from cot2align_ds.inference.generation import DecodingConfig, encode_prompts, generate
from cot2align_ds.run_dir import DEV_EVAL_FILENAME

ReduceSum = Callable[[torch.Tensor], torch.Tensor]
METRIC_PREFIX = "eval/"
STATE_FILENAME = DEV_EVAL_FILENAME
PREDICTIONS_DIRNAME = "dev_predictions"
ALL_METRICS = ("rouge_l", "exact_match")


@dataclass(frozen=True)
class KeptCheckpoint:
    step: int
    score: float
    path: Path


def _rank_and_world_size() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _collective_device() -> torch.device:
    # NCCL reduces only CUDA tensors; gloo (CPU runs) only CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity in a single process); returned on the CPU."""
    if _rank_and_world_size()[1] == 1:
        return tensor
    moved = tensor.to(_collective_device())
    dist.all_reduce(moved, op=dist.ReduceOp.SUM)
    return moved.cpu()


def shard_indices(num_records: int, rank: int, world_size: int) -> tuple[list[int], list[float]]:
    """Record indices of one rank and their weights; every rank gets the same count.

    Strided (rank, rank + world_size, ...) so prompt lengths spread evenly; the short shards
    are padded with record 0 at weight 0.
    """
    indices = list(range(rank, num_records, world_size))
    per_rank = -(-num_records // world_size)
    padding = per_rank - len(indices)
    return indices + [0] * padding, [1.0] * len(indices) + [0.0] * padding


SAMPLES_PER_EVALUATION = 8


class DevEvaluator:
    """Dev-set evaluation, best-K checkpoint bookkeeping and early stopping for one run."""

    def __init__(
        self,
        config: EvalConfig,
        records: Sequence[Record],
        tokenizer: PreTrainedTokenizerBase,
        *,
        template: str,
        max_prompt_tokens: int,
        prompt_cut: str = "left",
        prompt_special_tokens: bool = True,
        output_dir: Path,
        is_main: bool,
        steps_per_epoch: int,
        reduce_sum: ReduceSum | None = None,
    ) -> None:
        if template not in TEMPLATE_NAMES:
            raise EvalInputError(f"unknown template '{template}'; choose from {TEMPLATE_NAMES}")
        self.config = config
        self.records = list(records[: config.max_records] if config.max_records else records)
        if not self.records:
            raise EvalInputError("data.dev_file: no dev records to evaluate; add some")
        self.tokenizer = tokenizer
        self.prompts = [standard_prompt(record, template, tokenizer) for record in self.records]
        self.decoding = DecodingConfig(
            max_new_tokens=config.max_new_tokens,
            greedy=config.greedy,
            no_repeat_ngram_size=config.no_repeat_ngram_size,
            max_prompt_tokens=max_prompt_tokens,
            prompt_cut=prompt_cut,
            # A chat template writes its own BOS.
            prompt_special_tokens=prompt_special_tokens and template != CHAT,
            max_length=config.max_length,
        )
        self._check_prompts()
        self.seeds: list[int | None] = [None] if config.greedy else list(config.seeds)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise EvalInputError(f"eval.seeds {config.seeds}: give distinct seeds (or greedy)")
        self.metric_names = tuple(dict.fromkeys((config.metric, *ALL_METRICS)))
        self.output_dir = Path(output_dir)
        self.is_main = is_main
        self.steps_per_epoch = steps_per_epoch
        self._reduce_sum = reduce_sum or all_reduce_sum
        self._scores: dict[int, float] = {}
        self._best_score: float | None = None
        self._evals_without_improvement = 0
        self.samples: list[dict] = []  # the last evaluation's first completions (this rank)
        self._kept: list[KeptCheckpoint] = []
        self._to_delete: list[Path] = []

    def _check_prompts(self) -> None:
        # Checked once here, identically on every rank: raised inside generation on one rank
        # only, it would leave the other ranks waiting in a collective.
        encoded = encode_prompts(
            self.tokenizer,
            self.prompts,
            self.decoding.max_prompt_tokens,
            cut=self.decoding.prompt_cut,
            special_tokens=self.decoding.prompt_special_tokens,
        )
        empty = [self.records[i].id for i, ids in enumerate(encoded) if not ids]
        if empty:
            raise EvalInputError(f"data.dev_file: records {empty[:3]} have empty prompts")

    # -- schedule -------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (every N steps / end of an epoch)."""
        every = self.config.every_steps
        if every is not None and step % every == 0:
            return True
        return (
            self.config.every_epoch
            and self.steps_per_epoch > 0
            and step % self.steps_per_epoch == 0
        )

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, model: PreTrainedModel, step: int) -> dict[str, float]:
        """Dev metrics (``eval/<metric>``, x100) of ``model``; every rank must call it."""
        self._check_length(model)
        rank, world_size = _rank_and_world_size()
        indices, weights = shard_indices(len(self.records), rank, world_size)
        sums = torch.zeros(len(self.seeds), len(self.metric_names), dtype=torch.float64)
        rows: list[dict] = []
        for seed_index, seed in enumerate(self.seeds):
            texts = generate(
                model,
                self.tokenizer,
                [self.prompts[i] for i in indices],
                self.decoding,
                seed=0 if seed is None else seed,
                batch_size=self.config.batch_size,
                synced_gpus=world_size > 1,
            )
            for index, weight, text in zip(indices, weights, texts, strict=True):
                scores = self._score(text, self.records[index].output)
                sums[seed_index] += weight * torch.tensor(list(scores.values()), dtype=sums.dtype)
                if weight:
                    rows.append({"index": index, "seed": seed, "prediction": text, **scores})
        totals = self._reduce_sum(torch.cat([sums.flatten(), sums.new_tensor([sum(weights)])]))
        means = (totals[:-1].view_as(sums) / totals[-1]).mean(dim=0)  # over records, then seeds
        named = zip(self.metric_names, means.tolist(), strict=True)
        metrics = {f"{METRIC_PREFIX}{name}": value for name, value in named}
        # A few of this rank's completions, for a table on the dashboard.
        self.samples = [
            {
                "prompt": self.prompts[row["index"]][-300:],
                "reference": self.records[row["index"]].output,
                "prediction": row["prediction"],
                self.config.metric: row[self.config.metric],
            }
            for row in rows[:SAMPLES_PER_EVALUATION]
        ]
        self._write_predictions(step, rows, world_size)
        self.observe(step, metrics)
        return metrics

    def _check_length(self, model: PreTrainedModel) -> None:
        limit = getattr(model.config, "max_position_embeddings", None)
        needed = self.decoding.max_prompt_tokens + self.decoding.max_new_tokens
        if limit is not None and needed > limit:
            raise EvalInputError(
                f"data.max_prompt_tokens + eval.max_new_tokens = {needed} exceeds the student's "
                f"{limit} positions; lower one of them"
            )

    def _score(self, prediction: str, reference: str) -> dict[str, float]:
        return {name: get_metric(name)(prediction, [reference]) for name in self.metric_names}

    def observe(self, step: int, metrics: Mapping[str, float]) -> None:
        """Take the dev metrics of ``step`` into account (``evaluate`` calls it)."""
        score = self._score_of(metrics)
        self._scores[step] = score
        if self._best_score is None or score > self._best_score:
            self._best_score, self._evals_without_improvement = score, 0
        else:
            self._evals_without_improvement += 1
        self._write_state()

    def _write_predictions(self, step: int, rows: list[dict], world_size: int) -> None:
        if world_size > 1:  # collective: every rank takes part, rank 0 writes
            gathered: list[list[dict] | None] = [None] * world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part or []]
        if not self.is_main:
            return
        rows.sort(key=lambda row: (self.seeds.index(row["seed"]), row["index"]))
        for row in rows:
            record = self.records[row.pop("index")]
            row.update(id=record.id, reference=record.output)
        write_jsonl_atomic(self.output_dir / PREDICTIONS_DIRNAME / f"step_{step}.jsonl", rows)

    # -- best-K checkpoints and early stopping ---------------------------------------------------
    def _score_of(self, metrics: Mapping[str, float]) -> float:
        for key in (f"{METRIC_PREFIX}{self.config.metric}", self.config.metric):
            if key in metrics:
                return float(metrics[key])
        raise KeyError(f"metrics {sorted(metrics)} lack '{self.config.metric}' (eval.metric)")

    def should_keep(self, metrics: Mapping[str, float]) -> bool:
        """Whether a checkpoint with these dev metrics enters the best ``eval.keep_best``."""
        keep = self.config.keep_best
        if keep == 0:
            return False
        if len(self._kept) < keep:
            return True
        return self._score_of(metrics) > min(kept.score for kept in self._kept)

    def register_checkpoint(self, step: int, path: str | Path) -> None:
        """Record the checkpoint saved after the evaluation at ``step``; queue the displaced."""
        if step not in self._scores:
            raise ValueError(f"no dev evaluation at step {step}; evaluate before registering")
        path = Path(path)
        self._kept = [kept for kept in self._kept if kept.path != path]
        self._kept.append(KeptCheckpoint(step, self._scores[step], path))
        # Higher score first; on a tie the earlier checkpoint stays (it got there first).
        self._kept.sort(key=lambda kept: (-kept.score, kept.step))
        keep = self.config.keep_best
        self._to_delete += [kept.path for kept in self._kept[keep:]]
        self._kept = self._kept[:keep]
        self._write_state()

    def paths_to_delete(self) -> list[Path]:
        """Checkpoints pushed out of the best K since the last call (each returned once)."""
        paths, self._to_delete = self._to_delete, []
        return paths

    @property
    def kept(self) -> list[KeptCheckpoint]:
        """The best checkpoints, best first."""
        return list(self._kept)

    @property
    def best_checkpoint(self) -> Path | None:
        return self._kept[0].path if self._kept else None

    @property
    def best_score(self) -> float | None:
        return self._best_score

    @property
    def should_stop(self) -> bool:
        """True after ``eval.early_stopping_patience`` evaluations without improvement."""
        patience = self.config.early_stopping_patience
        return patience is not None and self._evals_without_improvement >= patience

    # -- persistence (resume) -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "metric": self.config.metric,
            "scores": {str(step): score for step, score in self._scores.items()},
            "best_score": self._best_score,
            "evals_without_improvement": self._evals_without_improvement,
            "kept": [{**asdict(kept), "path": str(kept.path)} for kept in self._kept],
        }

    def load_state_dict(self, state: Mapping) -> None:
        self._scores = {int(step): float(score) for step, score in state["scores"].items()}
        self._best_score = state["best_score"]
        self._evals_without_improvement = int(state["evals_without_improvement"])
        self._kept = [
            KeptCheckpoint(int(k["step"]), float(k["score"]), Path(k["path"]))
            for k in state["kept"]
        ]

    def _write_state(self) -> None:
        if self.is_main:
            text = json.dumps(self.state_dict(), indent=2) + "\n"
            write_text_atomic(self.output_dir / STATE_FILENAME, text)
