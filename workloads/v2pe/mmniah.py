"""MM-NIAH ("Needle In A Multimodal Haystack") as released: the split's layout and its
samples, read and checked. How a sample is asked and scored is a protocol's
(`mmniah_protocol.py`): the benchmark authors' or the V2PE authors'.

Layout of a released split (the user downloads it; longview downloads nothing):

    <split>/annotations/retrieval-text.jsonl   (and retrieval-image, counting-text,
    <split>/images/...                           counting-image, reasoning-text, reasoning-image)

One JSON object per line: `id`, `images_list` (paths under images/, one per `<image>`
in context and question), `context` (the haystack, `<image>` placeholders), `question`,
`answer` (a string for open questions, an int, the option index, for multiple choice,
a list, or that list as a JSON string, for counting) and `meta` (`placed_depth`: the
needle's relative depth, a float or one per needle; `context_length`: tokens of the
haystack; `choices`: text options or null; `choices_image_path`: image options or null).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

from ..data_errors import DataError, printable
from ..files import MAX_LINE_BYTES, iter_lines
from .chat import IMAGE_PLACEHOLDER

TASKS = ("retrieval-text", "retrieval-image", "counting-text", "counting-image", "reasoning-text",
         "reasoning-image")


# --- the released layout -------------------------------------------------------------------


def find_tasks(fs, root: str, tasks: list[str] | None = None) -> dict[str, str]:
    """{task: annotation file} of a split folder; an error names what the layout lacks."""
    ann = posixpath.join(root, "annotations")
    if not fs.isdir(ann):
        raise DataError(f"evaluation.data: {root} has no annotations/ folder (MM-NIAH's released layout: "
                        f"annotations/<task>.jsonl for tasks {', '.join(TASKS)}, images/)", "layout")
    if not fs.isdir(posixpath.join(root, "images")):
        raise DataError(f"evaluation.data: {root} has no images/ folder (MM-NIAH's released layout)", "layout")
    found = {t: posixpath.join(ann, f"{t}.jsonl") for t in TASKS if fs.isfile(posixpath.join(ann, f"{t}.jsonl"))}
    unknown = sorted(posixpath.basename(p) for p in fs.ls(ann, detail=False)
                     if p.endswith(".jsonl") and posixpath.basename(p)[:-len(".jsonl")] not in TASKS)
    if unknown and not tasks:  # a renamed or misspelt task would go unscored without a word
        raise DataError(f"evaluation.data: {ann} has annotation file(s) of no MM-NIAH task: {', '.join(unknown)} "
                        f"(the tasks: {', '.join(f'{t}.jsonl' for t in TASKS)}); rename them, or name the tasks to "
                        "score in evaluation.tasks", "layout")
    wanted = tasks or list(found)
    missing = [t for t in wanted if t not in found]
    if missing or not wanted:
        raise DataError(f"evaluation.data: {ann} has no {', '.join(f'{t}.jsonl' for t in missing or TASKS)}",
                        "layout")
    return {t: found[t] for t in wanted}


@dataclass
class Item:
    """One MM-NIAH sample, checked."""

    id: str
    task: str
    context: str
    question: str
    answer: str | int | list  # parsed: a counting answer released as JSON text is its list
    images: list[str]
    choices: list[str] | None
    choice_images: list[str] | None
    context_length: int
    depth: float  # placed_depth, averaged over needles
    raw_depth: float | list  # as released, for the responses file
    where: str = ""  # file:line, for messages
    raw_id: object = None  # `id` as released (the authors' output files carry it as is)
    raw_answer: object = None  # `answer` as released (a protocol may ask by its type)


def parse_item(rec, task: str, where: str) -> Item:
    """A released line as an `Item`; a DataError names the sample and the field."""
    name = f"{task} sample {printable(rec.get('id', '?') if isinstance(rec, dict) else '?', 40)} ({where})"

    def bad(what: str):
        return DataError(f"{name}: {what}", "record")

    if not isinstance(rec, dict):
        raise bad("not a JSON object")
    meta = rec.get("meta")
    if not isinstance(meta, dict):
        raise bad("'meta' must be an object")
    for key in ("context", "question"):
        if not isinstance(rec.get(key), str):
            raise bad(f"{key!r} must be a string")
    images = rec.get("images_list")
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise bad("'images_list' must be a list of paths")
    n = rec["context"].count(IMAGE_PLACEHOLDER) + rec["question"].count(IMAGE_PLACEHOLDER)
    if n != len(images):
        raise bad(f"{n} '<image>' placeholder(s) in context and question but {len(images)} in images_list")
    choices, choice_images = meta.get("choices"), meta.get("choices_image_path")
    for key, value in (("choices", choices), ("choices_image_path", choice_images)):
        if value is not None and (not isinstance(value, list) or not all(isinstance(c, str) for c in value)):
            raise bad(f"meta.{key} must be a list of strings or null")
    if choices and choice_images:
        raise bad("meta.choices and meta.choices_image_path are both set")
    needles = meta.get("needles")
    if needles is not None and (not isinstance(needles, list) or not all(isinstance(x, str) for x in needles)):
        raise bad(f"meta.needles must be a list of strings, got {printable(needles, 40)}")
    answer = rec.get("answer")
    if task.startswith("counting") and isinstance(answer, str):
        try:
            answer = json.loads(answer)  # released as the list's JSON text
        except json.JSONDecodeError:
            raise bad(f"counting answer {printable(answer, 60)} is not a JSON list") from None
    if choices or choice_images:
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices or choice_images):
            raise bad(f"a multiple-choice answer must be an option's index, got {printable(answer, 40)}")
    elif task.startswith("counting"):
        if not isinstance(answer, list):
            raise bad(f"a counting answer must be a list, got {printable(answer, 40)}")
    elif isinstance(answer, int) and not isinstance(answer, bool):  # an option's index, without the options
        raise bad(f"answer {answer} is an option's index but the sample has no options (meta.choices or "
                  "meta.choices_image_path)")
    elif not isinstance(answer, (str, list)):
        raise bad(f"an open answer must be a string or a list of strings, got {printable(answer, 40)}")
    length = meta.get("context_length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise bad(f"meta.context_length must be a token count, got {printable(length, 40)}")
    depth = meta.get("placed_depth")
    depths = depth if isinstance(depth, list) else [depth]
    if not depths or not all(isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d <= 1 for d in depths):
        raise bad(f"meta.placed_depth must be a number in [0, 1] or a list of them, got {printable(depth, 40)}")
    return Item(id=str(rec.get("id")), task=task, context=rec["context"], question=rec["question"], answer=answer,
                images=list(images), choices=choices, choice_images=choice_images, context_length=length,
                depth=sum(depths) / len(depths), raw_depth=depth, where=where, raw_id=rec.get("id"),
                raw_answer=rec.get("answer"))


def read_items(fs, path: str, task: str, url: str | None = None, *,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Item]:
    """The task's samples in file order; `url`: how messages name the file (else path).
    A line over `max_line_bytes` (data.max_line_bytes) is refused without being held."""
    with fs.open(path, "rb") as f:
        for _, n, line in iter_lines(f, max_line_bytes):
            if line is None:
                raise DataError(f"{task} line {n} ({url or path}:{n}): longer than data.max_line_bytes="
                                f"{max_line_bytes}", "too_large")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{task} line {n} ({url or path}:{n}): not JSON ({e})", "record") from None
            yield parse_item(rec, task, f"{url or path}:{n}")
