"""V2PE's config sections (`model:`, `data:`, `evaluation:`), used as they are by its
runner, data preparation, evaluation and planner.

Bounds sit on the fields (`bounded`); rules that join fields of one section are in its
`__post_init__` (a `FieldError` the config loader prefixes with the section). Rules that
join sections are in `spec.validate`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from ..fields import APPLY, NEW_RUN, REFUSE, FieldError, bounded, no_credentials
from .data import DataConfig

Task = Literal["marked", "count", "colour", "needle"]


@dataclass(kw_only=True, frozen=True)
class ModelSection:
    # The checkpoint holds this model: its shape is the run's. (pretrained only seeds a
    # fresh start, but another one means another run.)
    RESUME: ClassVar[dict[str, str]] = dict.fromkeys(("size", "overrides", "pretrained"), REFUSE)
    size: str = "tiny"
    # Field overrides of the named size, e.g. {"vision_image_size": 56} (see model.model_config).
    overrides: dict = field(default_factory=dict)
    pretrained: str | None = None  # InternVL2 checkpoint folder, local or s3://

    def __post_init__(self):
        no_credentials("pretrained", self.pretrained)
        try:
            self.config()
        except (ValueError, TypeError) as e:
            raise FieldError("", str(e)) from None

    def config(self):
        """The model's `V2PEModelConfig` (computed once per section)."""
        return _model_config(self.size, tuple(sorted(self.overrides.items())))


@functools.lru_cache(maxsize=16)
def _model_config(size: str, overrides: tuple):
    from .model import model_config  # config sections load with the spec, before any model code

    return model_config(size, **dict(overrides))


@dataclass(kw_only=True, frozen=True)
class SyntheticSection:
    tokens: int = bounded(2048, gt=0)
    images: int = bounded(2, gt=0)
    # Each sample draws its image count from min_images..images (unset: always `images`),
    # filler text making up the tokens: a small model first learns to read one image,
    # then to find one among many.
    min_images: int | None = bounded(None, gt=0)
    task: Task = "marked"
    samples: int = bounded(16, gt=0)
    seed: int = bounded(0, ge=0)

    def __post_init__(self):
        if self.min_images is not None and self.min_images > self.images:
            raise FieldError("min_images", f"{self.min_images} exceeds images={self.images}")


@dataclass(kw_only=True, frozen=True)
class Positions:
    """The position mode a run uses, its stride (v2pe_fix only) and where they came from."""

    mode: str
    stride: int | None
    source: str

    def __str__(self) -> str:
        from fractions import Fraction

        delta = f" (stride {self.stride}, δ = {Fraction(self.stride, 256)})" if self.stride else ""
        return f"{self.mode}{delta}, from {self.source}"


