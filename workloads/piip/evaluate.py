"""`longview eval` for PIIP: classification accuracy on held-out samples, or for
detection COCO box and mask AP (`piip.task: detection`); `longview experiment`: PIIP
against a single-branch ViT baseline through the same detector.

Held-out sets are drawn like the training shapes with another seed (never the training
images), written once under <run>/data/. Every worker scores its share of the samples
with the whole (single-process) model read from the export; the counts (or the
detections) meet on every rank.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.distributed as dist

from ..fields import FieldError
from ..spec import Comparison, EvalResult, Evaluation, EvaluationByConfig
from ..stats import wilson_interval
from .config import PIIPSection
from .data import ImageFolder, batch, write_shapes
from .model import PIIP, make_pyramid

log = logging.getLogger(__name__)
HELD_OUT_SEED = 1_000_003  # added to the training seed: a set disjoint in draws from training


def load_export(url: str):
    """(model, its `piip:` section) from an export folder: a PIIP, or for detection a
    `PIIPDetector` whose labels are the export's categories (`section.categories`)."""
    import fsspec
    from safetensors.torch import load

    fs, root = fsspec.core.url_to_fs(url)
    meta = json.loads(fs.cat_file(f"{root}/config.json"))
    section = PIIPSection(**meta["piip"])
    if section.task == "detection":
        from .detection import PIIPDetector

        model = PIIPDetector(section.model_config(), section.detection_config(len(meta["detection"]["category_ids"])))
        model.categories = meta["detection"]
    else:
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
        if ctx.rank == 0:  # every rank holds the same figure: said once
            log.info("held-out accuracy %.3f over %d samples (chance %.3f)", acc, seen, chance)
        table = ("| samples | classes | accuracy | 95% interval | chance |\n|---|---|---|---|---|\n"
                 f"| {seen} | {len(data.classes)} | {acc:.3f} | {low:.2f}–{high:.2f} | {chance:.3f} |")
        record = {"samples": seen, "accuracy": acc, "low": low, "high": high, "chance": chance}
        return EvalResult(table=table, records=[record], metrics={"heldout_accuracy": acc})

    def params(self, cfg) -> dict[str, str]:
        return {"eval.samples": str(cfg.piip.eval_samples), "eval.task": cfg.piip.task}


class DetectionAP(Evaluation):
    """COCO box and mask AP of the exported detector (pycocotools' COCOeval) on
    `piip.eval_data`, or on held-out generated shapes when the job trains on them."""

    def prepare(self, cfg, run_root: str, model_url: str) -> dict[str, str]:
        import fsspec

        from .coco import write_shapes_coco

        p = cfg.piip
        if p.eval_data:
            return {"annotations": p.eval_data}
        if p.data != "synthetic":
            raise FieldError("piip.eval_data", "unset: name the COCO instances JSON to evaluate on (val2017's)")
        url = f"{run_root.rstrip('/')}/data/coco-shapes-eval-{p.eval_samples}"
        fs, root = fsspec.core.url_to_fs(url)
        if not fs.exists(f"{root}/instances.json"):
            write_shapes_coco(url, p.eval_samples, size=max(int(r) for r in p.resolutions),
                              seed=cfg.training.seed + HELD_OUT_SEED)
        return {"annotations": f"{url}/instances.json"}

    def run(self, cfg, ctx, model_url: str, prepared: dict[str, str]) -> EvalResult:
        from .coco import coco_ap, predictions
        from .flops import backbone_flops, detector_head_macs
        from .runner import coco_dataset

        model, section = load_export(model_url)
        data = coco_dataset(cfg, prepared["annotations"], train=False)
        if data.category_ids != model.categories["category_ids"]:
            raise ValueError(f"piip.eval_data: categories {data.category_ids} are not the model's "
                             f"{model.categories['category_ids']}")
        results = predictions(model, data, range(ctx.rank, len(data), ctx.world_size))
        if dist.is_initialized() and dist.get_world_size() > 1:
            parts: list = [None] * dist.get_world_size()
            dist.all_gather_object(parts, results)
            results = [r for part in parts for r in part]
        ap = coco_ap(data, results, data.ids)
        gflops = backbone_flops(model.cfg)["total"] / 1e9
        heads = detector_head_macs(model.cfg, model.det)["total"] / 1e9
        record = {**ap, "backbone_gflops": gflops, "head_gflops": heads, "images": len(data),
                  "variant": section.variant, "resolutions": list(section.resolutions)}
        if ctx.rank == 0:
            record["predictions_png"] = _predictions_figure(model, data, results, ctx.run_root)
            log.info("box AP %.3f, mask AP %.3f on %d images (backbone %.3f GFLOPs)", ap["bbox_AP"], ap["segm_AP"],
                     len(data), gflops)  # every rank holds the same AP: said once
        # As MLflow shows them: AP to 0.01 points (COCOeval's own precision is no finer on a
        # few hundred images), and no metric for a size class with no object (COCOeval's -1).
        metrics = {k: round(v, 4) for k, v in ap.items() if v >= 0}
        return EvalResult(table=ap_table([record]), records=[record],
                          metrics={**metrics, "backbone_gflops": round(gflops, 6), "head_gflops": round(heads, 4)})

    def params(self, cfg) -> dict[str, str]:
        return {"eval.task": "detection", "eval.data": cfg.piip.eval_data or f"generated ({cfg.piip.eval_samples})"}

    def figure(self, cfg, records: list[dict]) -> bytes | None:
        import fsspec

        url = records[0].get("predictions_png") if records else None
        return fsspec.open(url, "rb").open().read() if url else None

    def figure_name(self, cfg) -> str:
        return "predictions.png"  # boxes and masks over validation images

    def comparison(self, cfg) -> Comparison:
        """PIIP's claim: at least the single-branch ViT's AP for fewer FLOPs. The baseline
        is `piip.baseline` at the job's highest resolution, through the same detector."""
        p = cfg.piip
        base = {"piip.variant": p.baseline, "piip.resolutions": [max(p.resolutions)], "piip.ranks_per_branch": []}
        return Comparison(
            name="piip-detection", arms={p.variant: {}, p.baseline: base},
            description=(f"Detection: {p.variant} at {'/'.join(map(str, sorted(p.resolutions, reverse=True)))} against "
                         f"{p.baseline} at {max(p.resolutions)}, {cfg.training.steps} steps, seed {cfg.training.seed}."),
            params={"piip.variant": p.variant, "baseline": p.baseline, "steps": str(cfg.training.steps)})

    def compare(self, cfg, results: dict[str, dict]) -> tuple[str, bytes | None]:
        records = [r["records"][0] for r in results.values()]
        return ap_table(records), ap_figure(records)


