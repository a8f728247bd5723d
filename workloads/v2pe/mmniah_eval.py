"""`longview eval` on MM-NIAH (`evaluation.benchmark: mm-niah`): the released split read
from `evaluation.data`, every answer generated greedily under context parallelism
(`generate.py`), asked and scored by `evaluation.protocol` (`mmniah_protocol.py`: the
benchmark authors' evaluation, or the V2PE authors').

On the driver, `prepare` reads every annotation line once and checks the whole split
before anything runs: the layout, each sample's fields, that every image it names is
in images/, that no sample is longer than `data.max_tokens`, that ids are unique in a
task (the authors' scripts key responses by id). A bad split stops the evaluation there
with one line naming the file, sample and field; nothing is scored. On the workers, the
context-parallel groups share the samples (`evaluation.cp`, as the needle evaluation);
each answer is generated over its group and scored; the scores meet on every rank.

Results: per task and context-length bucket the protocol's score (MLflow: a metric
`mmniah_<task>` per task, step = the bucket's lower edge in tokens, `mmniah_<task>_mean`
the task's figure, `mmniah_overall` when all six tasks ran), a table, a figure, and every
response in the authors' output files, `<run>/eval/mm-niah/<model>_<task>-<split>.jsonl`,
which their calculate_scores.py reads as they are. With `evaluation.teacher_forced`, the
V2PE authors' teacher-forced check runs on the same samples beside the greedy answers
(`<run>/eval/mm-niah/teacher-forced/`, `mmniah_forced_<task>` and `mmniah_greedy_<task>`
per length bucket).
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import replace

import torch.distributed as dist

from parallelism.dims import ParallelDims
from parallelism.zigzag import IGNORE_INDEX

from ..data_errors import DataError, printable
from ..fields import FieldError
from ..files import FileCache, resolve_image
from ..spec import EvalResult, Evaluation
from .config import Positions
from .data import encode_prompt, encode_sample
from .evaluate import score_sample
from .generate import generate
from .hf_checkpoint import load_pretrained
from .inputs import job_model_config, job_tokenizer
from .mmniah import TASKS, Item, find_tasks, read_items
from .mmniah_protocol import (
    LONG_BUCKETS,
    PROTOCOLS,
    Protocol,
    bucket_label,
    bucket_of,
    overall_buckets,
    task_buckets,
    task_figure,
)
from .tokenizer import IM_END

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


def split_of(cfg, root: str) -> str:
    """The split named in the responses files: evaluation.split, else the folder's name."""
    if cfg.evaluation.split:
        return cfg.evaluation.split
    name = posixpath.basename(root.rstrip("/"))
    for split in ("val", "test"):
        if name.endswith(split):
            return split
    raise FieldError("evaluation.split", f"the folder {name!r} does not say whether it is MM-NIAH's val or test "
                                         "split (the authors name the responses files <model>_<task>-<split>.jsonl); "
                                         "set evaluation.split: val or test")


def model_name_of(cfg, model_url: str) -> str:
    """The model named in the responses files: evaluation.model_name, else the checkpoint's
    folder name as the authors' scripts take it (the run's for a longview export)."""
    if cfg.evaluation.model_name:
        return cfg.evaluation.model_name
    parts = [p for p in model_url.rstrip("/").split("/") if p]
    name = parts[-1] if parts else "model"
    return parts[-2] if name == "export" and len(parts) > 1 else name


def protocol_of(cfg) -> Protocol:
    return PROTOCOLS[cfg.evaluation.protocol]