@dataclass(kw_only=True, frozen=True)
class DataSection:
    # The data and its tokens are the run's; packing and positions fix its batches.
    RESUME: ClassVar[dict[str, str]] = {
        **dict.fromkeys(("train", "tokenizer", "image_root", "synthetic"), REFUSE),
        **dict.fromkeys(("max_tokens", "max_tiles", "position_mode", "position_stride"), NEW_RUN),
        "on_bad_sample": APPLY,
    }
    # "synthetic", a chat JSONL (path or URL), or the authors' dataset meta file (.json:
    # {name: {annotation, root, repeat_time, max_dynamic_patch}}) mixing several JSONL.
    train: str = "synthetic"
    # "auto": the checkpoint's own tokenizer (model.pretrained's tokenizer.model), else the
    # byte tokenizer of the tiny model; "byte"; or a tokenizer folder / URL. It must fit
    # the model's vocabulary (checked before anything starts).
    tokenizer: str = "auto"
    # Where relative image paths of data.train start: the `root` of the authors' dataset
    # meta files for Long-VQA / Long-MR (their JSONL names images relative to it). Unset:
    # the JSONL's own folder.
    image_root: str | None = None
    synthetic: SyntheticSection = field(default_factory=SyntheticSection)
    max_tokens: int = bounded(8192, gt=0)
    max_tiles: int = bounded(6, gt=0)
    # V2PE's position mode and stride (δ = stride/256 under v2pe_fix). Unset: the
    # checkpoint's (model.pretrained's config.json, llm_config.rope_pos_id_version /
    # rope_pos_id_stride), else v2pe_rnd. `positions()` says which a run uses.
    position_mode: Literal["default", "v2pe_fix", "v2pe_rnd"] | None = None
    position_stride: int | None = bounded(None, ge=1, le=256)
    # A sample that cannot be used (unreadable image, '<image>' count that does not match
    # its images, empty conversation, longer than max_tokens, not JSON): "fail" stops the
    # job naming it; "skip" leaves it out, counted by reason in the log and in MLflow.
    on_bad_sample: Literal["fail", "skip"] = "fail"
    # Image references lead inside the dataset's root (image_root, else the JSONL's
    # folder) only; list other roots (a folder, s3://bucket/prefix) to allow them.
    allowed_roots: list[str] = field(default_factory=list)
    # Bounds a real dataset never meets: past them a sample is a bad sample (above), not
    # a worker out of memory or a read that never ends.
    max_line_bytes: int = bounded(16 << 20, gt=0)
    max_image_bytes: int = bounded(64 << 20, gt=0)
    max_image_pixels: int = bounded(64_000_000, gt=0)

    def __post_init__(self):
        for key in ("train", "tokenizer", "image_root"):
            no_credentials(key, getattr(self, key))
        for root in self.allowed_roots:
            no_credentials("allowed_roots", root)
        if self.train == "synthetic" and self.synthetic.tokens > self.max_tokens:
            raise FieldError("synthetic.tokens", f"{self.synthetic.tokens} exceeds data.max_tokens={self.max_tokens}")

    def positions(self, model_cfg) -> Positions:
        """The position mode and stride of the run: this section's where set, else the
        checkpoint's (`model_cfg` read from its config.json), else v2pe_rnd."""
        mode, stride = self.position_mode, self.position_stride
        said = [k for k, v in (("mode", mode), ("stride", stride)) if v is not None]
        if mode is None:
            mode = model_cfg.position_mode or "v2pe_rnd"
        if stride is None and mode == "v2pe_fix":
            stride = model_cfg.position_stride
        if mode == "v2pe_fix" and stride is None:
            raise FieldError("data.position_stride", "required when data.position_mode is 'v2pe_fix' (δ = stride/256) "
                                                "and the checkpoint's config.json gives no rope_pos_id_stride")
        checkpoint = model_cfg.position_mode is not None or model_cfg.position_stride is not None
        source = ("the job's config" if len(said) == 2 or (said and mode != "v2pe_fix")
                  else "the job's config and the checkpoint" if said and checkpoint
                  else "the checkpoint's config.json" if checkpoint else "longview's default")
        return Positions(mode=mode, stride=stride if mode == "v2pe_fix" else None, source=source)

    def loader(self, model_cfg, *, max_tokens: int | None = None) -> DataConfig:
        """What the data reader needs: this section with the model's tile geometry."""
        pos = self.positions(model_cfg)
        return DataConfig(max_tokens=max_tokens or self.max_tokens, max_tiles=self.max_tiles,
                          tile=model_cfg.vision.image_size, tokens_per_tile=model_cfg.tokens_per_tile,
                          thumbnail=model_cfg.thumbnail,
                          position_mode=pos.mode, position_stride=pos.stride,
                          on_bad_sample=self.on_bad_sample, image_root=self.image_root,
                          allowed_roots=tuple(self.allowed_roots), max_line_bytes=self.max_line_bytes,
                          max_image_bytes=self.max_image_bytes, max_image_pixels=self.max_image_pixels)


