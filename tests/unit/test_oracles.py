"""The optimized objective against plain per-sample oracles (``tests/oracles.py``): real
collated batches of two genuinely different tokenizers (the trained test pair, and the real
Gemma-3 / SmolLM2 pair when installed), random model outputs, every method with CoT2Align on
top, in the reference's normalisation: ``(1 - a) CE/token + a (KD/token + OT)``, the OT groups
averaged over the records they cover. Values and gradients (student outputs and projectors).
"""

from __future__ import annotations

from pathlib import Path

import oracles
import pytest
import torch
from transformers import AutoTokenizer

from cot2align_ds.alignment.vocab_map import mined_vocab_map
from cot2align_ds.config import validate_config
from cot2align_ds.data.collator import DistillCollator
from cot2align_ds.data.examples import make_examples
from cot2align_ds.data.records import read_records
from cot2align_ds.methods import NORMALISERS
from cot2align_ds.models.real_models import default_cache_dir
from cot2align_ds.train.objective import (
    ModelAccess,
    ModelOutputs,
    Objective,
    StepOutputs,
    batch_normalisers,
    first_teacher_id_only,
)

F64 = oracles.F64
D, H = 12, 20  # student and teacher hidden sizes of the random outputs


def _tokenizers(workspace, pair: str):
    if pair == "trained":
        paths = workspace["student_tok"], workspace["teacher_tok"]
    elif pair == "same":  # one tokenizer on both sides, for same-vocabulary DSKD
        paths = workspace["student_tok"], workspace["student_tok"]
    else:
        root = default_cache_dir()
        paths = root / "smollm2-135m-instruct", root / "gemma3-270m"
        if not all((path / "tokenizer.json").is_file() for path in paths):
            pytest.skip("the real models are not installed (make real-models)")
    return tuple(AutoTokenizer.from_pretrained(Path(path)) for path in paths)


def _config(method: str, **switches):
    distill = {"method": method, "kd_rate": 0.6, "temperature": 2.0, "divergence": "js"}
    distill.update(switches.pop("distill", {}))
    cot2align = {"enabled": True, "epsilon": 10.0, "num_iters": 20, "grad_mode": "unrolled"}
    cot2align.update(switches.pop("cot2align", {}))
    return validate_config(
        {
            "student": {"name_or_path": "s"},
            "teacher": {"name_or_path": "t"},
            "data": {"cot_records": "all"},
            "distill": distill,
            "cot2align": cot2align,
        }
    )


