"""PIIP's config section (`piip:`), used as it is by its runner, data and planner."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar, Literal

from ..spec import APPLY, NEW_RUN, REFUSE, FieldError, bounded


@dataclass(kw_only=True, frozen=True)
class PIIPSection:
    # The branches' shapes and the data are the run's; branch placement reshards (each
    # parameter is restored by name wherever its branch now lives).
    RESUME: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("variant", "resolutions", "interactions", "attn_type", "task", "data",
                         "synthetic_samples"), REFUSE),
        "batch_size": NEW_RUN, "ranks_per_branch": APPLY, "eval_samples": APPLY,
    }
    variant: str = "piip-tiny"
    # one per branch, any order
    resolutions: list[int] = bounded(ge=1, default_factory=lambda: [32, 48, 64])
    interactions: int | None = bounded(None, gt=0)  # default: the smallest branch depth
    attn_type: Literal["deform", "plain"] = "deform"
    task: Literal["classification", "segmentation"] = "classification"
    ranks_per_branch: list[int] = bounded(ge=1, default_factory=list)  # empty: proposed from the branches' FLOPs
    data: str = "synthetic"  # "synthetic" (procedural shapes) or an image-folder URL
    synthetic_samples: int = bounded(64, gt=0)
    eval_samples: int = bounded(90, gt=0)  # held-out procedural samples `longview eval` scores
    batch_size: int = bounded(4, gt=0)  # global batch; each branch splits it over its ranks

    def __post_init__(self):
        try:
            self.model_config()
        except ValueError as e:
            raise FieldError("", str(e)) from None
        if self.ranks_per_branch and len(self.ranks_per_branch) != len(self.resolutions):
            raise FieldError("ranks_per_branch", f"{list(self.ranks_per_branch)} has {len(self.ranks_per_branch)} "
                                                 f"entries for {len(self.resolutions)} branches")

    def model_config(self):
        """The `PIIPConfig` of this variant at these resolutions (computed once)."""
        return _piip_config(self.variant, tuple(int(r) for r in self.resolutions), self.attn_type, self.interactions)

    def layout(self, workers: int) -> tuple[int, ...]:
        """Ranks per branch: as configured, else proportional to each branch's FLOPs."""
        from .flops import propose_layout  # config sections load with the spec, before any model code

        if self.ranks_per_branch:
            return tuple(self.ranks_per_branch)
        return propose_layout(self.model_config(), workers)


@functools.lru_cache(maxsize=16)
def _piip_config(variant: str, resolutions: tuple, attn_type: str, interactions: int | None):
    from .model import piip_config  # config sections load with the spec, before any model code

    kw = {"attn_type": attn_type}
    if interactions is not None:
        kw["interactions"] = interactions
    return piip_config(variant, list(resolutions), **kw)


SECTIONS = {"piip": PIIPSection}
