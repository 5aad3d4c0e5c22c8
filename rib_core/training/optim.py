"""IRN's ``PolyOptimizer`` (``misc/torchutils.py``), reproduced with its real behaviour.

IRN calls ``torch.optim.SGD.__init__(params, lr, weight_decay)``. SGD's third positional argument
is *momentum*, so the SGD momentum actually used is ``weight_decay`` (1e-4), and the attribute
named ``momentum`` (0.9) is only the exponent of the poly schedule. Weight decay itself reaches SGD
through each parameter group's ``weight_decay`` entry. We default to exactly that and expose the
momentum, so the variant IRN's names suggest (momentum 0.9) is one option away.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class PolySGD(torch.optim.SGD):
    """SGD whose group learning rates follow ``lr0 * (1 - step / max_step) ** power``.

    The rate is set before each step while ``step < max_step`` and then stays where it was, as in
    IRN.
    """

    def __init__(self, param_groups: Iterable[dict[str, Any]], max_step: int, power: float = 0.9,
                 momentum: float = 1e-4) -> None:
        super().__init__(list(param_groups), lr=0.0, momentum=momentum)
        self.max_step = max_step
        self.power = power
        self.global_step = 0
        self.initial_lr = [g["lr"] for g in self.param_groups]

    def step(self, closure: Any = None) -> Any:
        if self.global_step < self.max_step:
            mult = (1 - self.global_step / self.max_step) ** self.power
            for g, lr0 in zip(self.param_groups, self.initial_lr, strict=True):
                g["lr"] = lr0 * mult
        out = super().step(closure)
        self.global_step += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "global_step": self.global_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.global_step = state_dict.pop("global_step", 0)
        super().load_state_dict(state_dict)


def irn_param_groups(backbone: list[torch.nn.Parameter], head: list[torch.nn.Parameter], lr: float,
                     weight_decay: float) -> list[dict[str, Any]]:
    """Backbone at ``lr``, the newly added head at ``10 * lr`` (IRN ``train_cam.py``, RIB)."""
    return [{"params": backbone, "lr": lr, "weight_decay": weight_decay},
            {"params": head, "lr": 10 * lr, "weight_decay": weight_decay}]
