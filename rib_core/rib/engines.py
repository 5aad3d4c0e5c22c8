"""The two executors of the RIB process: how one step's CAMs are computed and the weights updated.

Both run the same objective (:mod:`rib_core.rib.objective`) in the same loop
(:func:`rib_core.rib.process.fine_tune`); they differ only in where the per-image weights live:

- :class:`PlainEngine`: one image, the working model's own weights, bfloat16 by autocast: the
  official loop's arithmetic.
- :class:`BatchedEngine`: n images, stages 3-4 and the classifier stacked once per image and run
  through ``torch.func.vmap``; the sum of the images' losses gives each copy its own image's
  gradient and the optimiser's update is elementwise, so every image's fine-tuning stays
  independent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from rib_core.config.rib_config import RibConfig, RibPlan
from rib_core.training.networks import CamNet
from rib_core.training.optim import PolySGD, irn_param_groups

COMPILED_SHAPES = 64  # input shapes the compiled batched head is compiled for (VmappedHead)


class TrainablePart(torch.nn.Module):
    """Stages 3-4 and the classifier of a :class:`CamNet` as one module (what RIB fine-tunes)."""

    def __init__(self, model: CamNet) -> None:
        super().__init__()
        self.layer3, self.layer4, self.classifier = model.backbone.layer3, model.backbone.layer4, model.classifier

    def forward(self, low: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layer4(self.layer3(low)))


def rib_optimizer(cfg: RibConfig, backbone: list[torch.Tensor], classifier: list[torch.Tensor]) -> PolySGD:
    """IRN's ``PolyOptimizer`` as the official code builds it (lr x10 on the classifier)."""
    return PolySGD(irn_param_groups(backbone, classifier, cfg.lr, cfg.weight_decay),
                   max_step=cfg.iterations, power=cfg.poly_power, momentum=cfg.momentum)


def sgd_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


class Engine(ABC):
    """What both engines share: the working model reset to theta_0 (the shared weights) in the
    plan's precision and layout, and its stages 1-2, which RIB never changes (their output is
    detached, their BN statistics frozen), run without autograd."""

    def __init__(self, work: CamNet, theta_0: dict[str, torch.Tensor], plan: RibPlan, device: torch.device) -> None:
        self.work, self.device = work, device
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=plan.bf16)
        self.layout = torch.channels_last if plan.bf16 else torch.contiguous_format
        work.load_state_dict(theta_0)
        work.train()
        work.to(memory_format=self.layout)

    def low(self, x: torch.Tensor) -> torch.Tensor:
        """[n, B, 3, h, w] inputs -> [n, B, c, h', w'] stage-2 features."""
        with torch.no_grad(), self.autocast:
            flat = x.flatten(0, 1).to(self.device).contiguous(memory_format=self.layout)
            return self.work.low_features(flat).unflatten(0, x.shape[:2])

    optimizer: PolySGD

    def weighted_grad_sq(self, loss: torch.Tensor) -> torch.Tensor:
        """[n]: each image's squared gradient norm of ``loss``, every parameter group weighted by its
        lr over the base lr (1 backbone, 10 classifier): the first-order loss decrease of one SGD
        step of lr 1. The graph is kept for the update that follows."""
        params: list[torch.Tensor] = []
        weights: list[float] = []
        for group, lr0 in zip(self.optimizer.param_groups, self.optimizer.initial_lr, strict=True):
            params += group["params"]
            weights += [lr0 / self.optimizer.initial_lr[0]] * len(group["params"])
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        total = torch.zeros(self.images, device=loss.device)
        for g, w in zip(grads, weights, strict=True):
            if g is not None:  # stages 1-2 are listed (as in IRN) but detached
                total += w * g.float().pow(2).reshape(self.images, -1).sum(dim=1)
        return total

    @property
    @abstractmethod
    def images(self) -> int:
        """Images fine-tuned together (the leading dimension of the trainable weights, or 1)."""

    @abstractmethod
    def cams(self, low: torch.Tensor) -> torch.Tensor:
        """[n, B, c, h, w] stage-2 features -> [n, B, C, h', w'] raw float32 CAMs, each image its own weights."""

    @abstractmethod
    def update(self, loss: torch.Tensor, frozen: list[int]) -> None:
        """One SGD step on ``loss``; the images in ``frozen`` (stopped) keep their weights."""