@dataclass(kw_only=True, frozen=True)
class EvaluationSection:
    RESUME: ClassVar[dict[str, str]] = {}  # filled below: training never reads this section
    # "needle": longview's synthetic needle samples at `lengths`, scored by teacher
    # forcing; "mm-niah": MM-NIAH's released samples from `data`, answered by greedy
    # generation and scored as its authors score them.
    benchmark: Literal["needle", "mm-niah"] = "needle"
    # The benchmark's split folder (annotations/, images/), local or s3://; longview
    # downloads nothing.
    data: str | None = None
    tasks: list[str] = field(default_factory=list)  # mm-niah: a subset of its six tasks (empty: those found)
    max_samples: int | None = bounded(None, gt=0)  # mm-niah: the first N samples of each task (unset: all)
    max_new_tokens: int | None = bounded(None, gt=0)  # mm-niah: answer budget (unset: the protocol's)
    # mm-niah: whose evaluation to reproduce (question, tiles, budget, scoring;
    # mmniah_protocol.py): the benchmark authors' ("mm-niah") or the V2PE authors' ("v2pe").
    protocol: Literal["mm-niah", "v2pe"] = "mm-niah"
    # mm-niah: the split named in the responses files (<model>_<task>-<split>.jsonl, as the
    # authors' scoring script wants them). Unset: from the folder's name (mm_niah_val, mm_niah_test).
    split: Literal["val", "test"] | None = None
    # mm-niah: the model named in the responses files. Unset: the checkpoint's folder name
    # (its parent's for a longview export, whose folder is `export`), as the authors'.
    model_name: str | None = None
    # mm-niah with protocol v2pe: V2PE's long-context check beside greedy answers: one
    # forward pass with the answer in the input, correct when the argmax tokens at the
    # answer's positions are the answer (eval_mm_niah_long.py).
    teacher_forced: bool = False
    lengths: list[int] = bounded(ge=1, default_factory=list)  # token lengths of synthetic eval samples
    # δ = stride/256, one evaluation pass each. Unset: needle [256, 64]; mm-niah the run's
    # positions (data.position_*, else the checkpoint's, else stride 64 as the V2PE
    # authors' evaluation scripts).
    strides: list[int] | None = bounded(ge=1, le=256, default=None)
    samples_per_length: int = bounded(4, gt=0)
    images: int = bounded(2, gt=0)
    # "fixed": every length has `images` images (longer samples: more text);
    # "proportional": `images` at the shortest length, scaled with the length, so longer
    # samples hold more images, as in V2PE's long multimodal benchmarks, and the visual
    # share of the tokens stays the same.
    images_per_length: Literal["fixed", "proportional"] = "fixed"
    task: Task = "marked"
    # Workers per context-parallel group in evaluation; several groups score different
    # samples. Unset: one group of every worker (one 1M-token sample over all of them).
    cp: int | None = bounded(None, gt=0)
    # Pictures drawn from a pool of this many per (colour, marker) and shared by the
    # samples (unset: each its own file). The model never saw any of them (other seeds
    # than training); a length's set is then at most 16 x image_pool files, written to
    # and read from S3 once, where one request per picture (25,600 at 100 samples of
    # 256 images) costs minutes.
    image_pool: int | None = bounded(None, gt=0)

    def __post_init__(self):
        no_credentials("data", self.data)
        if self.benchmark == "mm-niah" and not self.data:
            raise FieldError("data", "required for benchmark 'mm-niah': the split folder you downloaded "
                                     "(annotations/, images/)")
        from .mmniah import TASKS  # the section loads with the spec, before the benchmark's code

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise FieldError("tasks", f"{', '.join(map(repr, unknown))} not among {', '.join(TASKS)}")
        if self.teacher_forced and (self.benchmark != "mm-niah" or self.protocol != "v2pe"):
            raise FieldError("teacher_forced", "the V2PE authors' check of MM-NIAH: needs benchmark 'mm-niah' and "
                                               "protocol 'v2pe'")
        if self.model_name is not None and (not self.model_name or "/" in self.model_name):
            raise FieldError("model_name", f"{self.model_name!r}: a file-name part (no '/', not empty)")

    def images_at(self, tokens: int) -> int:
        """Images per sample of `tokens` tokens."""
        if self.images_per_length == "fixed" or not self.lengths:
            return self.images
        return max(1, round(self.images * tokens / min(self.lengths)))


EvaluationSection.RESUME.update(dict.fromkeys((f.name for f in dataclasses.fields(EvaluationSection)), APPLY))
SECTIONS = {"model": ModelSection, "data": DataSection, "evaluation": EvaluationSection}
