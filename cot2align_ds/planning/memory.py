"""The planner's memory terms, per rank, from model sizes (``sizing.py``) and the run's DeepSpeed
configs. The terms:

- student states: 2 + 2 + 12 bytes per trainable parameter in bf16/fp16 (16-bit weights,
  16-bit gradients, fp32 master + Adam moments; DeepSpeed keeps the fp32 master even in fp32
  runs: 4 + 4 + 12 there), partitioned over the world size by the ZeRO stage of the student
  JSON; LoRA students keep frozen 16-bit base weights and train the adapters and projectors;
- ZeRO-3 working set: parameters reused within ``stage3_max_reuse_distance`` stay gathered, so
  a student of up to ~1e9 parameters is held whole between forward and backward; a forward-only
  teacher holds one module plus the prefetch bucket (all of it when it is that small);
- teacher (frozen, ZeRO-3): 16-bit partitions on the GPU, in pinned CPU memory with
  ``offload_param: cpu``, or on NVMe with pinned CPU buffers;
- activations: ``s*b*(18h + c*I)`` bytes per layer in 16 bits (Korthikanti et al. 2022 with
  fused attention, so no ``s^2`` term; ``c`` = 4 for a GELU MLP, 8 for a gated one), or the
  layer inputs plus one recomputed layer with gradient checkpointing; CoT records add a forward
  pass of each model on their standard view;
- logits: the model outputs (B x L x vocab in the model dtype) plus the fp32 copies the loss
  makes (per method, ``Method.logit_copies`` in the method registry), over ``chunk_size`` rows at a time when chunking is on;
- OT (CoT2Align): B x S x T fp32 cost/plan tensors per layer pair and view, plus the Sinkhorn
  working memory (``losses.ot.sinkhorn.sinkhorn_problem_bytes``);
- the optimizer step's temporaries, checkpoint reading at start-up and rank 0's gathered state
  dict at save time.

Each term belongs to a phase; the phases other than ``steady`` do not overlap, so the peak is the
steady terms plus the largest phase. These are planning estimates, not measurements: on CPU runs
the planner lands at 0.8-1.05x the measured peak RSS (tests/integration/test_plan_measured.py);
allocator fragmentation comes on top.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from cot2align_ds.config import RunConfig
from cot2align_ds.losses.ot.sinkhorn import sinkhorn_problem_bytes
from cot2align_ds.methods import get_method, needs_hidden_states, projector_params
from cot2align_ds.planning.sizing import GIB, ModelSize

Accelerator = Literal["cuda", "cpu"]

# Per-rank fixed costs. CUDA: context, cuBLAS/cuDNN workspaces and NCCL buffers on the GPU, and
# the host side of a CUDA torch process (libraries, kernels images) in CPU memory: typical values
# for torch 2.x on H100 nodes. CPU: the RSS of a process that imported torch + transformers +
# deepspeed (0.4 GiB measured on the 2-core CI machine) plus the tokenizers and data of a run.
_GPU_OVERHEAD = {"cuda": int(1.0 * GIB), "cpu": 0}
_HOST_OVERHEAD = {"cuda": int(3.0 * GIB), "cpu": int(0.5 * GIB)}
_WORKER_OVERHEAD = int(0.25 * GIB)  # a forked data-loader worker: tokenizers + its own pages
# Hub checkpoints are safetensors shards of <= 5 GB. Ranks memory-map the same shard, so its pages
# sit once in the (shared) page cache; each rank materialises one full tensor before keeping only
# its ZeRO-3 partition.
_MAX_SHARD_BYTES = 5 * GIB


Phase = Literal["steady", "forward/backward", "optimizer step", "start-up", "checkpoint save"]
_PHASES: tuple[Phase, ...] = (
    "steady",
    "forward/backward",
    "optimizer step",
    "start-up",
    "checkpoint save",
)


@dataclass(frozen=True)
class MemoryItem:
    """One term. ``steady`` terms are always held; the other phases do not overlap, so a peak is
    the steady sum plus the largest phase (activations are freed before the optimizer step)."""

    name: str
    gpu_bytes: int  # per GPU
    cpu_bytes: int  # per node
    note: str = ""
    phase: Phase = "steady"


def peak_bytes(items: Sequence[MemoryItem], value: Callable[[MemoryItem], int]) -> int:
    """Steady terms plus the largest of the other phases."""
    by_phase = dict.fromkeys(_PHASES, 0)
    for item in items:
        by_phase[item.phase] += value(item)
    return by_phase.pop("steady") + max(by_phase.values())


@dataclass(frozen=True)
class TeacherPlacement:
    """Where the teacher's weights live, and what that costs per rank."""

    name: str
    ds_config: str  # the shipped DeepSpeed JSON that selects it
    gpu_bytes: int  # the run's per-GPU peak with this placement
    cpu_bytes: int  # per-node host peak
    traffic: str  # weights moved per teacher forward, per GPU


