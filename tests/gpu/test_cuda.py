"""Checks that need a CUDA GPU (``make gpu-check``; skipped elsewhere): the accelerator and the
collective backend, the OT loss on the GPU against the CPU kernels without host syncs, and a
bf16 DSKD-CMA + CoT2Align run with dev evaluation, a checkpoint and ``--resume auto``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from support import subprocess_env, tiny_run_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_the_accelerator_is_cuda_and_the_collectives_nccl():
    script = (
        "from cot2align_ds.engine import deepspeed_engines as dse\n"
        "import torch.distributed as dist\n"
        "ctx = dse.init_distributed(60)\n"
        "print(ctx.device.type, dist.get_backend())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(),
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-2:] == ["cuda", "nccl"]


@pytest.mark.parametrize("grad_mode", ["truncated", "envelope", "unrolled"])
def test_ot_loss_on_cuda_equals_the_cpu_kernels_without_host_syncs(grad_mode):
    from cot2align_ds.losses.ot.loss import ot_loss

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 40, 64, generator=generator)
    teacher = torch.randn(6, 52, 64, generator=generator)
    masks = (
        torch.rand(6, 40, generator=generator) > 0.2,
        torch.rand(6, 52, generator=generator) > 0.2,
    )
    values, grads = {}, {}
    for device in ("cpu", "cuda"):
        x = student.to(device).requires_grad_()
        y = teacher.to(device).requires_grad_()
        s_mask, t_mask = (m.to(device) for m in masks)
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")  # any host sync in the loss raises
        try:
            loss, _ = ot_loss(x, y, s_mask, t_mask, epsilon=10.0, num_iters=100,
                              grad_mode=grad_mode)  # fmt: skip
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        values[device] = loss.detach().cpu()
        grads[device] = (x.grad.cpu(), y.grad.cpu())
    torch.testing.assert_close(values["cuda"], values["cpu"], rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(grads["cuda"], grads["cpu"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


def test_bf16_dskd_cma_cot2align_with_dev_eval_checkpoint_and_resume(workspace, tmp_path):
    run_dir = tmp_path / "run"
    config = tiny_run_config(
        workspace, run_dir,
        distill={"method": "dskd_cma", "kd_rate": 0.5, "temperature": 2.0},
        cot2align={"enabled": True},
        train={"max_steps": 4, "precision": "bf16", "save_every": 2, "log_every": 1},
        eval={"every_steps": 2, "max_new_tokens": 16, "metric": "exact_match"},
    )  # fmt: skip
    config["data"].update(cot_records="all", dev_file=str(workspace["train"]))
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "cot2align_ds.cli", "train", "--config", str(path)]
    first = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True,
                           timeout=600)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    config["train"]["max_steps"] = 6
    path.write_text(yaml.safe_dump(config))
    resumed = subprocess.run([*command, "--resume", "auto"], env=subprocess_env(),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss/total" in row]
    assert steps == list(range(1, 7))
    assert all(row["mem/peak_device_mb"] > 0 for row in rows if "loss/total" in row)
