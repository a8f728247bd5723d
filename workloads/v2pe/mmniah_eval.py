"""`longview eval` on MM-NIAH (`evaluation.benchmark: mm-niah`): the released split read
from `evaluation.data`, every answer generated greedily under context parallelism
(`generate.py`), scored as the benchmark's authors score it (`mmniah.py`).

On the driver, `prepare` reads every annotation line once and checks the whole split
before anything runs: the layout, each sample's fields, that every image it names is
in images/, that no sample is longer than `data.max_tokens`. A bad split stops the
evaluation there with one line naming the file, sample and field; nothing is scored.
On the workers, the context-parallel groups share the samples (`evaluation.cp`, as the
needle evaluation); each answer is generated over its group and scored; the scores meet
on every rank. Results: per task and context-length bucket, the authors' score (MLflow:
a metric `mmniah_<task>` per task, step = the bucket's lower edge in tokens, and
`mmniah_overall`), a table, a figure, and every response in the authors' output format
(`<run>/eval/mm-niah/<task>_stride_<N>.jsonl`).
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator

import torch.distributed as dist

from parallelism.dims import ParallelDims

from ..data_errors import DataError, printable
from ..files import FileCache, resolve_image
from ..spec import EvalResult, Evaluation, FieldError
from .config import Positions
from .data import encode_prompt
from .generate import generate
from .hf_checkpoint import load_pretrained
from .inputs import job_model_config, job_tokenizer
from .mmniah import TASKS, Item, bucket_label, bucket_scores, find_tasks, max_new_tokens, read_items, record_of, score

log = logging.getLogger(__name__)
DEFAULT_STRIDE = 64  # the V2PE authors' evaluation scripts: --rope_pos_id_stride 64


def eval_positions(cfg, model_cfg) -> list[Positions]:
    """The position settings answers are generated under, one pass each."""
    if cfg.evaluation.strides:
        return [Positions(mode="v2pe_fix", stride=s, source="evaluation.strides") for s in cfg.evaluation.strides]
    pos = cfg.data.positions(model_cfg)
    if pos.mode == "default":
        return [pos]
    if pos.mode == "v2pe_fix":
        return [pos]
    # v2pe_rnd draws δ per image, for training; an answer needs one δ
    stride = model_cfg.position_stride or DEFAULT_STRIDE
    where = "the checkpoint's rope_pos_id_stride" if model_cfg.position_stride else "the V2PE authors' evaluation"
    return [Positions(mode="v2pe_fix", stride=stride, source=f"{where} (trained with v2pe_rnd)")]


def _suffix(pos: Positions, many: bool) -> str:
    """Metric-name suffix of a position setting when several are evaluated."""
    if not many:
        return ""
    return "_default" if pos.stride is None else f"_stride_{pos.stride}"


class MMNIAHEvaluation(Evaluation):
    def prepare(self, cfg, run_root: str, model_url: str) -> dict[str, str]:
        """Checks the whole split; returns {task: annotation file} and the image root."""
        import fsspec

        e = cfg.evaluation
        fs, root = fsspec.core.url_to_fs(e.data)
        tasks = find_tasks(fs, root, e.tasks or None)
        scheme = e.data.split("://")[0] + "://" if "://" in e.data else ""
        urls = {task: scheme + path for task, path in tasks.items()}  # as the user named them
        images = {posixpath.relpath(p, posixpath.join(root, "images")) for p in fs.find(posixpath.join(root, "images"))}
        image_root = f"{e.data.rstrip('/')}/images"
        limit = cfg.data.max_tokens
        counts = {}
        for task, path in tasks.items():
            n = 0
            for item in _first(read_items(fs, path, task, urls[task], max_line_bytes=cfg.data.max_line_bytes),
                               e.max_samples):  # one at a time: 1M-token contexts are MBs each
                n += 1
                for field, names in (("images_list", item.images), ("meta.choices_image_path", item.choice_images)):
                    for name in names or ():
                        sample = f"{task} sample {item.id} ({item.where})"
                        if name not in images:
                            raise DataError(f"{sample}: {field}: image {printable(name)} is not in {image_root}",
                                            "missing_file")
                        try:  # what the workers would refuse mid-generation (a link out of the split): now
                            resolve_image(name, image_root, sample=sample, allowed=tuple(cfg.data.allowed_roots))
                        except DataError as bad:
                            raise DataError(f"{field}: {bad}", bad.reason) from None
                if item.context_length > limit:
                    raise DataError(f"{task} sample {item.id} ({item.where}): meta.context_length "
                                    f"{item.context_length} exceeds data.max_tokens={limit}; raise it (and the "
                                    "layout: `longview plan`) or leave the sample out (evaluation.max_samples)",
                                    "too_long")
            if n == 0:  # an empty table would be scored as if the model had answered nothing
                raise DataError(f"{task} ({urls[task]}): no samples (an empty annotations file)", "empty")
            counts[task] = n
        log.info("MM-NIAH %s: %s", e.data, ", ".join(f"{t} {n} samples" for t, n in counts.items()))
        return {**urls, "_images": f"{e.data.rstrip('/')}/images"}

    def run(self, cfg, ctx, model_url: str, prepared: dict[str, str]) -> EvalResult:
        import fsspec

        model = load_pretrained(model_url).eval()
        tok = job_tokenizer(cfg, checkpoint=model_url, model_cfg=model.cfg)
        e = cfg.evaluation
        positions = eval_positions(cfg, model.cfg)
        world = ctx.world_size
        cp = e.cp or world
        if world % cp:
            raise ValueError(f"evaluation.cp: {cp} does not divide the {world} workers")
        groups = ParallelDims.infer(world_size=world, cp=cp, cp_a2a=cfg.parallelism.cp_a2a if cp > 1 else 1).build(
            cfg.parallelism.timeout_s)
        index, count = groups.dp_rank, world // cp
        cp_group = groups.cp_group if cp > 1 else None
        loader = cfg.data.loader(model.cfg)
        base = prepared["_images"]
        files = FileCache()
        responses: dict[str, list[dict]] = {}
        for task in (t for t in TASKS if t in prepared):
            fs, path = fsspec.core.url_to_fs(prepared[task])
            items = _first(read_items(fs, path, task, prepared[task], max_line_bytes=cfg.data.max_line_bytes),
                           e.max_samples)
            if ctx.rank == 0:
                log.info("MM-NIAH %s: generating answers (%s)", task, "; ".join(map(str, positions)))
            for i, item in enumerate(items):
                if i % count != index:
                    continue
                prompt = encode_prompt(record_of(item), tokenizer=tok, cfg=loader, base_dir=base,
                                       sample=f"{task}/{item.id}", files=files)
                for pos in positions:
                    g = generate(model, prompt, tokenizer=tok, mode=pos.mode, stride=pos.stride,
                                 max_new_tokens=e.max_new_tokens or max_new_tokens(task), cp_group=cp_group,
                                 hybrid=groups.hybrid if cp > 1 else None, kernel=cfg.parallelism.kernel)
                    text = tok.decode(g.tokens).strip()
                    responses.setdefault(f"{task}{_suffix(pos, len(positions) > 1)}", []).append(
                        _response(item, text, prompt_tokens=g.prompt_tokens))
        responses = _gather(responses, cp_group, count)
        if ctx.rank == 0:
            _write_responses(responses, f"{ctx.run_root.rstrip('/')}/eval/mm-niah")
        return _result(responses)

    def params(self, cfg) -> dict[str, str]:
        e = cfg.evaluation
        out = {"eval.benchmark": "mm-niah", "eval.data": e.data or "", "eval.tasks": ",".join(e.tasks) or "all",
               "eval.max_samples": str(e.max_samples or "all")}
        try:  # which positions, when the checkpoint's config.json can be read here
            out["eval.positions"] = "; ".join(map(str, eval_positions(cfg, job_model_config(cfg))))
        except (OSError, ValueError):
            pass
        return out

    def figure(self, cfg, records: list[dict]) -> bytes | None:
        return mmniah_figure(records, f"{cfg.name}: MM-NIAH") if records else None

    def figure_name(self, cfg) -> str:
        return "accuracy_by_length.png"  # each task's score by context-length bucket

    def comparison(self, cfg):
        raise FieldError("evaluation.benchmark", "'mm-niah': the length-generalisation experiment evaluates on "
                                                 "the needle task")


def _first(items: Iterator[Item], n: int | None) -> Iterator[Item]:
    for i, item in enumerate(items):
        if n and i >= n:
            return
        yield item


def _response(item: Item, text: str, *, prompt_tokens: int) -> dict:
    """One answer in the authors' output format, with its score and our token count."""
    return {"question_id": item.id, "question": item.question, "answer": item.answer, "response": text,
            "context_length": item.context_length, "placed_depth": item.raw_depth, "depth": item.depth,
            "score": score(item.answer, text), "prompt_tokens": prompt_tokens}


