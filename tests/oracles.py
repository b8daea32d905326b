"""Plain per-sample reference implementations of the losses and their composition, written from
the method's description (docs/method.md) in float64, one record and one position at a time:
no batching, no chunking, no padding tricks, no fused kernels. ``tests/unit/test_oracles.py``
checks the optimized objective against them on real tokenizer pairs, gradients included.

Every function takes one record's tensors (positions already restricted to the response, in
order) unless it says otherwise, and returns a float64 scalar sum over that record.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F64 = torch.float64


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return torch.log_softmax(logits.to(F64) / temperature, dim=-1)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension, with 0 log 0 = 0."""
    p = p_log.exp()
    return (p * torch.where(p > 0, p_log - q_log, 0.0)).sum(-1)


def divergence(student_logits, teacher_logits, kind: str, temperature: float, skew: float):
    """The KL-type divergence of one position (q = student, p = teacher)."""
    q, p = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    if kind == "forward_kl":
        return kl(p, q)
    if kind == "reverse_kl":
        return kl(q, p)
    if kind == "js":
        m = torch.log((p.exp() + q.exp()) / 2)
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)
    if kind == "skew_forward_kl":
        return kl(p, torch.log(skew * p.exp() + (1 - skew) * q.exp()))
    if kind == "skew_reverse_kl":
        return kl(q, torch.log(skew * q.exp() + (1 - skew) * p.exp()))
    raise ValueError(kind)


def cross_entropy(logits_KV: torch.Tensor, labels_K: torch.Tensor) -> torch.Tensor:
    return -sum(log_probs(logits_KV[k])[labels_K[k]] for k in range(len(labels_K)))


def uld(student_KV: torch.Tensor, teacher_JW: torch.Tensor, temperature: float = 1.0):
    """L1 between descending-sorted probability vectors, answers start-aligned, the longer one
    truncated, the shorter vocabulary zero-padded."""
    total = torch.zeros((), dtype=F64)
    for k in range(min(len(student_KV), len(teacher_JW))):
        p = log_probs(student_KV[k], temperature).exp().sort(descending=True).values
        q = log_probs(teacher_JW[k], temperature).exp().sort(descending=True).values
        width = max(len(p), len(q))
        total = total + (F.pad(p, (0, width - len(p))) - F.pad(q, (0, width - len(q)))).abs().sum()
    return total


def mined(student_KV, teacher_TW, labels_K, aligned_K, vocab_map_W, temperature, projection):
    """Per student response position: KL(target || student) where the position is aligned
    one-to-one with a teacher position (the teacher distribution moved onto student ids: every
    mapped teacher id adds its probability, or only the first teacher id of each student id
    does), the gold one-hot elsewhere or where no teacher mass maps."""
    vocab = student_KV.shape[-1]
    kept_teacher, kept_student, used = [], [], set()
    for w, v in enumerate(vocab_map_W.tolist()):
        if 0 <= v < vocab and not (projection == "first" and v in used):
            kept_teacher.append(w)
            kept_student.append(v)
            used.add(v)
    kept_teacher, kept_student = torch.tensor(kept_teacher), torch.tensor(kept_student)
    total = torch.zeros((), dtype=F64)
    for k in range(len(labels_K)):
        target = torch.zeros(vocab, dtype=F64)
        if aligned_K[k] >= 0:
            p = log_probs(teacher_TW[aligned_K[k]], temperature).exp()
            target.index_add_(0, kept_student, p[kept_teacher])
        if target.sum() == 0:
            target[labels_K[k]] = 1.0
        target = target / target.sum()
        total = total + kl(torch.log(target), log_probs(student_KV[k], temperature))
    return total