def ap_table(records: list[dict]) -> str:
    """Box and mask AP with GFLOPs, as the PIIP paper's detection table."""
    lines = ["| model | resolutions | backbone GFLOPs | heads GFLOPs | box AP | AP50 | AP75 | APs | APm | APl | "
             "mask AP | AP50 | AP75 |", "|" + "---|" * 13]
    f = lambda v: "–" if v < 0 else f"{100 * v:.1f}"  # noqa: E731 - COCOeval's -1: no object of that size
    for r in records:
        lines.append(f"| {r['variant']} | {'/'.join(map(str, sorted(r['resolutions'], reverse=True)))} | "
                     f"{r['backbone_gflops']:.4f} | {r['head_gflops']:.3f} | {f(r['bbox_AP'])} | {f(r['bbox_AP50'])} | "
                     f"{f(r['bbox_AP75'])} | {f(r['bbox_APs'])} | {f(r['bbox_APm'])} | {f(r['bbox_APl'])} | "
                     f"{f(r['segm_AP'])} | {f(r['segm_AP50'])} | {f(r['segm_AP75'])} |")
    lines += ["", f"AP in %, COCOeval on {records[0]['images']} images; GFLOPs per image at the largest "
                  "resolution, one multiply-add = one FLOP."]
    return "\n".join(lines)


def ap_figure(records: list[dict]) -> bytes:
    """Box and mask AP against backbone GFLOPs, one point per model."""
    from ..figures import png_bytes, pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for kind, marker in (("bbox", "o"), ("segm", "s")):
        xs = [r["backbone_gflops"] for r in records]
        ax.plot(xs, [100 * r[f"{kind}_AP"] for r in records], marker=marker, linestyle="",
                label={"bbox": "box AP", "segm": "mask AP"}[kind])
        for r, x in zip(records, xs):
            ax.annotate(r["variant"], (x, 100 * r[f"{kind}_AP"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("backbone GFLOPs per image")
    ax.set_ylabel("AP (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _predictions_figure(model, data, results: list[dict], run_root: str, n: int = 4) -> str:
    """Boxes and masks predicted (score > 0.5) over the first `n` images, written under
    <run>/eval/; returns its URL."""
    import fsspec
    import numpy as np
    from pycocotools import mask as mask_utils

    from ..figures import png_bytes, pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.2), dpi=100)
    for ax, i in zip(np.atleast_1d(axes), range(min(n, len(data)))):
        s = data[i]
        ax.imshow(s.image.permute(1, 2, 0).numpy())
        for r in (r for r in results if r["image_id"] == s.image_id and r["score"] > 0.5):
            m = mask_utils.decode(r["segmentation"])
            ax.imshow(np.ma.masked_where(m == 0, m), alpha=0.4, cmap="autumn")
            x, y, w, h = r["bbox"]
            ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, color="cyan", linewidth=1))
            ax.text(x, y, f"{data.names[r['category_id']]} {r['score']:.2f}", fontsize=6, color="white",
                    backgroundcolor="black")
        ax.set_title(f"image {s.image_id}", fontsize=8)
        ax.axis("off")
    url = f"{run_root.rstrip('/')}/eval/predictions.png"
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    fs.pipe_file(path, png_bytes(fig))
    return url


class PIIPEvaluation(EvaluationByConfig):
    """The evaluation of `piip.task`: held-out accuracy, or COCO AP for detection."""

    def pick(self, cfg) -> Evaluation:
        return DetectionAP() if cfg.piip.task == "detection" else HeldOutAccuracy()
