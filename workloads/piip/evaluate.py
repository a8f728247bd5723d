"""`longview eval` for PIIP: accuracy of the exported model on held-out samples.

The held-out set is drawn like the training shapes with another seed (never the
training images), written once under <run>/data/eval-shapes-<n>. Every worker scores
its share of the samples with the whole (single-process) model read from the export,
and the correct counts are summed over all workers.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.distributed as dist

from ..spec import EvalResult, Evaluation
from ..stats import wilson_interval
from .config import PIIPSection
from .data import ImageFolder, batch, write_shapes
from .model import PIIP, make_pyramid

log = logging.getLogger(__name__)
HELD_OUT_SEED = 1_000_003  # added to the training seed: a set disjoint in draws from training


def load_export(url: str):
    """(PIIP model, its `piip:` section) from an export folder."""
    import fsspec
    from safetensors.torch import load

    fs, root = fsspec.core.url_to_fs(url)
    section = PIIPSection(**json.loads(fs.cat_file(f"{root}/config.json"))["piip"])
    model = PIIP(section.model_config())
    model.load_state_dict(load(fs.cat_file(f"{root}/model.safetensors")))
    return model.eval(), section


class HeldOutAccuracy(Evaluation):
    def prepare(self, cfg, run_root: str, model_url: str) -> dict[str, str]:
        import fsspec

        n = cfg.piip.eval_samples
        url = f"{run_root.rstrip('/')}/data/eval-shapes-{n}"
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.exists(f"{root}/{cfg.piip.task}"):
            write_shapes(url, n, size=max(int(r) for r in cfg.piip.resolutions), seed=cfg.training.seed + HELD_OUT_SEED)
        return {"root": f"{url}/{cfg.piip.task}"}

    @torch.no_grad()
    def run(self, cfg, ctx, model_url: str, prepared: dict[str, str]) -> EvalResult:
        if cfg.piip.task != "classification":
            raise ValueError("piip.task: evaluation scores classification; segmentation has none yet")
        model, section = load_export(model_url)
        data = ImageFolder(prepared["root"], "classification")
        size = max(b.resolution for b in model.cfg.branches)
        mine = list(range(ctx.rank, len(data), ctx.world_size))
        correct = torch.zeros(2, dtype=torch.float64)  # (right, seen)
        for i in range(0, len(mine), 16):
            images, labels, _ = batch([data[j] for j in mine[i : i + 16]], size)
            logits = model(make_pyramid(images, model.cfg))["logits"]
            correct += torch.tensor([float((logits.argmax(-1) == labels).sum()), float(len(labels))],
                                    dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(correct)
        right, seen = (int(x) for x in correct.tolist())
        acc = right / seen
        low, high = wilson_interval(right, seen)
        chance = 1 / len(data.classes)
        log.info("held-out accuracy %.3f over %d samples (chance %.3f)", acc, seen, chance)
        table = ("| samples | classes | accuracy | 95% interval | chance |\n|---|---|---|---|---|\n"
                 f"| {seen} | {len(data.classes)} | {acc:.3f} | {low:.2f}–{high:.2f} | {chance:.3f} |")
        record = {"samples": seen, "accuracy": acc, "low": low, "high": high, "chance": chance}
        return EvalResult(table=table, records=[record], metrics={"heldout_accuracy": acc})

    def params(self, cfg) -> dict[str, str]:
        return {"eval.samples": str(cfg.piip.eval_samples), "eval.task": cfg.piip.task}