class MMNIAHEvaluation(Evaluation):
    def prepare(self, cfg, run_root: str, model_url: str) -> dict[str, str]:
        """Checks the whole split; returns {task: annotation file}, the image root, the
        split's and the model's names for the responses files."""
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
            seen: dict[str, str] = {}
            for item in _first(read_items(fs, path, task, urls[task], max_line_bytes=cfg.data.max_line_bytes),
                               e.max_samples):  # one at a time: 1M-token contexts are MBs each
                sample = f"{task} sample {item.id} ({item.where})"
                if item.id in seen:  # the authors' scripts resume by id: a repeat would go unanswered
                    raise DataError(f"{sample}: id {printable(item.raw_id, 40)} is also the id of the sample at "
                                    f"{seen[item.id]}; ids are unique within a task", "record")
                seen[item.id] = item.where
                for field, names in (("images_list", item.images), ("meta.choices_image_path", item.choice_images)):
                    for name in names or ():
                        if name not in images:
                            raise DataError(f"{sample}: {field}: image {printable(name)} is not in {image_root}",
                                            "missing_file")
                        try:  # what the workers would refuse mid-generation (a link out of the split): now
                            resolve_image(name, image_root, sample=sample, allowed=tuple(cfg.data.allowed_roots))
                        except DataError as bad:
                            raise DataError(f"{field}: {bad}", bad.reason) from None
                if item.context_length > limit:
                    raise DataError(f"{sample}: meta.context_length {item.context_length} exceeds "
                                    f"data.max_tokens={limit}; raise it (and the layout: `longview plan`) or leave "
                                    "the sample out (evaluation.max_samples)", "too_long")
            if not seen:  # an empty table would be scored as if the model had answered nothing
                raise DataError(f"{task} ({urls[task]}): no samples (an empty annotations file)", "empty")
            counts[task] = len(seen)
        split = split_of(cfg, root)
        log.info("MM-NIAH %s (%s split, protocol %s): %s", e.data, split, e.protocol,
                 ", ".join(f"{t} {n} samples" for t, n in counts.items()))
        return {**urls, "_images": image_root, "_split": split, "_model": model_name_of(cfg, model_url)}

    def run(self, cfg, ctx, model_url: str, prepared: dict[str, str]) -> EvalResult:
        import fsspec

        model = load_pretrained(model_url).eval()
        tok = job_tokenizer(cfg, checkpoint=model_url, model_cfg=model.cfg)
        e, protocol = cfg.evaluation, protocol_of(cfg)
        positions = eval_positions(cfg, model.cfg)
        world = ctx.world_size
        cp = e.cp or world
        if world % cp:
            raise ValueError(f"evaluation.cp: {cp} does not divide the {world} workers")
        groups = ParallelDims.infer(world_size=world, cp=cp, cp_a2a=cfg.parallelism.cp_a2a if cp > 1 else 1).build(
            cfg.parallelism.timeout_s)
        index, count = groups.dp_rank, world // cp
        parallel = {"cp_group": groups.cp_group if cp > 1 else None, "hybrid": groups.hybrid if cp > 1 else None,
                    "kernel": cfg.parallelism.kernel}
        # The protocol's tiles per image; with the teacher-forced check both passes read the
        # images as the V2PE authors' long evaluation does, so the two figures differ in method only.
        tiles = protocol.forced_max_tiles if e.teacher_forced else protocol.max_tiles
        loader = replace(cfg.data.loader(model.cfg), max_tiles=tiles, thumbnail=protocol.thumbnail)
        base = prepared["_images"]
        files = FileCache()
        responses: dict[tuple[str, str, str], list[dict]] = {}  # (kind, task, setting): rows
        for task in (t for t in TASKS if t in prepared):
            fs, path = fsspec.core.url_to_fs(prepared[task])
            items = _first(read_items(fs, path, task, prepared[task], max_line_bytes=cfg.data.max_line_bytes),
                           e.max_samples)
            if ctx.rank == 0:
                log.info("MM-NIAH %s: generating answers (protocol %s; %s)", task, protocol.name,
                         "; ".join(map(str, positions)))
            for i, item in enumerate(items):
                if i % count != index:
                    continue
                name = f"{task}/{item.id}"
                prompt = encode_prompt(protocol.record(item), tokenizer=tok, cfg=loader, base_dir=base, sample=name,
                                       files=files)
                forced = encode_sample(protocol.record(item, answer=str(item.raw_answer)), tokenizer=tok, cfg=loader,
                                       base_dir=base, sample=name, files=files) if e.teacher_forced else None
                for pos in positions:
                    setting = _setting(pos, len(positions) > 1)
                    g = generate(model, prompt, tokenizer=tok, mode=pos.mode, stride=pos.stride,
                                 max_new_tokens=e.max_new_tokens or protocol.budget(task), stop_at=(IM_END,),
                                 **parallel)  # the authors' eos_token_id: <|im_end|> alone
                    text = tok.decode(g.tokens, skip_special=True).strip()  # as the authors decode
                    row = _response(protocol, item, text, order=i, prompt_tokens=g.prompt_tokens)
                    responses.setdefault(("greedy", task, setting), []).append(row)
                    if forced is not None:
                        chosen = score_sample(model, forced, tokenizer=tok, mode=pos.mode, stride=pos.stride,
                                              argmax=True, **parallel).chosen
                        truth = forced.targets[forced.targets != IGNORE_INDEX].tolist()
                        responses.setdefault(("forced", task, setting), []).append(
                            _forced(protocol, item, chosen, truth, tok, order=i, greedy=row["score"]))
        responses = _gather(responses, parallel["cp_group"], count)
        if ctx.rank == 0:
            _write_responses(responses, f"{ctx.run_root.rstrip('/')}/eval/mm-niah", prepared["_model"],
                             prepared["_split"])
        return _result(responses, protocol)

    def params(self, cfg) -> dict[str, str]:
        e = cfg.evaluation
        p = protocol_of(cfg)
        out = {"eval.benchmark": "mm-niah", "eval.data": e.data or "", "eval.tasks": ",".join(e.tasks) or "all",
               "eval.max_samples": str(e.max_samples or "all"), "eval.protocol": e.protocol,
               "eval.protocol_source": p.source,
               "eval.tiles_per_image": str(p.forced_max_tiles if e.teacher_forced else p.max_tiles),
               "eval.max_new_tokens": str(e.max_new_tokens or f"{p.counting_budget} counting, 16 others"),
               "eval.teacher_forced": str(e.teacher_forced).lower()}
        try:  # which positions, when the checkpoint's config.json can be read here
            out["eval.positions"] = "; ".join(map(str, eval_positions(cfg, job_model_config(cfg))))
        except (OSError, ValueError):
            pass
        return out

    def figure(self, cfg, records: list[dict]) -> bytes | None:
        return mmniah_figure(records, f"{cfg.name}: MM-NIAH ({cfg.evaluation.protocol} protocol)") if records else None

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


