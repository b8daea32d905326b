"""The module the student engine trains: the student model plus the distillation projectors.

Keeping projectors inside the same ``nn.Module`` puts them in the same ZeRO partitioning,
optimizer and checkpoint as the student, with their own learning rate (a separate param group).
"""

from __future__ import annotations

import torch
from torch import nn


class StudentWithProjectors(nn.Module):
    def __init__(self, student: nn.Module, projectors: nn.ModuleDict | None = None) -> None:
        super().__init__()
        self.student = student
        self.projectors = projectors if projectors is not None else nn.ModuleDict()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
    ):
        # Passed only when used: an architecture without the argument still trains.
        head = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        return self.student(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=False,
            **head,
        )


def param_groups(
    module: StudentWithProjectors, *, lr: float, projector_lr: float, weight_decay: float
) -> list[dict]:
    """AdamW groups: decayed student weights, undecayed norms/biases, projectors at their lr."""
    decay, no_decay = [], []
    for name, parameter in module.student.named_parameters():
        if not parameter.requires_grad:
            continue
        # Norm gains and biases are 1-D; decaying them only shrinks scales the model needs.
        # Under ZeRO-3 the local tensor is a flat partition, so read the original shape.
        ndim = len(getattr(parameter, "ds_shape", parameter.shape))
        (no_decay if ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "student_decay"},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "student_no_decay"},
    ]
    projector_params = [p for p in module.projectors.parameters() if p.requires_grad]
    if projector_params:
        groups.append(
            {
                "params": projector_params,
                "lr": projector_lr,
                "weight_decay": weight_decay,
                "name": "projectors",
            }
        )
    return [group for group in groups if group["params"]]