class PlainEngine(Engine):
    """One image through the working model's own stages 3-4 and classifier."""

    def __init__(self, work: CamNet, theta_0: dict[str, torch.Tensor], head: TrainablePart, cfg: RibConfig,
                 plan: RibPlan, device: torch.device) -> None:
        super().__init__(work, theta_0, plan, device)
        self.head = head
        self.optimizer = rib_optimizer(cfg, *work.param_groups())

    @property
    def images(self) -> int:
        return 1

    def cams(self, low: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return self.head(low[0]).float()[None]

    def update(self, loss: torch.Tensor, frozen: list[int]) -> None:
        sgd_step(self.optimizer, loss)  # a stopped image ends the loop: nothing is ever frozen here


class BatchedEngine(Engine):
    """n images, one stacked copy of the trainable weights each (float32 master weights).

    Autocast does not reach inside vmap, so bfloat16 is cast explicitly: bf16 copies of the weights
    and features for the convolutions, made anew on each call so that gradients sum in float32.
    """

    def __init__(self, work: CamNet, theta_0: dict[str, torch.Tensor], head: TrainablePart,
                 head_fn: Callable[..., torch.Tensor], cfg: RibConfig, plan: RibPlan, device: torch.device, n: int,
                 ) -> None:
        super().__init__(work, theta_0, plan, device)
        self.head_fn, self.n = head_fn, n
        self.dtype = torch.bfloat16 if plan.bf16 else torch.float32
        self.stacked = {name: p.detach().unsqueeze(0).repeat(n, *[1] * p.dim()).requires_grad_()
                        for name, p in head.named_parameters() if p.requires_grad}
        self.optimizer = rib_optimizer(cfg, [p for k, p in self.stacked.items() if not k.startswith("classifier.")],
                                       [p for k, p in self.stacked.items() if k.startswith("classifier.")])
        self.fixed = {k: v.to(self.dtype) if v.is_floating_point() else v
                      for k, v in [*head.named_parameters(), *head.named_buffers()] if k not in self.stacked}

    @property
    def images(self) -> int:
        return self.n

    def cams(self, low: torch.Tensor) -> torch.Tensor:
        weights = {k: p.to(self.dtype) for k, p in self.stacked.items()}
        return self.head_fn(weights, self.fixed, low.to(self.dtype)).float()

    def update(self, loss: torch.Tensor, frozen: list[int]) -> None:
        kept = {k: p.detach()[frozen].clone() for k, p in self.stacked.items()} if frozen else {}
        sgd_step(self.optimizer, loss)
        with torch.no_grad():
            for k, value in kept.items():
                self.stacked[k][frozen] = value


class VmappedHead:
    """Stages 3-4 + classifier called with one set of weights per image (``functional_call``
    under ``vmap``), compiled on request and kept across runs."""

    def __init__(self, head: TrainablePart) -> None:
        self.eager = torch.func.vmap(
            lambda params, fixed, low: torch.func.functional_call(head, (params, fixed), (low,)),
            in_dims=(0, None, 0))
        self._compiled: Callable[..., torch.Tensor] | None = None

    def function(self, compile: bool) -> Callable[..., torch.Tensor]:
        """The eager call, or the compiled one when ``compile``.

        Dynamo specialises the vmapped call on its input shapes even with ``dynamic=True``, so it
        compiles once per shape: each target size x scale and the companion crop, for each number of
        images in a batch. Past ``COMPILED_SHAPES`` of them new shapes run eagerly. Worth it for
        datasets of few image sizes; hence off by default.
        """
        if not compile:
            return self.eager
        if self._compiled is None:
            compiled = torch.compile(self.eager, dynamic=False)

            def head(*args: object) -> torch.Tensor:
                with torch._dynamo.config.patch(recompile_limit=COMPILED_SHAPES):
                    return compiled(*args)

            self._compiled = head
        return self._compiled
