"""The training skeleton the classifier, IRN and DeepLab trainers share.

In the layout of torchvision's ``references/segmentation``: each trainer keeps its config, its
dataset, its loss and its evaluation, and takes the rest from here: the epoch's data loader, one
epoch of optimisation steps (:func:`train_one_epoch`), the progress bar, the resume state (model,
optimizer, scheduler, grad scaler and RNG, written atomically and read back as tensors and plain
data only), and the process group under ``torchrun`` (one process per device; ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment, ``env://``, nccl on CUDA, gloo on the CPU).
"""

from __future__ import annotations

import contextlib
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from rib_core.training.checkpoints import CheckpointError, read_checkpoint, save_atomically

if TYPE_CHECKING:  # datasets builds its training sets on AugmentedManifest
    from rib_core.data.datasets import Manifest, ManifestRecord

# A batch -> its loss to back-propagate and named parts of it to report (floats).
StepLoss = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]

# ----------------------------------------------------------------------------- the epoch loop

class AugmentedManifest(Dataset, ABC):
    """A manifest's images as training samples whose random augmentation depends only on (seed,
    epoch, index): a resumed run draws the same crops. The trainer sets ``epoch``."""

    def __init__(self, manifest: Manifest, seed: int) -> None:
        self.manifest = manifest
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.manifest)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.sample(self.manifest[i], random.Random(hash((self.seed, self.epoch, i))))

    @abstractmethod
    def sample(self, record: ManifestRecord, rng: random.Random) -> dict[str, Any]:
        """The training sample of ``record``, its random draws taken from ``rng`` (each training set
        says how: the classifier's, IRN's and DeepLab's)."""


def steps_per_epoch(images: int, batch_size: int, world: int = 1) -> int:
    """Full batches per epoch (the last partial one is dropped) when ``world`` processes share each
    batch and the images (a ``DistributedSampler`` with ``drop_last``); refuses a data set without one."""
    steps = (images // world) // (batch_size // world)
    if steps == 0:
        raise ValueError(f"{images} images is fewer than one batch of {batch_size}")
    return steps


def epoch_loader(dataset: Dataset, batch_size: int, seed: int, epoch: int, num_workers: int = 0,
                 sampler: Sequence[int] | None = None, pin_memory: bool = False) -> DataLoader:
    """The epoch's full batches, shuffled (unless ``sampler`` gives the order) by a generator of their
    own: creating an iterator must not draw from the global RNG, which a resumed run restores."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
                      num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed * 1000 + epoch))


def progress_bar(total: int, desc: str, enabled: bool, initial: int = 0, unit: str = "batch") -> tqdm:
    """The trainers' bar: steps done of ``total`` (a resumed run starts at ``initial``), loss shown."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled)


def train_one_epoch(loader: Iterable[Any], step_loss: StepLoss, optimizer: torch.optim.Optimizer, bar: tqdm,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    scaler: torch.amp.GradScaler | None = None,
                    after_step: Callable[[float], bool] | None = None) -> dict[str, float]:
    """One pass over ``loader``: back-propagate each batch's loss and step the optimizer (and the
    scheduler). Returns the summed loss (the mean over ranks under torchrun) and its parts.

    ``after_step(loss)`` runs after every step; returning True ends the pass there.
    """
    sums: dict[str, float] = {}
    for batch in loader:
        loss, parts = step_loss(batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if scheduler is not None:
            scheduler.step()
        value = mean_over_ranks(loss.detach()).item()
        for key, part in {"loss": value, **parts}.items():
            sums[key] = sums.get(key, 0.0) + part
        bar.update()
        bar.set_postfix(loss=f"{value:.4f}")
        if after_step is not None and after_step(value):
            break
    return sums


# ----------------------------------------------------------------------------- resume state

def trainer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                  scaler: torch.amp.GradScaler | None = None) -> dict[str, Any]:
    """What the optimisation has learnt so far, under the keys :func:`restore_trainer` reads."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    return state


def restore_trainer(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> None:
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None:
        scaler.load_state_dict(state["scaler"])


def save_training_state(state: dict[str, Any], path: Path) -> None:
    """Write a training state atomically: a crash never leaves half a file to resume from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(state, path)


def read_training_state(path: Path, required: Iterable[str]) -> dict[str, Any]:
    """A training state to resume from, read as tensors and plain data only: the file may have come
    from a shared output location, and unpickling arbitrary objects would run code."""
    try:
        state = read_checkpoint(path)
    except CheckpointError as e:
        raise CheckpointError(f"refusing to resume from {path}: {e}; delete it or use another output") from e
    if not isinstance(state, dict) or not set(required) <= set(state):
        raise CheckpointError(f"refusing to resume from {path}: it is not a training state of this program")
    return state


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's global RNG state (the CPU's, and the device's on CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def rng_states_of_all_ranks(device: torch.device) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective: every rank calls it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [rng_state(device)]
    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng_state(device))
    return states


# ----------------------------------------------------------------------------- distribution

def dist_env() -> tuple[int, int, int]:
    """(world size, rank, local rank) as torchrun sets them; (1, 0, 0) in a plain process."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))


@contextlib.contextmanager
def distributed(device: torch.device) -> Iterator[tuple[int, int]]:
    """Join torchrun's process group (env://) for the duration; yields (world size, rank).

    Re-entrant: a group that is already up is used and left up.
    """
    world = dist_env()[0]
    own = world > 1 and not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    try:
        yield (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    finally:
        if own:
            dist.destroy_process_group()


def rank_device(device: str | torch.device) -> torch.device:
    """Under torchrun each rank takes the CUDA device of its local rank."""
    device = torch.device(device)
    world, _, local_rank = dist_env()
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a plain process)."""
    if dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over the ranks (a collective under torchrun; ``value`` itself elsewhere)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Mixed precision (``amp`` "bf16" or "fp16") on CUDA; float32 on the CPU or with "off"."""
    if device.type != "cuda" or amp == "off":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
