"""PIIP as the training loop sees it (`workloads.spec.Runner`): each branch on its own
group of workers (`parallelism.dims.BranchLayout`), exchanging features at the
interaction layers; one global batch per micro-step, split within each branch group."""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import torch
import torch.distributed as dist

from parallelism.branch import batch_slice
from parallelism.dims import BranchLayout

from ..engine import build_engine
from ..sampling import sample_at
from ..spec import RunContext, Runner, StepResult
from .data import ImageFolder, batch
from .model import PIIP, make_pyramid
from .parallel import classification_loss, full_state, owned_parameters, segmentation_loss

log = logging.getLogger(__name__)
DETECTION_TERMS = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")


def data_root(cfg, run_root: str) -> str:
    """The image folder: the configured one, or the procedural shapes `prepare_data` wrote."""
    root = cfg.piip.data if cfg.piip.data != "synthetic" else f"{run_root.rstrip('/')}/data/shapes"
    return root.rstrip("/")


def task_root(cfg, run_root: str) -> str:
    """The task's data: its image folder (the `ImageFolder` root), or for detection the
    COCO instances JSON."""
    if cfg.piip.task == "detection":
        return train_annotations(cfg, run_root)
    return f"{data_root(cfg, run_root)}/{cfg.piip.task}"


def train_annotations(cfg, run_root: str) -> str:
    """Detection's training annotations: the configured JSON, or the generated shapes'."""
    if cfg.piip.data != "synthetic":
        return cfg.piip.data
    return f"{run_root.rstrip('/')}/data/coco-shapes/instances.json"


def coco_dataset(cfg, annotations: str, *, train: bool):
    """A COCO dataset under the job's reading rules."""
    from .coco import CocoDataset

    root = cfg.piip.image_root if annotations == cfg.piip.data else None
    return CocoDataset(annotations, image_root=root, train=train, on_bad_sample=cfg.piip.on_bad_sample)


class PIIPRunner(Runner):
    def __init__(self, cfg, ctx: RunContext):
        self.cfg, self.device = cfg, ctx.device
        layout = cfg.piip.layout(ctx.world_size)
        self.groups = BranchLayout(ranks_per_branch=layout, world_size=ctx.world_size).build(
            cfg.parallelism.timeout_s)
        self.mcfg = cfg.piip.model_config()
        self.detection = cfg.piip.task == "detection"
        if self.detection:
            from .detection import PIIPDetector

            self.data = coco_dataset(cfg, train_annotations(cfg, ctx.run_root), train=True)
            torch.manual_seed(cfg.training.seed)  # same initial weights on every rank
            model = PIIPDetector(self.mcfg, cfg.piip.detection_config(len(self.data.category_ids))).to(ctx.device)
        else:
            self.data = ImageFolder(task_root(cfg, ctx.run_root), cfg.piip.task)
            torch.manual_seed(cfg.training.seed)
            model = PIIP(self.mcfg).to(ctx.device)
        piip = model.piip if self.detection else model
        for k, url in enumerate(cfg.piip.pretrained):
            if url:  # every rank, before the engine: the same weights everywhere
                from .pretrained import load_branch

                left = load_branch(piip.branches[k], url)
                if ctx.rank == 0:
                    log.info("branch %d (%s) from %s (%d classifier tensor(s) left out)", k,
                             self.mcfg.branches[k].size, url, len(left))
        self.engine = build_engine(model, cfg.training, owned=owned_parameters(model, self.groups))
        self.size = max(b.resolution for b in self.mcfg.branches)

    @property
    def samples_per_micro(self) -> int:
        return self.cfg.piip.batch_size

    def step(self, micro: int) -> StepResult:
        g, B, n = self.groups, self.cfg.piip.batch_size, len(self.data)
        # the global batch: a function of (seed, micro)
        rows = [sample_at(i, n, self.cfg.training.seed) for i in range(micro * B, (micro + 1) * B)]
        lo, hi = batch_slice(g.layout, g.branch, g.rank, B)
        terms = {}
        if self.detection:  # images of their own sizes: the detector resizes them
            t0 = time.perf_counter()
            loss, terms = self._detection_loss(micro, rows, lo, hi)
        else:
            images, labels, masks = batch([self.data[r] for r in rows[lo:hi]], self.size)
            image = make_pyramid(images.to(self.device), self.mcfg)[g.branch]  # this branch's resolution
            t0 = time.perf_counter()
            if self.cfg.piip.task == "classification":
                loss = classification_loss(self.engine.module, image, labels.to(self.device), g, B)
            else:
                loss = segmentation_loss(self.engine.module, image, masks.to(self.device), g, B)
        self.engine.backward(loss)
        stepped = self.engine.step()
        dt = torch.tensor([time.perf_counter() - t0, float(g.branch)])
        times = [torch.zeros(2) for _ in range(dist.get_world_size())]
        dist.all_gather(times, dt)
        total = loss.detach().clone().cpu()
        dist.all_reduce(total)
        metrics = {f"branch{b}_step_s": max(float(t[0]) for t in times if int(t[1]) == b)  # its slowest rank
                   for b in range(len(self.mcfg.branches))}
        if self.detection:  # each term, summed over branch 0's ranks (zero elsewhere)
            vec = torch.tensor([float(terms.get(k, 0.0)) for k in DETECTION_TERMS], dtype=torch.float64)
            dist.all_reduce(vec)
            metrics.update(zip(DETECTION_TERMS, vec.tolist()))
        return StepResult(loss=float(total), stepped=stepped, metrics=metrics,
                          grad_norm=self.engine.last_grad_norm if stepped else None,
                          lr=self.engine.lr if stepped else None)

    def _detection_loss(self, micro: int, rows: list[int], lo: int, hi: int):
        """Mask R-CNN's loss on this rank's slice; each sample mirrored with probability
        1/2 (piip.flip), drawn from (seed, micro-step, position): the same on every rank."""
        from .coco import hflip
        from .parallel import detection_loss

        samples = []
        for j in range(lo, hi):
            s = self.data.sample(rows[j])
            draw = torch.Generator().manual_seed(self.cfg.training.seed * 1_000_003 + micro * 1009 + j)
            if self.cfg.piip.flip and torch.rand((), generator=draw) < 0.5:
                s = hflip(s)
            samples.append(s)
        images = [s.image.to(self.device) for s in samples]
        targets = [{k: v.to(self.device) for k, v in s.target.items()} for s in samples]
        g = self.groups
        return detection_loss(self.engine.module, images, targets, g, self.cfg.piip.batch_size)

    def layout(self) -> dict[str, int]:
        return {f"branch{b}": n for b, n in enumerate(self.groups.layout.ranks_per_branch)}

    def export(self, rank: int, url: str) -> str:
        """The trained model, whole, at `url`: model.safetensors (every parameter from the
        branch group that trained it) and config.json (the `piip:` section that builds it).
        Collective: every rank takes part in gathering; rank 0 writes."""
        import fsspec
        from safetensors.torch import save

        state = full_state(self.engine.module, self.groups)
        if rank == 0:
            fs, root = fsspec.core.url_to_fs(url)
            fs.makedirs(root, exist_ok=True)
            fs.pipe_file(f"{root}/model.safetensors", save({k: v.contiguous().cpu() for k, v in state.items()}))
            meta = {"piip": dataclasses.asdict(self.cfg.piip)}
            if self.detection:  # what the detector's labels mean
                meta["detection"] = {"category_ids": self.data.category_ids,
                                     "names": [self.data.names[c] for c in self.data.category_ids]}
            fs.pipe_file(f"{root}/config.json", json.dumps(meta).encode())
        return url