def dskd_cma(record: dict, batch_stats: dict, projectors, heads, cfg) -> dict[str, torch.Tensor]:
    """DSKD with cross-model attention for one record (``record``: response-position tensors),
    with the batch-level standard deviations the keys and values are scaled by."""
    query = projectors["query"]
    q = query(torch.cat([record["s_in"], record["s_tgt"]], -1).to(query.weight.dtype)).to(F64)
    k = torch.cat([record["t_in"], record["t_tgt"]], -1).to(F64) / batch_stats["key_std"]
    scores = q @ k.T / math.sqrt(k.shape[-1])
    t2s_attention = torch.softmax(scores, dim=1)  # each student position over teacher positions
    s2t_attention = torch.softmax(scores.T, dim=1)  # each teacher position over student ones
    values_in = (
        record["t_hidden"].to(F64) / batch_stats["hidden_std"]
        + record["t_tgt"].to(F64) / batch_stats["target_std"]
    )
    t2s = projectors["t2s"]
    t2s_hidden = t2s_attention @ t2s(values_in.to(t2s.weight.dtype)).to(F64)
    s2t = projectors["s2t"]
    s2t_hidden = s2t_attention @ s2t(record["s_hidden"].to(s2t.weight.dtype)).to(F64)
    t2s_logits = t2s_hidden @ heads["student"].to(F64).T
    s2t_logits = s2t_hidden @ heads["teacher"].to(F64).T
    labels = record["s_labels"]
    out = {"ce": torch.zeros((), dtype=F64), "kd": torch.zeros((), dtype=F64)}
    for i in range(len(labels)):
        out["ce"] = out["ce"] - log_probs(t2s_logits[i])[labels[i]]
        if int(t2s_logits[i].argmax()) == int(labels[i]):  # distil only where it is right
            out["kd"] = out["kd"] + divergence(
                record["s_logits"][i], t2s_logits[i].detach(), cfg.divergence, cfg.temperature,
                cfg.skew,
            )  # fmt: skip
    # Teacher space: KL(teacher || projected student), whatever divergence the t2s side uses.
    out["s2t"] = sum(
        divergence(s2t_logits[j], record["t_logits"][j].detach(), "forward_kl",
                   cfg.temperature, cfg.skew)
        for j in range(len(s2t_logits))
    )  # fmt: skip
    return out


def dskd_same_vocab(record: dict, projectors, heads, cfg) -> dict[str, torch.Tensor]:
    """DSKD for a shared tokenizer, one record: each position's teacher hidden state projected
    into the student space (t2s) and the student's into the teacher space (s2t), through the
    other model's head; no attention, and the t2s KD at every position."""
    t2s, s2t = projectors["t2s"], projectors["s2t"]
    t2s_logits = t2s(record["t_hidden"].to(t2s.weight.dtype)).to(F64) @ heads["student"].to(F64).T
    s2t_logits = s2t(record["s_hidden"].to(s2t.weight.dtype)).to(F64) @ heads["teacher"].to(F64).T
    labels = record["s_labels"]
    out = {"ce": torch.zeros((), dtype=F64), "kd": torch.zeros((), dtype=F64)}
    out["s2t"] = torch.zeros((), dtype=F64)
    for i in range(len(labels)):
        out["ce"] = out["ce"] - log_probs(t2s_logits[i])[labels[i]]
        out["kd"] = out["kd"] + divergence(
            record["s_logits"][i], t2s_logits[i].detach(), cfg.divergence, cfg.temperature,
            cfg.skew,
        )  # fmt: skip
        out["s2t"] = out["s2t"] + divergence(
            s2t_logits[i], record["t_logits"][i].detach(), "forward_kl", cfg.temperature, cfg.skew
        )
    return out


def sinkhorn_transport(cost_ST: torch.Tensor, epsilon: float, num_iters: int) -> torch.Tensor:
    """Entropic OT with uniform marginals: ``num_iters`` log-domain Sinkhorn iterations (a
    column then a row update) from zero potentials, differentiated through every iteration;
    the transport cost sum_ij P_ij C_ij."""
    cost_ST = cost_ST.to(F64)
    log_a = torch.full((cost_ST.shape[0],), -math.log(cost_ST.shape[0]), dtype=F64)
    log_b = torch.full((cost_ST.shape[1],), -math.log(cost_ST.shape[1]), dtype=F64)
    log_kernel = -cost_ST / epsilon
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for _ in range(num_iters):
        g = log_b - torch.logsumexp(log_kernel + f[:, None], dim=0)
        f = log_a - torch.logsumexp(log_kernel + g[None, :], dim=1)
    plan = torch.exp(log_kernel + f[:, None] + g[None, :])
    return (plan * cost_ST).sum()


def attention_cost(x_SD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
    return 1 - torch.softmax(x_SD.to(F64) @ y_TD.to(F64).T / math.sqrt(x_SD.shape[-1]), dim=1)