def _setting(pos: Positions, many: bool) -> str:
    """The name of a position setting when several are evaluated ("" for one)."""
    if not many:
        return ""
    return "default" if pos.stride is None else f"stride_{pos.stride}"


def _response(protocol: Protocol, item: Item, text: str, *, order: int, prompt_tokens: int) -> dict:
    """One answer as the authors' output files record it (the question as asked, the id
    and answer as released), with its score and our bookkeeping."""
    return {"question_id": item.raw_id, "question": protocol.question(item), "answer": item.raw_answer,
            "response": text, "context_length": item.context_length, "placed_depth": item.raw_depth,
            "depth": item.depth, "score": protocol.score(item.answer, text), "prompt_tokens": prompt_tokens,
            "order": order}


def _forced(protocol: Protocol, item: Item, chosen: list[int], truth: list[int], tok, *, order: int,
            greedy: float) -> dict:
    """eval_mm_niah_long.py's verdict: the argmax tokens at the answer's positions (its
    `<|im_end|>` left out) equal the answer; for an option index, their text is the
    option's letter."""
    said = tok.decode(chosen[:-1]).strip()  # eval_mm_niah_long.py:356 keeps special tokens
    if isinstance(item.answer, int):
        correct = chr(ord("A") + item.answer) == said
    else:
        correct = chosen[:-1] == truth[:-1]
    return {"question_id": item.raw_id, "question": protocol.question(item), "answer": item.raw_answer,
            "response": said, "context_length": item.context_length, "placed_depth": item.raw_depth,
            "correct": bool(correct), "greedy_score": greedy, "order": order}


def _gather(responses: dict, cp_group, count: int) -> dict:
    """Every replica's responses on every rank (each taken once, from its group's first rank)."""
    if count == 1:
        return responses
    first = cp_group is None or dist.get_rank(cp_group) == 0
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, responses if first else None)
    out: dict = {}
    for part in filter(None, parts):
        for key, got in part.items():
            out.setdefault(key, []).extend(got)
    return out


AUTHORS_FIELDS = ("question_id", "question", "answer", "response", "context_length", "placed_depth")