def _gather(responses: dict[str, list[dict]], cp_group, count: int) -> dict[str, list[dict]]:
    """Every replica's responses on every rank (each taken once, from its group's first rank)."""
    if count == 1:
        return responses
    first = cp_group is None or dist.get_rank(cp_group) == 0
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, responses if first else None)
    out: dict[str, list[dict]] = {}
    for part in filter(None, parts):
        for key, got in part.items():
            out.setdefault(key, []).extend(got)
    return out


def _write_responses(responses: dict[str, list[dict]], url: str) -> None:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    for key, rows in responses.items():
        body = "".join(json.dumps({k: r[k] for k in ("question_id", "question", "answer", "response",
                                                     "context_length", "placed_depth")}) + "\n"
                       for r in sorted(rows, key=lambda r: str(r["question_id"])))
        fs.pipe_file(f"{root}/{key}.jsonl", body.encode())


def _result(responses: dict[str, list[dict]]) -> EvalResult:
    records, curves = [], {}
    for key in sorted(responses, key=lambda k: (TASKS.index(k.split("_")[0]) if k.split("_")[0] in TASKS else 99, k)):
        for row in bucket_scores(responses[key]):
            records.append({"task": key, **row})
            curves.setdefault(f"mmniah_{key.replace('-', '_')}", {})[row["tokens"]] = row["score"]
    # overall: the mean over the tasks evaluated, per bucket every task has
    by_bucket: dict[int, list[float]] = {}
    for r in records:
        by_bucket.setdefault(r["tokens"], []).append(r["score"])
    keys = {r["task"] for r in records}
    overall = {b: sum(v) / len(v) for b, v in by_bucket.items() if len(v) == len(keys)}
    if overall:
        curves["mmniah_overall"] = overall
    metrics = {f"{name}_mean": sum(c.values()) / len(c) for name, c in curves.items()}
    return EvalResult(table=format_table(records, overall, len(keys)), records=records, metrics=metrics,
                      curves=curves)


