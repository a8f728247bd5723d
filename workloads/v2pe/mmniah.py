"""MM-NIAH ("Needle In A Multimodal Haystack"), as released and as its authors score it.

Layout of a released split (the user downloads it; longview downloads nothing):

    <split>/annotations/retrieval-text.jsonl   (and retrieval-image, counting-text,
    <split>/images/...                           counting-image, reasoning-text, reasoning-image)

One JSON object per line: `id`, `images_list` (paths under images/, one per `<image>`
in context and question), `context` (the haystack, `<image>` placeholders), `question`,
`answer` (a string for open questions, an int, the option index, for multiple choice,
a list, or that list as a JSON string, for counting) and `meta` (`placed_depth`: the
needle's relative depth, a float or one per needle; `context_length`: tokens of the
haystack; `choices`: text options or null; `choices_image_path`: image options or null).

The question asked (`question_of`) is built as the authors' evaluation builds it: the
options appended as "A. …" lines (image options as `<image>` lines, their images after
the haystack's), then the instruction to answer with a letter, or with a single word
or phrase. Answers are generated greedily (16 new tokens, 320 for counting) and scored
as the authors' `calculate_scores.py` scores them (`score`): multiple choice by the
letter, counting by soft accuracy (matches at equal positions over the answer's
length), open answers by VQA-style normalisation and a whole-word match. Per task, the
score of a context-length bucket is the mean over five needle-depth bins of each bin's
accuracy, an empty bin counting 0, and samples under 1000 tokens left out (`bucket_scores`).
The buckets are the authors' (1k … 64k) extended by 128k, 256k, 512k and 1M for V2PE's
longer evaluation; up to 64k they are the authors' exactly.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

from ..data_errors import DataError, printable
from ..files import MAX_LINE_BYTES, iter_lines
from .chat import IMAGE_PLACEHOLDER

TASKS = ("retrieval-text", "retrieval-image", "counting-text", "counting-image", "reasoning-text",
         "reasoning-image")
# Lower edges of the context-length buckets: the authors' eleven, then V2PE's longer ones.
BINS = (1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000, 40000, 48000, 64000, 128000, 256000, 512000,
        1000000)
DEPTH_BINS = 5  # needle depth in [0, 1] cut into fifths
CHOICE_INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "\nAnswer the question using a single word or phrase."


def bucket_label(edge: int) -> str:
    return f"{edge // 1000}k" if edge < 1000000 else f"{edge // 1000000}M"


def max_new_tokens(task: str) -> int:
    """The authors' answer budget: a counting answer is a list."""
    return 320 if task.startswith("counting") else 16


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
    answer: str | int | list
    images: list[str]
    choices: list[str] | None
    choice_images: list[str] | None
    context_length: int
    depth: float  # placed_depth, averaged over needles
    raw_depth: float | list  # as released, for the responses file
    where: str = ""  # file:line, for messages


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
                depth=sum(depths) / len(depths), raw_depth=depth, where=where)


def question_of(item: Item) -> tuple[str, list[str]]:
    """(the user's message, its images in placeholder order), as the authors build them."""
    question, images = item.question, list(item.images)
    if item.choices:
        question += "".join(f"\n{chr(ord('A') + i)}. {c}" for i, c in enumerate(item.choices)) + CHOICE_INSTRUCTION
    elif item.choice_images:
        question += "".join(f"\n{chr(ord('A') + i)}. {IMAGE_PLACEHOLDER}" for i in range(len(item.choice_images)))
        question += CHOICE_INSTRUCTION
        images += item.choice_images
    else:
        question += OPEN_INSTRUCTION
    return item.context + question, images


def record_of(item: Item) -> dict:
    """The sample as a chat record of longview's data path (images relative to images/)."""
    text, images = question_of(item)
    return {"id": f"{item.task}/{item.id}", "image": images, "conversations": [{"from": "human", "value": text}]}


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


# --- scoring, as the authors' calculate_scores.py ------------------------------------------------