@dataclass
class MemoryPlan:
    world_size: int
    gpus_per_node: int
    accelerator: Accelerator
    student: ModelSize
    teacher: ModelSize | None
    items: list[MemoryItem]
    alternatives: dict[str, int] = field(default_factory=dict)  # per-GPU peaks if a knob flips
    warnings: list[str] = field(default_factory=list)
    placements: list[TeacherPlacement] = field(default_factory=list)  # teacher options compared
    recommended: str | None = None  # the placement name the planner advises
    # ``deepspeed.student_config: auto``: each student JSON's per-GPU peak and the one chosen.
    student_stages: dict[str, int] = field(default_factory=dict)
    student_choice: str | None = None
    # What a teacher cache (``teacher_cache``) would store and free; empty without a teacher.
    teacher_cache: dict[str, Any] = field(default_factory=dict)

    @property
    def gpu_bytes(self) -> int:
        """Peak per GPU."""
        return peak_bytes(self.items, lambda item: item.gpu_bytes)

    @property
    def cpu_bytes(self) -> int:
        """Peak host memory per node, besides what a CPU-only run keeps in place of GPU memory."""
        return peak_bytes(self.items, lambda item: item.cpu_bytes)

    @property
    def host_bytes(self) -> int:
        """Peak host RAM per node; on a CPU-only run the "GPU" terms live in host RAM too."""
        ranks = self.gpus_per_node if self.accelerator == "cpu" else 0
        return peak_bytes(self.items, lambda item: item.cpu_bytes + ranks * item.gpu_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "gpus_per_node": self.gpus_per_node,
            "accelerator": self.accelerator,
            "student": asdict(self.student),
            "teacher": asdict(self.teacher) if self.teacher else None,
            "items": [asdict(item) for item in self.items],
            "gpu_bytes": self.gpu_bytes,
            "cpu_bytes": self.cpu_bytes,
            "host_bytes": self.host_bytes,
            "alternatives": dict(self.alternatives),
            "student_stages": dict(self.student_stages),
            "student_choice": self.student_choice,
            "teacher_cache": dict(self.teacher_cache),
            "warnings": list(self.warnings),
            "teacher_placements": [asdict(placement) for placement in self.placements],
            "recommended_teacher_placement": self.recommended,
        }

    def to_table(self) -> str:
        header = ("term", "phase", "per GPU (GiB)", "per node CPU (GiB)", "note")
        rows = [
            (item.name, item.phase, gib_text(item.gpu_bytes), gib_text(item.cpu_bytes), item.note)
            for item in self.items
        ]
        rows.append(
            (
                "peak",
                "steady + largest phase",
                gib_text(self.gpu_bytes),
                gib_text(self.cpu_bytes),
                "",
            )
        )
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
        lines = [self._title()]
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [row[2].rjust(widths[2]), row[3].rjust(widths[3]), row[4]]
            lines.append("  ".join(cells).rstrip())
        lines += [
            f"if {name}: {gib_text(value)} GiB per GPU" for name, value in self.alternatives.items()
        ]
        lines += self._student_stage_lines()
        lines += self._teacher_cache_lines()
        lines += self._placement_lines()
        lines += [f"warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)

    def _teacher_cache_lines(self) -> list[str]:
        cache = self.teacher_cache
        if not cache:
            return []
        disk = cache.get("disk_bytes_at_most")
        size = f", at most {gib_text(disk)} GiB for {cache['views']} views" if disk else ""
        return [
            f"teacher cache: {cache['bytes_per_position']} bytes per cached position "
            f"({cache['layers']} layers){size}; training from it needs "
            f"{gib_text(cache['gpu_bytes'])} GiB per GPU (frees "
            f"{gib_text(self.gpu_bytes - cache['gpu_bytes'])}) and "
            f"{gib_text(cache['cpu_bytes'])} GiB per node CPU (frees "
            f"{gib_text(self.cpu_bytes - cache['cpu_bytes'])})"
        ]

    def _student_stage_lines(self) -> list[str]:
        if not self.student_stages:
            return []
        stages = ", ".join(f"{name} {gib_text(b)} GiB" for name, b in self.student_stages.items())
        return [f"student_config auto: {self.student_choice} (per-GPU peak with {stages})"]

    def _placement_lines(self) -> list[str]:
        if not self.placements:
            return []
        header = ("teacher placement", "per GPU (GiB)", "per node CPU (GiB)", "moved per forward")
        rows = [
            (
                f"{p.name}{' (recommended)' if p.name == self.recommended else ''}",
                gib_text(p.gpu_bytes),
                gib_text(p.cpu_bytes),
                p.traffic,
            )
            for p in self.placements
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
        lines = []
        for row in [header, *rows]:
            cells = [row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].rjust(widths[2])]
            lines.append("  ".join([*cells, row[3]]).rstrip())
        chosen = next((p for p in self.placements if p.name == self.recommended), None)
        if chosen is not None:
            lines.append(f"recommended: deepspeed.teacher_config={chosen.ds_config}")
        return lines

    def _title(self) -> str:
        teacher = f", teacher {_params(self.teacher)}" if self.teacher else ""
        return (
            f"memory plan: world size {self.world_size}, {self.gpus_per_node} per node "
            f"({self.accelerator}); student {_params(self.student)}{teacher}"
        )


def gib_text(num_bytes: int) -> str:
    return f"{num_bytes / GIB:.2f}"


def _params(size: ModelSize) -> str:
    return f"{size.model_type} {_count(size.num_params)} params ({size.source})"


def _count(number: int) -> str:
    for unit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if number >= unit:
            return f"{number / unit:.2f}{suffix}"
    return str(number)


@dataclass(frozen=True)
class PlanSetting:
    """What the memory terms need from the run config, resolved once."""

    run: RunConfig
    world_size: int
    gpus_per_node: int
    accelerator: Accelerator
    bytes_per_value: int  # model dtype
    student_ds: dict[str, Any]
    teacher_ds: dict[str, Any] | None

    @property
    def batch(self) -> int:
        return self.run.train.micro_batch_size

    @property
    def seq_len(self) -> int:
        return self.run.data.max_total_tokens

    @property
    def num_passes(self) -> int:
        """Forward passes per model and micro-batch: CoT records add one on their standard
        view (docs/method.md section 2); planned for the worst case, every record a CoT record."""
        cot = self.run.cot2align.enabled and self.run.data.cot_records != "none"
        return 2 if cot else 1

    @property
    def teacher_rows_per_call(self) -> int:
        """Rows in one teacher forward: both views in one call when they are fused."""
        fused = self.run.cot2align.fuse_teacher_views
        return self.batch * (self.num_passes if fused else 1)

    @property
    def logit_rows(self) -> dict[str, int]:
        """Sequences whose full logits a micro-batch holds, per model: a standard-view pass
        computes its LM head on the last position only, unless it rides in the fused teacher
        call."""
        return {"student": self.batch, "teacher": self.teacher_rows_per_call}

    @property
    def needs_hidden_states(self) -> bool:
        return needs_hidden_states(self.run.distill.method, self.run.cot2align.enabled)


def _zero(ds: dict[str, Any]) -> dict[str, Any]:
    return ds.get("zero_optimization", {})


def _offload(ds: dict[str, Any], key: str) -> str:
    return (_zero(ds).get(key) or {}).get("device", "none")


def _live_params(size: ModelSize, ds: dict[str, Any], *, training: bool) -> int:
    """Parameters a ZeRO-3 engine holds gathered at once.

    DeepSpeed keeps a gathered parameter instead of releasing it when its next use comes within
    ``stage3_max_reuse_distance`` elements (and ``stage3_max_live_parameters`` allows it). In
    training the next use is the backward of the same step, so a model up to that size stays
    fully gathered between forward and backward; a forward-only teacher's next use is its next
    forward, a whole model away. Otherwise: the module being run plus the prefetch bucket.
    """
    zero = _zero(ds)
    cap = min(
        float(zero.get("stage3_max_reuse_distance", 1e9)),
        float(zero.get("stage3_max_live_parameters", 1e9)),
    )
    working = size.largest_module_params + int(zero.get("stage3_prefetch_bucket_size", 0))
    if training:
        return int(min(size.num_params, max(cap, working)))
    return size.num_params if size.num_params <= cap else min(size.num_params, working)


def _student_states(
    setting: PlanSetting, student: ModelSize, frozen: int, trainable: int
) -> list[MemoryItem]:
    """Weights, gradients and Adam states of the student engine, split by ZeRO partitioning.

    DeepSpeed's ZeRO optimizers keep an fp32 master copy whatever the precision (a clone even
    in fp32), so the optimizer holds 12 bytes per trainable parameter: master + two moments.
    """
    ds, world, p = setting.student_ds, setting.world_size, setting.bytes_per_value
    stage = int(_zero(ds).get("stage", 0))
    totals = {
        "weights": (trainable + frozen) * p,
        "gradients": trainable * p,
        "optimizer": trainable * 12,
    }
    split = {"weights": stage >= 3, "gradients": stage >= 2, "optimizer": stage >= 1}
    items = []
    for name, total in totals.items():
        share = total // world if split[name] else total
        offloaded = name == "optimizer" and _offload(ds, "offload_optimizer") == "cpu"
        offloaded |= name == "weights" and _offload(ds, "offload_param") == "cpu"
        gpu, cpu = (0, share * setting.gpus_per_node) if offloaded else (share, 0)
        note = f"ZeRO-{stage}, " + (f"/{world}" if split[name] else "replicated")
        items.append(
            MemoryItem(f"student {name}", gpu, cpu, note + (", CPU offload" if offloaded else ""))
        )
    items.append(_student_buffers(setting, student, frozen + trainable, stage))
    items.append(_optimizer_step(setting, trainable, stage))
    return items


def _student_buffers(
    setting: PlanSetting, student: ModelSize, num_params: int, stage: int
) -> MemoryItem:
    zero, p = _zero(setting.student_ds), setting.bytes_per_value
    reduce_bucket = int(zero.get("reduce_bucket_size", 0)) * p
    if stage >= 3:
        engine = replace(student, num_params=num_params)  # LoRA adapters + projectors included
        live = _live_params(engine, setting.student_ds, training=True) * p
        note = "gathered params kept to backward + reduce bucket"
        return MemoryItem("student ZeRO buffers", live + reduce_bucket, 0, note, "forward/backward")
    allgather = int(zero.get("allgather_bucket_size", 0)) * p
    note = "reduce + allgather buckets"
    return MemoryItem(
        "student ZeRO buffers", reduce_bucket + allgather, 0, note, "forward/backward"
    )


def _optimizer_step(setting: PlanSetting, trainable: int, stage: int) -> MemoryItem:
    """The step's temporaries: fp32 gradients for the master copy, and Adam's ``denom`` and
    update (two fp32 tensors), per ZeRO-3 sub-group (``sub_group_size`` elements) at a time."""
    share = trainable // setting.world_size if stage >= 1 else trainable
    sub_group = int(float(_zero(setting.student_ds).get("sub_group_size", 1e9)))
    temporaries = 4 * share + 8 * min(share, sub_group)
    offloaded = _offload(setting.student_ds, "offload_optimizer") == "cpu"
    gpu, cpu = (0, temporaries * setting.gpus_per_node) if offloaded else (temporaries, 0)
    return MemoryItem("optimizer step", gpu, cpu, "fp32 grads + Adam temporaries", "optimizer step")


def _teacher_states(setting: PlanSetting, teacher: ModelSize) -> list[MemoryItem]:
    """A frozen teacher: replicated (ZeRO stage 0), or ZeRO-3 16-bit partitions, resident
    (with a second, node-local partition under hpZ) or offloaded to CPU/NVMe."""
    ds, p, ranks = setting.teacher_ds or {}, setting.bytes_per_value, setting.gpus_per_node
    if _zero(ds).get("stage", 3) == 0:
        full = teacher.num_params * p
        return [MemoryItem("teacher weights", full, 0, "replicated on every GPU (stage 0)")]
    partition = teacher.num_params * p // setting.world_size
    threshold = float(_zero(ds).get("stage3_param_persistence_threshold", 0) or 0)
    if threshold >= teacher.largest_module_params and _offload(ds, "offload_param") == "none":
        # Every weight is persistent: gathered at the first traced forward and never released.
        return [
            MemoryItem("teacher weights", partition, 0, f"ZeRO-3, /{setting.world_size}"),
            MemoryItem("teacher persistent copy", teacher.num_params * p, 0,
                       "gathered once, kept (persistence threshold)"),
        ]  # fmt: skip
    hpz = int(_zero(ds).get("zero_hpz_partition_size", 1) or 1)
    extra = []
    if hpz > 1:
        secondary = teacher.num_params * p // hpz
        extra = [MemoryItem("teacher node partition", secondary, 0, f"hpZ, /{hpz} within a node")]
    live = _live_params(teacher, ds, training=False) * p
    note = (
        "fully gathered (within reuse distance)"
        if live == teacher.num_params * p
        else "gathered module + prefetch"
    )
    buffers = MemoryItem("teacher ZeRO buffers", live, 0, note, "forward/backward")
    device = _offload(ds, "offload_param")
    if device == "cpu":
        return [
            MemoryItem("teacher weights", 0, partition * ranks, "ZeRO-3 partitions, pinned CPU"),
            buffers,
        ]
    if device == "nvme":
        offload = _zero(ds).get("offload_param", {})
        pinned = (
            int(offload.get("buffer_count", 5)) * int(float(offload.get("buffer_size", 1e8))) * p
        )
        return [
            MemoryItem("teacher weights", 0, 0, "ZeRO-3 partitions on NVMe"),
            MemoryItem("teacher NVMe buffers", 0, pinned * ranks, "pinned, per rank"),
            buffers,
        ]
    return [
        MemoryItem("teacher weights", partition, 0, f"ZeRO-3, /{setting.world_size}"),
        *extra,
        buffers,
    ]


def layer_activation_bytes(size: ModelSize, batch: int, seq_len: int, bytes_per_value: int) -> int:
    """Activations one transformer layer keeps for backward (fused attention, no s^2 term)."""
    mlp = 8 if size.gated_mlp else 4
    per_token_16bit = 18 * size.hidden_size + mlp * size.intermediate_size
    return batch * seq_len * per_token_16bit * bytes_per_value // 2


def activation_bytes(
    size: ModelSize, batch: int, seq_len: int, bytes_per_value: int, *, checkpointing: bool
) -> int:
    """Training activations of all layers; checkpointing keeps each layer's input only and
    recomputes one layer at a time."""
    layer = layer_activation_bytes(size, batch, seq_len, bytes_per_value)
    if not checkpointing:
        return size.num_layers * layer
    inputs = size.num_layers * batch * seq_len * size.hidden_size * bytes_per_value
    return inputs + layer


def _activation_items(
    setting: PlanSetting, student: ModelSize, teacher: ModelSize | None, checkpointing: bool
) -> list[MemoryItem]:
    b, s, p = setting.batch, setting.seq_len, setting.bytes_per_value
    passes = setting.num_passes  # every pass's graph is kept until the one backward
    student_bytes = activation_bytes(student, passes * b, s, p, checkpointing=checkpointing)
    note = f"{passes} pass(es), " + ("checkpointing" if checkpointing else "no checkpointing")
    items = [MemoryItem("student activations", student_bytes, 0, note, "forward/backward")]
    if teacher is not None:
        # No grad: one layer's working set at a time, plus every hidden state the losses read.
        kept = (teacher.num_layers + 1) * passes * b * s * teacher.hidden_size * p
        kept = kept if setting.needs_hidden_states else 0
        transient = layer_activation_bytes(teacher, setting.teacher_rows_per_call, s, p)
        note = "forward only" + (", hidden states kept" if kept else "")
        items.append(
            MemoryItem("teacher activations", kept + transient, 0, note, "forward/backward")
        )
    return items


def logits_bytes(
    *,
    batch: int,
    seq_len: int,
    vocab_size: int,
    bytes_per_value: int,
    fp32_copies: int,
    chunk_size: int | None,
    trainable: bool,
) -> int:
    """Model logits (and their gradient when training) plus the loss's fp32 copies.

    The loss gathers the response rows (one more copy in the model dtype) and builds
    ``fp32_copies`` fp32 intermediates of rows x vocab: over all B x L rows at once, or over
    ``chunk_size`` rows at a time when chunking is on.
    """
    rows = batch * seq_len
    outputs = (3 if trainable else 2) * rows * vocab_size * bytes_per_value
    loss_rows = min(rows, chunk_size) if chunk_size else rows
    return outputs + fp32_copies * loss_rows * vocab_size * 4


def _logit_items(
    setting: PlanSetting, student: ModelSize, teacher: ModelSize | None, chunk_size: int | None
) -> list[MemoryItem]:
    copies = dict(
        zip(
            ("student", "teacher"), get_method(setting.run.distill.method).logit_copies, strict=True
        )
    )
    note = f"chunks of {chunk_size} rows" if chunk_size else "unchunked"
    items = []
    for role, size in (("student", student), ("teacher", teacher)):
        if size is None:
            continue
        value = logits_bytes(
            batch=setting.logit_rows[role],
            seq_len=setting.seq_len,
            vocab_size=size.vocab_size,
            bytes_per_value=setting.bytes_per_value,
            fp32_copies=copies[role],
            chunk_size=chunk_size,
            trainable=role == "student",
        )
        items.append(MemoryItem(f"{role} logits", value, 0, note, "forward/backward"))
    return items


def ot_bytes(
    *,
    batch: int,
    student_len: int,
    teacher_len: int,
    num_layer_pairs: int,
    num_views: int,
    num_grad_iters: int,
    memory_budget_bytes: int | None = None,
) -> int:
    """CoT2Align OT memory: per layer pair and view, the attention cost (scores, softmax and the
    cost itself, kept for backward) and the plan; plus the Sinkhorn solver's working memory,
    kept for backward when it is differentiated without a memory budget."""
    entries = batch * student_len * teacher_len * 4
    solver = batch * sinkhorn_problem_bytes(student_len, teacher_len, num_grad_iters=num_grad_iters)
    if memory_budget_bytes is not None:
        one = sinkhorn_problem_bytes(student_len, teacher_len, num_grad_iters=num_grad_iters)
        solver = min(solver, max(memory_budget_bytes, one))
    kept_solver = solver if num_grad_iters and memory_budget_bytes is None else entries
    return num_layer_pairs * num_views * (3 * entries + kept_solver) + solver


def _ot_item(setting: PlanSetting) -> MemoryItem | None:
    ot = setting.run.cot2align
    if not ot.enabled:
        return None
    cross = ot.cross_cot and setting.run.data.cot_records != "none"
    views = 3 if cross else 1  # (main, main) + the two Cross-CoT directions
    truncated = min(int(getattr(ot, "num_grad_iters", 10)), ot.num_iters)
    grad_iters = {"unrolled": ot.num_iters, "envelope": 0}.get(ot.grad_mode, truncated)
    budget = int(ot.memory_budget_mb * 2**20) if ot.memory_budget_mb else None
    value = ot_bytes(
        batch=setting.batch,
        student_len=setting.seq_len,
        teacher_len=setting.seq_len,
        num_layer_pairs=len(ot.layer_pairs),
        num_views=views,
        num_grad_iters=grad_iters,
        memory_budget_bytes=budget,
    )
    note = f"{len(ot.layer_pairs)} layer pairs x {views} views, {ot.grad_mode}"
    return MemoryItem("OT buffers", value, 0, note, "forward/backward")


def _process_items(
    setting: PlanSetting, teacher: ModelSize | None, student: ModelSize
) -> list[MemoryItem]:
    """Fixed per-process costs, data-loader workers, and reading checkpoints at start-up."""
    ranks, acc = setting.gpus_per_node, setting.accelerator
    workers = setting.run.data.num_workers * _WORKER_OVERHEAD * ranks
    items = [
        MemoryItem(
            "runtime overhead",
            _GPU_OVERHEAD[acc],
            _HOST_OVERHEAD[acc] * ranks,
            f"{acc} process x {ranks}",
        ),
        MemoryItem("data-loader workers", 0, workers, f"{setting.run.data.num_workers} per rank"),
    ]
    # Models built from an architecture read no checkpoint.
    specs = ((student, setting.run.student), (teacher, setting.run.teacher))
    loaded = [size for size, spec in specs if size is not None and spec and spec.name_or_path]
    p = setting.bytes_per_value
    shard = min(max((size.num_params for size in loaded), default=0) * p, _MAX_SHARD_BYTES)
    tensor = max((size.largest_module_params for size in loaded), default=0) * p
    note = "a shard (shared page cache) + a tensor per rank"
    items.append(MemoryItem("checkpoint reading", 0, shard + tensor * ranks, note, "start-up"))
    # Saving gathers the whole student state dict into rank 0's host memory.
    note = "rank 0 gathers the state dict"
    items.append(MemoryItem("student save", 0, student.num_params * p, note, "checkpoint save"))
    return items


def _student_param_counts(
    run: RunConfig, student: ModelSize, teacher: ModelSize | None
) -> tuple[int, int]:
    """(frozen, trainable) parameters of the student engine: a LoRA student freezes its base
    weights and trains adapters; the distillation projectors always train."""
    lora = run.student.lora
    frozen = student.num_params if lora else 0
    trainable = student.lora_params(lora.r, lora.target_modules) if lora else student.num_params
    if teacher is not None:
        trainable += projector_params(
            run.distill.method, run.cot2align.enabled, student.hidden_size, teacher.hidden_size
        )
    return frozen, trainable


def memory_items(
    setting: PlanSetting,
    student: ModelSize,
    teacher: ModelSize | None,
    checkpointing: bool,
    chunk_size: int | None,
) -> list[MemoryItem]:
    frozen, trainable = _student_param_counts(setting.run, student, teacher)
    items = _student_states(setting, student, frozen, trainable)
    if teacher is not None:
        items += _teacher_states(setting, teacher)
    items += _activation_items(setting, student, teacher, checkpointing)
    items += _logit_items(setting, student, teacher, chunk_size)
    items += [item for item in [_ot_item(setting)] if item is not None]
    return items + _process_items(setting, teacher, student)


def build_plan(
    setting: PlanSetting, student: ModelSize, teacher: ModelSize | None, checkpointing: bool
) -> MemoryPlan:
    chunk = setting.run.distill.chunk_size
    items = memory_items(setting, student, teacher, checkpointing, chunk)
    plan = MemoryPlan(
        setting.world_size, setting.gpus_per_node, setting.accelerator, student, teacher, items
    )
    # Per-GPU peaks with one knob flipped, so the table says what a change would buy.
    label = f"train.gradient_checkpointing={'false' if checkpointing else 'true'}"
    flips = {label: (not checkpointing, chunk)}
    if chunk is None:
        flips["distill.chunk_size=1024"] = (checkpointing, 1024)
    for label, (flip_checkpointing, flip_chunk) in flips.items():
        flipped = memory_items(setting, student, teacher, flip_checkpointing, flip_chunk)
        plan.alternatives[label] = peak_bytes(flipped, lambda item: item.gpu_bytes)
    return plan