def format_table(records: list[dict], overall: dict[int, float], tasks: int) -> str:
    """Tasks as rows, context-length buckets as columns (the V2PE paper's layout)."""
    edges = sorted({r["tokens"] for r in records})
    head = "| task | " + " | ".join(bucket_label(b) for b in edges) + " | mean |"
    lines = [head, "|" + "---|" * (len(edges) + 2)]
    by_task: dict[str, dict[int, dict]] = {}
    for r in records:
        by_task.setdefault(r["task"], {})[r["tokens"]] = r
    for task, row in by_task.items():
        cells = [f"{100 * row[b]['score']:.1f} ({row[b]['samples']})" if b in row else "-" for b in edges]
        mean = sum(r["score"] for r in row.values()) / len(row)
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {100 * mean:.1f} |")
    if overall:
        cells = [f"{100 * overall[b]:.1f}" if b in overall else "-" for b in edges]
        lines.append(f"| overall ({tasks} tasks) | " + " | ".join(cells)
                     + f" | {100 * sum(overall.values()) / len(overall):.1f} |")
    lines += ["", "Scores in %, as the MM-NIAH authors compute them (per bucket: the mean over five needle-depth "
                  "bins; counting by soft accuracy); samples per bucket in brackets."]
    return "\n".join(lines)


def mmniah_figure(records: list[dict], title: str) -> bytes:
    """A PNG of each task's score against context length."""
    from ..figures import png_bytes, pyplot

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for task in dict.fromkeys(r["task"] for r in records):
        pts = sorted((r for r in records if r["task"] == task), key=lambda r: r["tokens"])
        ax.plot([r["tokens"] for r in pts], [r["score"] for r in pts], marker="o", markersize=3, label=task)
    ax.set_xscale("log", base=2)
    ticks = sorted({r["tokens"] for r in records})
    ax.set_xticks(ticks, [bucket_label(t) for t in ticks])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("context length (tokens, bucket's lower edge)")
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return png_bytes(fig)