# VQA answer normalisation (the VQA challenge's evaluation rules, as MM-NIAH's VQAEval
# applies them): number words to digits, articles dropped, contractions restored.
_NUMBERS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBERS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70", "eighty": "80",
                 "ninety": "90"})
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = dict(pair.split("=") for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's
thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd
theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't
wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's
whatve=what've whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've
who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's wont=won't
wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll
y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
you'dve=you'd've youll=you'll youre=you're youve=you've
""".split())
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
# A period not followed by a digit. (The reference's pattern also starts with "(?!<=\d)",
# a lookahead for the text "<=" + digit, which never blocks a match; and it is applied
# with count=re.UNICODE, so at most 32 periods go: kept here, to score alike.)
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        spaced = (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None
        out = out.replace(p, "" if spaced else " ")
    return _PERIOD.sub("", out, count=int(re.UNICODE))


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalise(text: str) -> str:
    return _digits_articles(_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def _has_word(sentence: str, word: str) -> bool:
    return re.search(r"\b" + re.escape(word) + r"\b", sentence) is not None


def _open_match(response: str, answer) -> int:
    said = normalise(response)
    answers = answer if isinstance(answer, list) else [answer]
    return int(any(_has_word(said, normalise(str(a))) for a in answers))


def _choice_match(response: str, answer: int) -> int:
    if response.isdigit():
        return int(int(response) == answer)
    r = response.lower().replace("the answer is", "").replace("*", "")
    if "." in r:
        r = r.split(".")[0].replace(",", "").strip()
    r = r.strip()
    if r == "none":
        return 0
    # answers of the authors' camera-motion questions, spelt out
    if "the camera is moving left" in r:
        r = "a"
    elif "the camera is moving right" in r:
        r = "b"
    return int(len(r) == 1 and ord(r) - ord("a") == answer)


def _list_match(response: str, answer: list) -> float:
    try:
        said = json.loads(response.replace("json", "").replace("```", "").strip())
    except (json.JSONDecodeError, ValueError):
        return 0.0
    if isinstance(said, dict):  # {"image 1": [...], ...}: the lists joined in order
        if not all(isinstance(v, list) for v in said.values()):
            return 0.0
        said = sum(said.values(), [])
    if not isinstance(said, (list, tuple)) or not answer:
        return 0.0
    return sum(s == a for s, a in zip(said, answer)) / len(answer)


def score(answer, response: str) -> float:
    """One response's score: 0/1, or the soft accuracy of a counting list."""
    response = response.strip(".")
    if isinstance(answer, int) and not isinstance(answer, bool):
        return float(_choice_match(response, answer))
    if isinstance(answer, list):  # the reference matches any list answer position by position
        return _list_match(response, answer)
    return float(_open_match(response, answer))


def bucket_of(context_length: int) -> int:
    """Index into BINS of the bucket a length falls in; -1 below the first edge."""
    i = -1
    for j, edge in enumerate(BINS):
        if context_length >= edge:
            i = j
    return i


def bucket_scores(entries: list[dict]) -> list[dict]:
    """Per context-length bucket of one task: the authors' score (mean over the depth
    bins of each bin's mean score, an empty bin counting 0), the plain mean and the
    sample count. entries: {"context_length", "depth", "score"}. Buckets without any
    sample are left out; samples under BINS[0] tokens are not scored (as the authors)."""
    cells: dict[int, list[list[float]]] = {}
    for e in entries:
        b = bucket_of(e["context_length"])
        if b < 0:
            continue
        y = 0.99 if e["depth"] == 1.0 else e["depth"]
        d = int(y / (1 / DEPTH_BINS))  # as the reference computes it (0.6 / 0.2 lands in bin 2)
        cells.setdefault(b, [[] for _ in range(DEPTH_BINS)])[d].append(e["score"])
    rows = []
    for b in sorted(cells):
        bins = cells[b]
        flat = [s for cell in bins for s in cell]
        rows.append({"bucket": bucket_label(BINS[b]), "tokens": BINS[b], "samples": len(flat),
                     "score": sum(sum(c) / len(c) if c else 0.0 for c in bins) / DEPTH_BINS,
                     "mean": sum(flat) / len(flat)})
    return rows
