"""What ``rib tune`` sweeps (:class:`TuneConfig`) and the grid of RIB settings it makes.

The procedure that scores the grid is :mod:`rib_core.experiments.tune`.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rib_core.config.rib_config import RibConfig
from rib_core.config.stage_configs import ConfidentLabelConfig, EvalConfig, RefineConfig, wide_thresholds


def walk_thresholds() -> list[float]:
    """The walk's background scores ``rib tune`` sweeps: 0.10-0.90, around IRN's 0.25 / RIB's 0.27
    (VOC) and the authors' 0.22 (COCO), and wide enough for other data (on the demo's scenes the
    best lies near 0.7)."""
    return [round(0.10 + 0.05 * i, 2) for i in range(17)]


def walk_lengths() -> list[int]:
    """The walk lengths (2^k steps) ``rib tune`` sweeps: IRN's 8 and shorter walks, for maps smaller than VOC's."""
    return [2, 3, 4, 5, 6, 7, 8]


class TuneConfig(BaseModel):
    """What ``rib tune`` sweeps; ``rib`` and ``refine`` are the settings it starts from (and keeps
    for everything it does not sweep)."""

    model_config = ConfigDict(extra="forbid")

    rib: RibConfig = Field(default_factory=RibConfig)
    refine: RefineConfig = Field(default_factory=RefineConfig)
    # The paper's 8e-6, and larger steps for classifiers whose logits move less per step.
    lrs: list[float] = Field(default_factory=lambda: [8e-6, 3e-5, 1e-4], min_length=1)
    # RibConfig.step_gain values of the lr_rule "first_step" (a step size that follows the
    # classifier's own gradient scale; benchmarks/bench_lr.py); [] = fixed lrs only.
    step_gains: list[float] = Field(default_factory=lambda: [0.3, 1.0])
    iterations: list[int] = Field(default_factory=lambda: [10], min_length=1)  # paper 4.1: K = 10
    poolings: list[Literal["gndrp", "gap"]] = Field(default_factory=lambda: ["gndrp"], min_length=1)
    evaluation: EvalConfig = Field(default_factory=lambda: EvalConfig(thresholds=wide_thresholds()))
    walk_thresholds: list[float] = Field(default_factory=walk_thresholds)
    walk_exp_times: list[int] = Field(default_factory=walk_lengths, min_length=1)
    # The walk's mask as IRN's code leaves it (False) and through a dense CRF (True, walk.crf). The
    # CRF runs once per image and point of the walk grid: on large images, [False] or fewer points.
    walk_crf: list[bool] = Field(default_factory=lambda: [False, True], min_length=1)
    # IRN's confident-label thresholds (fg, bg), each pair swept with every RIB setting: RIB's 0.35 /
    # 0.17, higher pairs for maps that a larger step raised everywhere, and a lower one (a third of
    # RIB's) for maps that barely reach the object (seed thresholds near 0.05, as on the part
    # scenes, where 0.35 / 0.17 labels most of each object background). The starting pair
    # (refine.labels) is always tried.
    label_thresholds: list[tuple[float, float]] = Field(default_factory=lambda: [(0.35, 0.17), (0.5, 0.3),
                                                                                  (0.7, 0.5), (0.12, 0.06)])
    # IRN is trained for this many RIB settings, the best by seed (the starting one always);
    # None = every setting of the grid.
    mask_candidates: int | None = Field(None, ge=1)
    tune_walk: bool = True  # False: RIB and the seed threshold only, chosen by the seed (no IRN)
    limit: int | None = Field(None, ge=1, description="only the first N images of the tuning manifest")

    @model_validator(mode="before")
    @classmethod
    def _flat_keys(cls, data: Any) -> Any:
        """``crop_size=64`` as well as ``rib.crop_size=64``: a key that is not one of this config's
        own (``iterations`` is its sweep) goes to ``rib`` and/or ``refine``, whichever has it."""
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for key in [k for k in data if k not in cls.model_fields]:
            targets = [name for name, model in (("rib", RibConfig), ("refine", RefineConfig))
                       if key in model.model_fields]
            value = out.pop(key) if targets else None
            for name in targets:
                nested = out.get(name) or {}
                nested = nested.model_dump(exclude_unset=True) if isinstance(nested, BaseModel) else dict(nested)
                if key in nested:
                    raise ValueError(f"{key} is given twice, flat and as {name}.{key}: give one")
                out[name] = {**nested, key: value}
        return out

    @model_validator(mode="after")
    def _ranges(self) -> TuneConfig:
        if any(not 0 < t < 1 for t in self.walk_thresholds):
            raise ValueError("walk_thresholds must lie in (0, 1)")
        if any(not 0 <= e <= 12 for e in self.walk_exp_times):
            raise ValueError("walk_exp_times must lie in 0-12 (2^k steps)")
        for fg, bg in self.label_thresholds:
            ConfidentLabelConfig(fg_threshold=fg, bg_threshold=bg)  # 0 < bg < fg < 1, with its message
        if any(not 0 < g <= 1 for g in self.step_gains):
            raise ValueError("step_gains must lie in (0, 1]")
        return self


def grid_of(cfg: TuneConfig) -> list[RibConfig]:
    """The starting setting first (so that it is always scored, and wins ties), then the sweep."""
    grid = {setting_name(cfg.rib): cfg.rib}
    steps = [{"lr_rule": "fixed", "lr": lr} for lr in cfg.lrs]
    steps += [{"lr_rule": "first_step", "step_gain": g} for g in cfg.step_gains]
    for p, step, k in itertools.product(cfg.poolings, steps, cfg.iterations):
        rib = cfg.rib.model_copy(update={"pooling": p, "iterations": k, **step})
        grid.setdefault(setting_name(rib), rib)
    return list(grid.values())


SWEPT = ("pooling", "lr_rule", "lr", "step_gain", "iterations")  # what the grid sets


def setting_name(rib: RibConfig) -> str:
    step = f"gain{rib.step_gain:g}" if rib.lr_rule == "first_step" else f"lr{rib.lr:g}"
    return f"{rib.pooling}_{step}_k{rib.iterations}"