def _write_responses(responses: dict, url: str, model: str, split: str) -> None:
    """The authors' files: one `<model>_<task>-<split>.jsonl` per task in a folder per
    position setting, the teacher-forced verdicts (with their `correct`) under teacher-forced/."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    for (kind, task, setting), rows in responses.items():
        folder = posixpath.join(root, setting, "teacher-forced" if kind == "forced" else "")
        fs.makedirs(folder, exist_ok=True)
        fields = AUTHORS_FIELDS + (("correct",) if kind == "forced" else ())
        body = "".join(json.dumps({k: r[k] for k in fields}) + "\n" for r in sorted(rows, key=lambda r: r["order"]))
        fs.pipe_file(posixpath.join(folder, f"{model}_{task}-{split}.jsonl"), body.encode())


def _curve_name(prefix: str, task: str, setting: str) -> str:
    return f"{prefix}_{task.replace('-', '_')}" + (f"_{setting}" if setting else "")


def _result(responses: dict, protocol: Protocol) -> EvalResult:
    records, curves, metrics = [], {}, {}
    settings = sorted({s for _, _, s in responses})
    tables = []
    for setting in settings:
        by_task = {task: task_buckets(responses[("greedy", task, setting)]) for task in TASKS
                   if ("greedy", task, setting) in responses}
        for task, rows in by_task.items():
            name = _curve_name("mmniah", task, setting)
            records += [{"task": task + (f" ({setting})" if setting else ""), **r} for r in rows]
            curves[name] = {r["tokens"]: r["score"] for r in rows}
            metrics[f"{name}_mean"] = task_figure(rows)
        overall = overall_buckets(by_task)
        if overall:
            name = "mmniah_overall" + (f"_{setting}" if setting else "")
            curves[name] = {r["tokens"]: v for r, v in zip(next(iter(by_task.values())), overall)}
            metrics[f"{name}_mean"] = sum(overall) / len(overall)
        tables.append(format_table(by_task, overall, setting))
        forced = {task: responses[("forced", task, setting)] for task in TASKS
                  if ("forced", task, setting) in responses}
        if forced:
            tables.append(format_forced(forced, setting))
            for task, rows in forced.items():
                buckets = _long_buckets(rows)
                scored = [r for got in buckets.values() for r in got]  # under 1k tokens: left out, as above
                for kind, key in (("forced", "correct"), ("greedy", "greedy_score")):
                    name = _curve_name(f"mmniah_{kind}", task, setting)
                    curves[name] = {b: sum(float(r[key]) for r in got) / len(got) for b, got in buckets.items()}
                    if scored:
                        metrics[f"{name}_mean"] = sum(float(r[key]) for r in scored) / len(scored)
                records += [{"task": f"{task}{f' ({setting})' if setting else ''}: teacher-forced", "bucket":
                             bucket_label(b), "tokens": b, "samples": len(got),
                             "score": sum(r["correct"] for r in got) / len(got)} for b, got in buckets.items()]
    head = f"Protocol: {protocol.name} (as {protocol.source})."
    return EvalResult(table="\n\n".join([head, *tables]), records=records, metrics=metrics, curves=curves)


def _long_buckets(rows: list[dict]) -> dict[int, list[dict]]:
    """Rows by length bucket (1k ... 64k, then 128K, 256K, 512K, 1M), buckets with samples only."""
    out: dict[int, list[dict]] = {}
    for r in rows:
        b = bucket_of(r["context_length"], LONG_BUCKETS)
        if b >= 0:
            out.setdefault(LONG_BUCKETS[b], []).append(r)
    return dict(sorted(out.items()))


def format_table(by_task: dict[str, list[dict]], overall: list[float] | None, setting: str) -> str:
    """Tasks as rows, the eleven context-length buckets as columns (the papers' layout)."""
    edges = [r["tokens"] for r in next(iter(by_task.values()))]
    title = f"Positions {setting.replace('_', ' ')}:\n\n" if setting else ""
    head = "| task | " + " | ".join(bucket_label(b) for b in edges) + " | mean |"
    lines = [head, "|" + "---|" * (len(edges) + 2)]
    for task, rows in by_task.items():
        cells = [f"{100 * r['score']:.1f} ({r['samples']})" for r in rows]
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {100 * task_figure(rows):.1f} |")
    if overall:
        lines.append("| overall | " + " | ".join(f"{100 * v:.1f}" for v in overall)
                     + f" | {100 * sum(overall) / len(overall):.1f} |")
    lines += ["", "Scores in %, as the authors' calculate_scores.py computes them: per bucket the mean over five "
                  "needle-depth bins, an empty bin or bucket counting 0 (samples in brackets; 64k holds every longer "
                  "sample); a task's mean over all eleven buckets; the overall row only when all six tasks ran."]
    return title + "\n".join(lines)


def format_forced(forced: dict[str, list[dict]], setting: str) -> str:
    """The teacher-forced check beside greedy answers, per length bucket."""
    lines = [f"V2PE's teacher-forced check{f' ({setting})' if setting else ''} beside greedy answers on the same "
             "samples:", "", "| task | length | samples | teacher-forced | greedy | both right | forced only |",
             "|---|---|---|---|---|---|---|"]
    for task, rows in forced.items():
        for b, got in _long_buckets(rows).items():
            n = len(got)
            tf = sum(r["correct"] for r in got)
            gr = sum(r["greedy_score"] for r in got)
            both = sum(1 for r in got if r["correct"] and r["greedy_score"] == 1)
            only = sum(1 for r in got if r["correct"] and r["greedy_score"] < 1)
            lines.append(f"| {task} | {bucket_label(b)} | {n} | {100 * tf / n:.1f} | {100 * gr / n:.1f} | {both} "
                         f"| {only} |")
    lines += ["", "Teacher-forced: the prompt and its answer in one forward pass, right when the argmax tokens at "
                  "the answer's positions are the answer (an option's letter for multiple choice); greedy: the "
                  "protocol's score of the generated answer. A model can be right under teacher forcing and wrong "
                  "when it generates (the first token decides the rest)."]
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
