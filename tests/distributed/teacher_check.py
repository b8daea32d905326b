"""Run under a launcher: the offloaded ZeRO-3 teacher engine must equal the unsharded model.

Usage: torchrun --nproc_per_node 2 teacher_check.py TEACHER_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from cot2align_ds.config import ModelSpec
from cot2align_ds.engine import deepspeed_engines as dse
from cot2align_ds.engine.ds_config import load_ds_config, resolve_teacher_ds_config
from cot2align_ds.models.loading import load_causal_lm, load_tokenizer

# Run as a script under torchrun: the shared test helpers sit one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import is_partitioned  # noqa: E402


def main(teacher_dir: str, out_path: str) -> None:
    ctx = dse.init_distributed(120)
    spec = ModelSpec(name_or_path=teacher_dir)
    tokenizer = load_tokenizer(spec, "teacher")
    raw, path = load_ds_config("teacher_zero3_offload_cpu.json")
    ds_config = resolve_teacher_ds_config(
        raw, path, micro_batch_size=2, world_size=ctx.world_size, precision="fp32", hidden_size=48
    )
    with dse.zero3_loading(ds_config):
        teacher = load_causal_lm(spec, "teacher", tokenizer, "fp32")
    partitioned = all(is_partitioned(p) for p in teacher.parameters())
    engine = dse.build_teacher_engine(teacher, ds_config)
    # Each rank feeds different text: the engine must still gather full weights per forward.
    texts = [f"Rank {ctx.rank}: Mia has {ctx.rank + 3} pens.", "Tom finds 2 cups"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    reference = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        ours = engine(**batch, output_hidden_states=True)
        theirs = reference(**batch, output_hidden_states=True)
    mask = batch["attention_mask"].bool()
    error = (ours.logits[mask] - theirs.logits[mask]).abs().max().item()
    hidden_error = (ours.hidden_states[-1][mask] - theirs.hidden_states[-1][mask]).abs().max()
    result = {
        "world_size": ctx.world_size,
        "partitioned": partitioned,
        "max_logit_error": error,
        "max_hidden_error": hidden_error.item(),
    }
    with open(f"{out_path}.rank{ctx.rank}", "w") as handle:
        json.dump(result, handle)
    dse.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