class _Case:
    """A collated batch, random outputs as leaves, the objective's inputs and the oracle's."""

    def __init__(self, workspace, pair: str, config, num_examples: int = 4) -> None:
        student_tok, teacher_tok = _tokenizers(workspace, pair)
        records = [r for r in read_records(workspace["train"]) if r.rationale][:2]
        examples = make_examples(records, template="compact", cot_records="all")[:num_examples]
        self.vocab_map = None  # MinED's raw map: the oracle projects with it itself
        if config.distill.method == "mined":
            # The real pair's map (a minute to build) is cached where the real tier keeps it.
            cache = default_cache_dir() / "vocab_maps" if pair == "real" else None
            vocab_map = mined_vocab_map(teacher_tok, student_tok, cache_dir=cache)
            self.vocab_map = torch.from_numpy(vocab_map).long()
        self.objective = Objective(
            config.distill, config.cot2align, teacher_to_student_vocab_W=self.vocab_map
        )
        collator = DistillCollator(
            student_tok, teacher_tok, max_prompt_tokens=40, max_total_tokens=72,
            cot_views=True, alignment=self.objective.alignment, vocab_map=self.vocab_map,
        )  # fmt: skip
        self.batch = collator(examples)
        self.config = config
        generator = torch.Generator().manual_seed(0)
        vocab_s, vocab_t = len(student_tok), len(teacher_tok)

        def leaf(*shape, scale=1.0):
            return (torch.randn(*shape, generator=generator) * scale).requires_grad_()

        def outputs(side, vocab, width):
            batch, length = side.input_ids.shape
            hidden = (leaf(batch, length, width), leaf(batch, length, width))
            return ModelOutputs(leaf(batch, length, vocab, scale=3.0), hidden)

        standard = self.batch.standard
        self.outputs = StepOutputs(
            outputs(self.batch.student, vocab_s, D),
            outputs(self.batch.teacher, vocab_t, H),
            outputs(standard.student, vocab_s, D),
            outputs(standard.teacher, vocab_t, H),
        )
        self.tables = {"student": torch.randn(vocab_s, D, generator=generator),
                       "teacher": torch.randn(vocab_t, H, generator=generator)}  # fmt: skip
        self.heads = {"student": torch.randn(vocab_s, D, generator=generator) * 0.3,
                      "teacher": torch.randn(vocab_t, H, generator=generator) * 0.3}  # fmt: skip
        torch.manual_seed(0)
        self.projectors = self.objective.build_projectors(D, H)
        self.access = ModelAccess(
            student_embed=lambda ids: self.tables["student"][ids],
            teacher_embed=lambda ids: self.tables["teacher"][ids],
            student_head_weight=lambda: self.heads["student"],
            teacher_head_weight=lambda: self.heads["teacher"],
        )

    def leaves(self):
        out = []
        for view in (self.outputs.student, self.outputs.student_standard):
            out += [view.logits, *view.hidden_states]
        return out + list(self.projectors.parameters())

    def window(self) -> dict[str, torch.Tensor]:
        """The counts of a window of this one micro-batch on one rank."""
        counts = batch_normalisers(self.batch).clamp_min(1).to(torch.float32)
        return dict(zip(NORMALISERS, counts.unbind(), strict=True))

    def terms(self, window: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        args = (self.batch, self.outputs, self.projectors, self.access, window or self.window())
        return self.objective(*args).terms

    def optimized(self) -> torch.Tensor:
        args = (self.batch, self.outputs, self.projectors, self.access, self.window())
        return self.objective(*args).total


def _positions(side, row: int) -> torch.Tensor:
    return (side.labels[row] != -100).nonzero().squeeze(1)


def _oracle_total(case: _Case) -> torch.Tensor:
    """The composition, record by record, in the reference's normalisation."""
    cfg, ot = case.config.distill, case.config.cot2align
    batch, outputs = case.batch, case.outputs
    ce = kd = torch.zeros((), dtype=F64)
    num_tokens = 0
    records = []
    for row in range(batch.student.input_ids.shape[0]):
        s_pos, t_pos = _positions(batch.student, row), _positions(batch.teacher, row)
        s_logits = outputs.student.logits[row, s_pos]
        labels = batch.student.labels[row, s_pos]
        t_logits = outputs.teacher.logits[row, t_pos]
        num_tokens += len(s_pos)
        ce = ce + oracles.cross_entropy(s_logits, labels)
        records.append((row, s_pos, t_pos, s_logits, labels, t_logits))
        if cfg.method == "uld":
            kd = kd + oracles.uld(s_logits, t_logits, cfg.uld_temperature)
        elif cfg.method == "mined":
            aligned = batch.aligned_teacher_pos_BS[row, s_pos]
            full_t = outputs.teacher.logits[row]
            kd = kd + oracles.mined(
                s_logits, full_t, labels, aligned, case.vocab_map,
                cfg.temperature, cfg.mined_projection,
            )  # fmt: skip
    if cfg.method == "dskd_cma":
        kd = kd + _oracle_dskd_cma(case, records)
    if cfg.method == "dskd":
        for row, s_pos, _t_pos, s_logits, labels, _t_logits in records:
            record = {
                "t_hidden": outputs.teacher.hidden_states[-1][row, s_pos],
                "s_hidden": outputs.student.hidden_states[-1][row, s_pos],
                "s_logits": s_logits,
                "t_logits": outputs.teacher.logits[row, s_pos],
                "s_labels": labels,
            }
            parts = oracles.dskd_same_vocab(record, case.projectors, case.heads, cfg)
            kd = kd + parts["ce"] + parts["kd"] + parts["s2t"]
    a = cfg.kd_rate
    total = (1 - a) * ce / num_tokens + a * kd / num_tokens
    return total + a * ot.ot_weight * _oracle_ot(case)


def _oracle_dskd_cma(case: _Case, records) -> torch.Tensor:
    batch, outputs, cfg = case.batch, case.outputs, case.config.distill
    s_side, t_side = batch.student, batch.teacher
    t_targets = t_side.labels.clamp_min(0)
    key = torch.cat([case.access.teacher_embed(t_side.input_ids),
                     case.access.teacher_embed(t_targets)], -1).to(F64)  # fmt: skip
    t_hidden, t_target_emb = (
        outputs.teacher.hidden_states[-1].detach(),
        case.access.teacher_embed(t_targets),
    )
    mask = t_side.labels != -100
    if cfg.dskd_std == "padded":
        mask = torch.ones_like(mask)
    stats = {
        "key_std": key[mask].std(),
        "hidden_std": t_hidden[mask].to(F64).std(),
        "target_std": t_target_emb[mask].to(F64).std(),
    }
    total = torch.zeros((), dtype=F64)
    for row, s_pos, t_pos, s_logits, labels, t_logits in records:
        s_targets = s_side.labels[row].clamp_min(0)
        record = {
            "s_in": case.access.student_embed(s_side.input_ids[row, s_pos]),
            "s_tgt": case.access.student_embed(s_targets[s_pos]),
            "t_in": case.access.teacher_embed(t_side.input_ids[row, t_pos]),
            "t_tgt": t_target_emb[row, t_pos],
            "t_hidden": t_hidden[row, t_pos],
            "s_hidden": outputs.student.hidden_states[-1][row, s_pos],
            "s_logits": s_logits,
            "t_logits": t_logits,
            "s_labels": labels,
        }
        parts = oracles.dskd_cma(record, stats, case.projectors, case.heads, cfg)
        total = total + parts["ce"] + parts["kd"] + parts["s2t"]
    return total


def _oracle_ot(case: _Case) -> torch.Tensor:
    batch, outputs, ot = case.batch, case.outputs, case.config.cot2align
    project = case.projectors["ot"]

    def transport(s_out, s_row, s_pos, t_out, t_row, t_pos):
        value = torch.zeros((), dtype=F64)
        for pair in ot.layer_pairs:
            x = s_out.hidden_states[pair.student][s_row, s_pos]
            y = project(t_out.hidden_states[pair.teacher][t_row, t_pos])
            cost = oracles.attention_cost(x, y)
            value = value + pair.weight * oracles.sinkhorn_transport(cost, ot.epsilon, ot.num_iters)
        return value

    rows = batch.student.input_ids.shape[0]
    main = sum(
        transport(outputs.student, r, _positions(batch.student, r),
                  outputs.teacher, r, _positions(batch.teacher, r))
        for r in range(rows)
    )  # fmt: skip
    total = ot.main_weight * main / rows
    standard = batch.standard
    cot_rows = [(c, int(r)) for c, r in enumerate(standard.rows_C) if standard.valid_C[c]]
    if not cot_rows:
        return total
    std_cot = cot_std = torch.zeros((), dtype=F64)
    for c, r in cot_rows:
        s_std, t_std = _positions(standard.student, c), _positions(standard.teacher, c)
        s_main, t_main = _positions(batch.student, r), _positions(batch.teacher, r)
        std_cot = std_cot + transport(
            outputs.student_standard, c, s_std, outputs.teacher, r, t_main
        )
        if not ot.reference_compat:
            cot_std = cot_std + transport(
                outputs.student, r, s_main, outputs.teacher_standard, c, t_std
            )
    return total + (ot.cross_std_cot_weight * std_cot + ot.cross_cot_std_weight * cot_std) / len(
        cot_rows
    )


def _compare(case: _Case, rtol=2e-5):
    optimized = case.optimized()
    leaves = case.leaves()
    grads = torch.autograd.grad(optimized, leaves, allow_unused=True)
    oracle = _oracle_total(case)
    oracle_grads = torch.autograd.grad(oracle, leaves, allow_unused=True)
    torch.testing.assert_close(optimized.double(), oracle, rtol=rtol, atol=1e-7)
    for index, (ours, theirs) in enumerate(zip(grads, oracle_grads, strict=True)):
        if ours is None or theirs is None:
            assert (ours is None or not ours.any()) and (theirs is None or not theirs.any()), index
            continue
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("pair", ["trained", "real"])
@pytest.mark.parametrize("method", ["uld", "mined", "dskd_cma"])
def test_objective_equals_the_per_sample_oracle(workspace, pair, method):
    # The real pair's vocabularies are large (49k, 262k): two examples (a CoT example and its
    # record's standard one) keep the per-position oracle loops short.
    case = _Case(workspace, pair, _config(method), num_examples=4 if pair == "trained" else 2)
    assert case.batch.standard.valid_C.any()  # the Cross-CoT terms are real here
    if method == "dskd_cma":
        _make_some_t2s_predictions_right(case)
    _compare(case)


def _make_some_t2s_predictions_right(case: _Case) -> None:
    """DSKD-CMA distils the t2s logits only where their argmax is the label; random outputs
    are almost never right. Tilt the student head towards the most common label along the
    t2s projector's bias, which every attended value carries (attention rows sum to 1)."""
    labels = case.batch.student.labels
    label = int(labels[labels != -100].mode().values)
    direction = torch.randn(D, generator=torch.Generator().manual_seed(1))
    direction = direction / direction.norm()
    with torch.no_grad():
        case.projectors["t2s"].bias.copy_(3 * direction)
        case.heads["student"][label] += 10 * direction
    assert case.terms()["kd_t2s_kd"] > 0  # the gated KD term is exercised


@pytest.mark.parametrize("switch", ["mined_first", "dskd_padded", "reference_compat"])
def test_the_reference_switches_equal_the_oracle_in_that_mode(workspace, switch):
    method, switches = {
        "mined_first": (
            "mined",
            {"distill": {"mined_projection": "first", "mined_alignment": "dp_reference"}},
        ),
        "dskd_padded": ("dskd_cma", {"distill": {"dskd_std": "padded"}}),
        "reference_compat": ("uld", {"cot2align": {"reference_compat": True}}),
    }[switch]
    case = _Case(workspace, "trained", _config(method, **switches))
    _compare(case)


def test_first_projection_keeps_the_lowest_teacher_id_per_student_id():
    vocab_map = torch.tensor([3, -1, 3, 0, 5, 0, 3, -1])
    assert first_teacher_id_only(vocab_map).tolist() == [3, -1, -1, 0, 5, -1, -1, -1]


def test_same_vocabulary_dskd_equals_the_per_sample_oracle(workspace):
    case = _Case(workspace, "same", _config("dskd"))
    _compare(case)


def test_cross_cot_pooling_per_micro_batch_is_the_references(workspace):
    """``window`` divides the Cross-CoT sums by the window's CoT records (all micro-batches and
    ranks); ``micro_batch`` by this micro-batch's own, as the reference's per-batch mean."""
    cases = {
        pooling: _Case(
            workspace, "trained", _config("uld", cot2align={"cross_cot_pooling": pooling})
        )
        for pooling in ("window", "micro_batch")
    }
    local = float(cases["window"].batch.is_cot_B.sum())
    window = cases["window"].window()
    window["cot_records"] = window["cot_records"] + 3  # other micro-batches of the window
    terms = {pooling: case.terms(window) for pooling, case in cases.items()}
    for name in ("ot_cross_std_cot", "ot_cross_cot_std"):
        expected = terms["window"][name] * (local + 3) / local
        torch.testing.assert_close(terms["micro_batch"][name], expected)
    assert terms["micro_batch"]["ot_main"] == terms["window"]["ot_main"]


def test_reference_dp_alignment_keeps_pairs_whose_input_ids_the_map_agrees_on(workspace):
    case = _Case(
        workspace, "trained", _config("mined", distill={"mined_alignment": "dp_reference"})
    )
    batch, vocab_map = case.batch, case.vocab_map
    kept = 0
    for row in range(batch.student.input_ids.shape[0]):
        for position, teacher_position in enumerate(batch.aligned_teacher_pos_BS[row].tolist()):
            if teacher_position < 0:
                continue
            kept += 1
            # The logits positions' input tokens: the map sends the teacher's to the student's.
            teacher_input = int(batch.teacher.input_ids[row, teacher_position])
            assert int(vocab_map[teacher_input]) == int(batch.student.input_ids[row, position])
    assert kept > 0


def test_dskd_cma_reads_a_rotary_teachers_embeddings_from_hidden_state_0(workspace):
    """A rotary teacher's hidden_states[0] is its token embedding times a constant (Gemma:
    sqrt(hidden)); DSKD-CMA then takes embeddings from there instead of gathering the table,
    with the same loss: keys and values are divided by their std, which cancels the factor."""
    from dataclasses import replace as replace_field

    case = _Case(workspace, "trained", _config("dskd_cma"))
    _make_some_t2s_predictions_right(case)
    teacher = case.outputs.teacher
    embedded = case.tables["teacher"][case.batch.teacher.input_ids] * 3.0
    case.outputs.teacher = ModelOutputs(teacher.logits, (embedded, *teacher.hidden_states[1:]))
    table_total = case.optimized()
    table_grads = torch.autograd.grad(table_total, case.leaves(), allow_unused=True)
    case.access = replace_field(case.access, teacher_embeddings_in_hidden=True)
    case.access.teacher_embed = None  # must not be called
    hidden_total = case.optimized()
    hidden_grads = torch.autograd.grad(hidden_total, case.leaves(), allow_unused=True)
    torch.testing.assert_close(hidden_total, table_total, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(hidden_grads, table_grads, strict=True):
        if ours is not None and theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_dskd_cma_reads_a_rotary_students_embeddings_from_hidden_state_0(workspace):
    """A rotary student with a plain embedding table has hidden_states[0] equal to its token
    embeddings; the query then comes from there (no second embedding call, which would break
    ZeRO-3's module trace), with the same loss and gradients."""
    from dataclasses import replace as replace_field

    case = _Case(workspace, "trained", _config("dskd_cma"))
    _make_some_t2s_predictions_right(case)
    student = case.outputs.student
    # A leaf like the other outputs; the query is built without gradient either way.
    embedded = case.tables["student"][case.batch.student.input_ids].requires_grad_()
    case.outputs.student = ModelOutputs(student.logits, (embedded, *student.hidden_states[1:]))
    table_total = case.optimized()
    table_grads = torch.autograd.grad(table_total, case.leaves(), allow_unused=True)
    case.access = replace_field(case.access, student_embeddings_in_hidden=True)
    case.access.student_embed = None  # must not be called
    hidden_total = case.optimized()
    hidden_grads = torch.autograd.grad(hidden_total, case.leaves(), allow_unused=True)
    torch.testing.assert_close(hidden_total, table_total, rtol=1e-6, atol=1e-7)
    for ours, theirs in zip(hidden_grads, table_grads, strict=True):
        if ours is not None and theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_which_teachers_carry_their_embeddings_in_hidden_state_0():
    from transformers import AutoConfig

    from cot2align_ds.train.setup import embeddings_are_hidden_state_0

    assert embeddings_are_hidden_state_0(AutoConfig.for_model("llama"))
    assert embeddings_are_hidden_state_0(AutoConfig.for_model("qwen2"))
    assert not embeddings_are_hidden_state_0(AutoConfig.for_model("gpt2"))  # + positions
