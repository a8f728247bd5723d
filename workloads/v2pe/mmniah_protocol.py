"""How an MM-NIAH sample is asked and its answer scored: the benchmark authors' protocol
(`evaluation.protocol: mm-niah`) and the V2PE authors' (`v2pe`), each as its authors'
code does it, so that a figure can sit beside the paper it comes from.

                   mm-niah                                v2pe
    code           OpenGVLab/MM-NIAH @ 2fd03dd            OpenGVLab/V2PE @ f96f189
                   eval_internvl.py, utils/tools.py,      eval/mm_niah/eval_mm_niah.py, tools.py,
                   calculate_scores.py                    calculate_scores.py, eval_mm_niah_long.py
    message        haystack + "\\n" + question              haystack + question
    instruction    "Answer the question using a single    the same, except when the released answer
                   word or phrase." on open questions     is a list (counting)
    budget         32 new tokens counting, 16 others      320 counting, 16 others
    tiles          1 per image (resized to one tile)      up to 5 and a thumbnail (12 in the
                                                          teacher-forced check)
    choice         the option's letter                    also "left" / "right" as A / B
    open answer    VQA normalisation, whole-word match    an exact match first (lower-cased, up to
                                                          the first period), then the same after
                                                          dropping "," and "?" and splitting "'s"

Both: options appended as "A. ..." lines (image options as `<image>` lines, their
images after the haystack's) and "Answer with the option's letter from the given
choices directly."; greedy decoding, one beam, `<|im_end|>` alone ends the answer, which
is decoded without special tokens; a counting
answer is a JSON list scored by positionwise soft accuracy. Their calculate_scores.py
(the same in both repositories) aggregates: a sample's context length falls in one of
eleven buckets by `np.digitize` over 1k ... 64k (under 1k: left out; 64k and longer:
the last bucket); its needle depth (the mean of several) in one of five bins
(`int(depth / 0.2)`, depth 1.0 counted as 0.99); a bucket's score is the mean over the
five depth bins of each bin's accuracy, an empty bin and an empty bucket counting 0;
a task's figure is the mean over all eleven buckets; the overall row is the mean over
the six tasks per bucket, given only when all six are scored.

One difference, on purpose: any response gets a score. Where the authors' scorer would
raise (a lone digit such as "²" read as a number, a JSON list nested past Python's
recursion limit, a counting answer of no items) the answer scores 0 here.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass

from .chat import IMAGE_PLACEHOLDER
from .mmniah import Item

log = logging.getLogger(__name__)

CHOICE_INSTRUCTION = "\nAnswer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "\nAnswer the question using a single word or phrase."
# Lower edges of the authors' context-length buckets (calculate_scores.py: x_bins).
BUCKETS = (1000, 2000, 4000, 8000, 12000, 16000, 24000, 32000, 40000, 48000, 64000)
# V2PE's long evaluation (eval_mm_niah_long.py) runs separate splits of 128K, 256K, 512K
# and 1M tokens; its teacher-forced table is bucketed by these edges too.
LONG_BUCKETS = BUCKETS + (128000, 256000, 512000, 1000000)
DEPTH_BINS = 5  # needle depth in [0, 1] cut into fifths
TASK_COUNT = 6  # the overall row needs every task


@dataclass(frozen=True)
class Protocol:
    name: str
    source: str  # the repository, commit and files it follows
    join: str  # between the haystack and the question
    instruct_list_answers: bool  # whether a question whose answer is released as a list gets the instruction
    counting_budget: int  # new tokens for a counting answer (16 for the others)
    max_tiles: int  # tiles per image
    thumbnail: bool
    spelt_directions: bool  # "left" / "right" read as options A / B
    exact_first: bool  # an open answer's exact match before the whole-word match
    tokenise: bool  # the tokenisation step before VQA normalisation
    forced_max_tiles: int | None = None  # tiles per image in the teacher-forced check (None: no such check)

    def question(self, item: Item) -> str:
        """The question as asked (options and instruction appended), as the authors'
        get_input builds it and their output files record it."""
        question = item.question
        if item.choices:
            question += "".join(f"\n{chr(ord('A') + i)}. {c}" for i, c in enumerate(item.choices))
            return question + CHOICE_INSTRUCTION
        if item.choice_images:
            question += "".join(f"\n{chr(ord('A') + i)}. {IMAGE_PLACEHOLDER}" for i in range(len(item.choice_images)))
            return question + CHOICE_INSTRUCTION
        if isinstance(item.raw_answer, list) and not self.instruct_list_answers:
            return question  # V2PE's tools.py: the counting instruction is commented out
        return question + OPEN_INSTRUCTION

    def message(self, item: Item) -> tuple[str, list[str]]:
        """(the user's message, its images in placeholder order)."""
        return item.context + self.join + self.question(item), item.images + list(item.choice_images or ())

    def record(self, item: Item, answer: str | None = None) -> dict:
        """The sample as a chat record of longview's data path (images relative to
        images/); with `answer`, the answer turn too (the teacher-forced check)."""
        text, images = self.message(item)
        turns = [{"from": "human", "value": text}]
        if answer is not None:
            turns.append({"from": "gpt", "value": answer})
        return {"id": f"{item.task}/{item.id}", "image": images, "conversations": turns}

    def budget(self, task: str) -> int:
        return self.counting_budget if "counting" in task else 16

    def score(self, answer, response: str) -> float:
        """One response's score, 0/1 or a counting list's soft accuracy; never raises."""
        try:
            return float(self._score(answer, response))
        except Exception as e:  # noqa: BLE001 - a model's answer must never stop an evaluation
            log.warning("MM-NIAH: a response (%d characters) could not be scored (%s: %s); scored 0",
                        len(response), type(e).__name__, e)
            return 0.0

    def _score(self, answer, response: str) -> float:
        response = response.strip(".")
        if isinstance(answer, int):
            return _choice(response, answer, self.spelt_directions)
        if isinstance(answer, list):
            return _counting(response, answer)
        if self.exact_first and _cut(response).strip() == _cut(answer):
            return 1
        return _whole_word(response, answer, self.tokenise)


MMNIAH = Protocol(
    name="mm-niah", source="OpenGVLab/MM-NIAH@2fd03ddcf0fa9f028963af3de1eea3b538a4314a (eval_internvl.py, "
                           "utils/tools.py, calculate_scores.py)",
    join="\n", instruct_list_answers=True, counting_budget=32, max_tiles=1, thumbnail=False,
    spelt_directions=False, exact_first=False, tokenise=False)
V2PE = Protocol(
    name="v2pe", source="OpenGVLab/V2PE@f96f18990e88f511ca0502b92fc30d8708ba3ada (eval/mm_niah/eval_mm_niah.py, "
                        "eval_mm_niah_long.py, tools.py, calculate_scores.py)",
    join="", instruct_list_answers=False, counting_budget=320, max_tiles=5, thumbnail=True,
    spelt_directions=True, exact_first=True, tokenise=True, forced_max_tiles=12)
PROTOCOLS = {p.name: p for p in (MMNIAH, V2PE)}


# --- one answer ----------------------------------------------------------------------------


def _choice(response: str, answer: int, spelt_directions: bool) -> int:
    """calculate_scores.py is_correct, an int answer: the option's letter."""
    if response.isdigit():
        try:
            return int(int(response) == answer)
        except ValueError:  # a digit int() cannot read ("²"), or more than Python's 4300
            return 0
    r = _cut(response).strip()
    if r == "none":
        return 0
    # answers of the authors' camera-motion questions, spelt out
    if "the camera is moving left" in r or (spelt_directions and r == "left"):
        r = "a"
    elif "the camera is moving right" in r or (spelt_directions and r == "right"):
        r = "b"
    return int(len(r) == 1 and ord(r) - ord("a") == answer)


def _counting(response: str, answer: list) -> float:
    """calculate_scores.py is_correct, a list answer: matches at equal positions over the
    answer's length."""
    try:
        said = json.loads(response.replace("json", "").replace("```", "").strip())
        if isinstance(said, dict):  # {"image 1": [...], ...}: the lists joined in order
            said = sum(list(said.values()), start=[])
    except Exception:  # noqa: BLE001 - as the authors: whatever does not read scores 0 (RecursionError too)
        return 0.0
    if not isinstance(said, (list, tuple)) or not answer:
        return 0.0
    return sum(s == a for s, a in zip(said, answer)) / len(answer)


def _cut(text: str) -> str:
    """calculate_scores.py (a choice; V2PE's exact match too): lower-cased, "the answer is" and "*" dropped, up to the
    first period (commas dropped then)."""
    t = text.lower().replace("the answer is", "").replace("*", "")
    if "." in t:
        t = t.split(".")[0].replace(",", "").strip()
    return t


# VQA answer normalisation (the VQA challenge's evaluation rules, as the authors' VQAEval
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
    spaced_number = _COMMA_IN_NUMBER.search(text) is not None
    for p in _PUNCT:
        spaced = p + " " in text or " " + p in text or spaced_number
        out = out.replace(p, "" if spaced else " ")
    return _PERIOD.sub("", out, count=int(re.UNICODE))


def _digits_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalise(text: str, tokenise: bool = False) -> str:
    """VQAEval's normalisation; `tokenise`: V2PE's word_tokenize step first."""
    if tokenise:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return _digits_articles(_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def _whole_word(response: str, answer, tokenise: bool) -> int:
    """VQAEval.evaluate: the normalised answer as a whole word of the normalised response."""
    said = normalise(response, tokenise)
    return int(re.search(r"\b" + re.escape(normalise(str(answer), tokenise)) + r"\b", said) is not None)


# --- aggregation, as calculate_scores.py -----------------------------------------------------


def bucket_label(edge: int) -> str:
    return f"{edge // 1000}k" if edge < 1000000 else f"{edge // 1000000}M"


def bucket_of(context_length: int, edges: tuple[int, ...] = BUCKETS) -> int:
    """np.digitize(context_length, edges) - 1: the bucket's index, -1 below the first edge."""
    return sum(context_length >= e for e in edges) - 1


def depth_bin(depth: float) -> int:
    """calculate_scores.py: int(y / 0.2), y = 1.0 counted as 0.99 (0.6 / 0.2 lands in bin 2)."""
    return int((0.99 if depth == 1.0 else depth) / (1 / DEPTH_BINS))


def task_buckets(entries: list[dict]) -> list[dict]:
    """One task's eleven buckets: {"bucket", "tokens", "samples", "score"}, the score the
    mean over the depth bins of each bin's mean (an empty bin, an empty bucket: 0).
    entries: {"context_length", "depth", "score"}; samples under 1k are left out."""
    cells = [[[] for _ in range(DEPTH_BINS)] for _ in BUCKETS]
    for e in entries:
        b = bucket_of(e["context_length"])
        if b >= 0:
            cells[b][depth_bin(e["depth"])].append(e["score"])
    return [{"bucket": bucket_label(edge), "tokens": edge, "samples": sum(map(len, bins)),
             "score": sum(sum(c) / len(c) if c else 0.0 for c in bins) / DEPTH_BINS}
            for edge, bins in zip(BUCKETS, cells)]


def task_figure(rows: list[dict]) -> float:
    """A task's figure: the mean over all eleven buckets, empty ones counting 0."""
    return sum(r["score"] for r in rows) / len(rows)


def overall_buckets(by_task: dict[str, list[dict]]) -> list[float] | None:
    """Per bucket the mean over the tasks; None unless all six are scored (as the authors)."""
    if len(by_task) != TASK_COUNT:
        return None
    return [sum(rows[i]["score"] for rows in by_task.values()) / TASK_COUNT for i in range(len(BUCKETS))]
