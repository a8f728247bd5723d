"""MM-NIAH's two evaluation protocols against their authors' code.

Expected values are worked out from the authors' files, named with their lines:
OpenGVLab/MM-NIAH @ 2fd03dd ("MM-NIAH") and OpenGVLab/V2PE @ f96f189 ("V2PE", under
eval/mm_niah/). The scoring tables were also checked by running both authors'
`is_correct` on 8,883 generated (answer, response) pairs: no difference, except the 15
pairs on which theirs raises (tested below as 0)."""

import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workloads.v2pe.mmniah import parse_item
from workloads.v2pe.mmniah_protocol import (
    BUCKETS,
    MMNIAH,
    V2PE,
    bucket_of,
    depth_bin,
    overall_buckets,
    task_buckets,
    task_figure,
)


def item(task="retrieval-text", answer="7421", choices=None, choice_images=None, question="What is the code?"):
    rec = {"id": 7, "images_list": ["a.png"], "context": "Haystack <image> with the code 7421.", "question": question,
           "answer": answer, "meta": {"placed_depth": 0.5, "context_length": 1500, "choices": choices,
                                      "choices_image_path": choice_images}}
    return parse_item(rec, task, "f.jsonl:1")


OPEN = "\nAnswer the question using a single word or phrase."
CHOICE = "\nAnswer with the option's letter from the given choices directly."


# --- the question asked ------------------------------------------------------------------------


def test_the_mmniah_protocol_asks_as_the_benchmark_authors():
    # MM-NIAH eval_internvl.py:279 qs = f'{context}\n{question}'; utils/tools.py:356 the instruction
    text, images = MMNIAH.message(item())
    assert text == "Haystack <image> with the code 7421.\nWhat is the code?" + OPEN and images == ["a.png"]
    # utils/tools.py:350-352: a counting answer released as a list gets the same instruction
    counting = item("counting-text", answer=[3, 5], question="How many?")
    assert MMNIAH.question(counting) == "How many?" + OPEN
    # utils/tools.py:337-340: text options as "A. ..." lines, then the letter instruction
    assert MMNIAH.question(item(answer=1, choices=["red", "blue"])) == "What is the code?\nA. red\nB. blue" + CHOICE
    # utils/tools.py:343-347: image options as <image> lines, their images after the haystack's
    text, images = MMNIAH.message(item(answer=0, choice_images=["o1.png", "o2.png"]))
    assert text.endswith("What is the code?\nA. <image>\nB. <image>" + CHOICE)
    assert images == ["a.png", "o1.png", "o2.png"]
    # eval_internvl.py:303 budgets; :285 one tile per image (dynamic_image_size=False)
    assert (MMNIAH.budget("counting-image"), MMNIAH.budget("retrieval-text"), MMNIAH.max_tiles) == (32, 16, 1)
    assert MMNIAH.forced_max_tiles is None


def test_the_v2pe_protocol_asks_as_the_v2pe_authors():
    # V2PE eval_mm_niah.py:187 qs = f'{context}{question}' (no newline between)
    text, _ = V2PE.message(item())
    assert text == "Haystack <image> with the code 7421.What is the code?" + OPEN
    # tools.py:323-325: no instruction when the released answer is a list ...
    assert V2PE.question(item("counting-text", answer=[3, 5], question="How many?")) == "How many?"
    # ... tools.py:329-330: but the JSON text of a list is not a list: the instruction is added
    assert V2PE.question(item("counting-text", answer="[3, 5]", question="How many?")) == "How many?" + OPEN
    # eval_mm_niah.py:213 budgets; :194 up to 5 tiles and a thumbnail; eval_mm_niah_long.py:251 12 tiles
    assert (V2PE.budget("counting-text"), V2PE.budget("reasoning-image")) == (320, 16)
    assert (V2PE.max_tiles, V2PE.thumbnail, V2PE.forced_max_tiles) == (5, True, 12)


# --- one answer's score ------------------------------------------------------------------------

# (answer, response, MM-NIAH's score, V2PE's score); lines of calculate_scores.py in each.
SCORES = [
    # multiple choice, MM-NIAH :21-46 / V2PE :21-46
    (1, "B", 1, 1), (1, "b.", 1, 1), (2, "The answer is C.", 1, 1), (0, "**A**", 1, 1), (1, "A", 0, 0),
    (1, "B, because", 0, 0), (2, "2", 1, 1),  # a bare number is compared with the index itself (:22-23)
    (0, "None", 0, 0), (0, "The camera is moving left.", 1, 1),
    (0, "left", 0, 1), (1, "Right", 0, 1),  # V2PE :37-40 reads "left"/"right" as A/B; MM-NIAH :37-40 does not
    # counting, :48-65 in both: positionwise matches over the answer's length
    ([3, 5], "[3, 5]", 1.0, 1.0), ([3, 5], "[3, 4]", 0.5, 0.5), ([3, 5], "[3]", 0.5, 0.5),
    ([3, 5], "```json\n[3, 5]\n```", 1.0, 1.0), ([3, 5], '{"image 1": [3], "image 2": [5]}', 1.0, 1.0),
    ([3, 5], "three and five", 0.0, 0.0), ([3, 5], "7", 0.0, 0.0), ([3, 5], "[3, 5, 9]", 1.0, 1.0),
    # open answers: MM-NIAH :67 VQAEval.evaluate; V2PE :67-90 an exact match first, then VQAEval
    ("7421", "The code is 7421.", 1, 1), ("Ada", "ada", 1, 1), ("green", "It is green!", 1, 1), ("car", "cars", 0, 0),
    ("2 apples", "Two apples", 1, 1), ("red car", "the red car", 1, 1), ("don't", "dont", 1, 1),
    ("blue", "green", 0, 0),
    ("Paris. France", "paris", 0, 1),  # V2PE :72-88: both cut at the first period, then equal
    ("yes", "yes?no", 1, 0),  # V2PE tools.py:89-92 drops "?" first: "yesno" holds no word "yes"
]


@pytest.mark.parametrize("answer,response,mmniah,v2pe", SCORES)
def test_one_answer_is_scored_as_each_protocols_authors(answer, response, mmniah, v2pe):
    assert (MMNIAH.score(answer, response), V2PE.score(answer, response)) == (mmniah, v2pe)


@pytest.mark.parametrize("answer,response", [
    (1, "²"),  # str.isdigit() is true and int() refuses it: the authors' :23 raises ValueError
    (1, "9" * 5000),  # past Python's 4300-digit int() limit: theirs raises
    ([], "[3, 5]"),  # a counting answer of no items: theirs divides by zero (:65)
    ([3, 5], "[" * 1000),  # nested past the recursion limit: theirs catches it (:54), so do we
    ([3, 5], "[" * 100000 + "]" * 100000),
])
def test_what_the_authors_scorer_cannot_read_scores_zero(answer, response):
    for protocol in (MMNIAH, V2PE):
        assert protocol._score(answer, response) == 0  # handled, not caught by the last-resort net


HOSTILE = st.one_of(
    st.text(max_size=200),
    st.builds(lambda n, c: c * n, st.integers(0, 5000), st.sampled_from(["[", "{", "[[", '{"a":', "(", "\u0301"])),
    st.builds(lambda d: d, st.text(alphabet=string.digits + "²³١٢", min_size=1, max_size=6000)),
    st.text(alphabet=st.characters(categories=["Cc", "Mn", "Zs", "Nd", "No", "P"]), max_size=300),
    st.builds(lambda xs: json.dumps(xs), st.recursive(st.integers() | st.floats() | st.text(max_size=5),
                                                      lambda c: st.lists(c, max_size=4) | st.dictionaries(
                                                          st.text(max_size=3), c, max_size=3), max_leaves=20)),
)


@settings(max_examples=300, deadline=None)
@given(response=HOSTILE, answer=st.sampled_from([0, 3, [3, 5], [], "7421", "Paris. France", "don't", ""]))
def test_any_response_gets_a_score_without_an_exception(response, answer):
    for protocol in (MMNIAH, V2PE):
        got = protocol._score(answer, response)
        assert 0 <= got <= 1


def test_a_megabyte_response_is_scored():
    long = "the answer is 7421 " + "filler " * 150000  # ~1 MB
    assert MMNIAH.score("7421", long) == 1 and V2PE.score("7421", long) == 1
    assert MMNIAH.score([3, 5], "[" + "3, " * 300000 + "5]") == 0.5


# --- aggregation, calculate_scores.py (the same lines in both repositories) --------------------


def test_buckets_depth_bins_and_the_averages_are_the_authors():
    # :131 np.digitize over the eleven edges: under 1k in none, 64k and longer in the last
    assert bucket_of(999) == -1 and bucket_of(1000) == 0 and bucket_of(63999) == 9
    assert bucket_of(64000) == 10 and bucket_of(1_048_576) == 10 and len(BUCKETS) == 11
    # :122-132: depth 1.0 counted as 0.99; 0.6 / 0.2 is 2.999...: bin 2
    assert (depth_bin(1.0), depth_bin(0.6), depth_bin(0.0), depth_bin(0.2)) == (4, 2, 0, 1)
    entries = [{"context_length": 1500, "depth": 0.1, "score": 1.0}, {"context_length": 1500, "depth": 1.0, "score": 0.0},
               {"context_length": 500, "depth": 0.5, "score": 1.0},  # under 1k: left out
               {"context_length": 300000, "depth": 0.5, "score": 0.5}]  # the 64k bucket
    rows = task_buckets(entries)
    # :136 a cell's mean, an empty cell 0; :162 the mean over the five depth bins
    assert [(r["bucket"], r["samples"]) for r in rows][:2] == [("1k", 2), ("2k", 0)]
    assert rows[0]["score"] == pytest.approx((1.0 + 0.0) / 5) and rows[10]["score"] == pytest.approx(0.5 / 5)
    # a task's figure: the mean over the eleven buckets, the empty ones counting 0
    assert task_figure(rows) == pytest.approx((0.2 + 0.1) / 11)
    # save(), :72-78: the overall row only with all six tasks, the mean over them per bucket
    tasks = {f"t{i}": task_buckets([{"context_length": 1500, "depth": 0.1, "score": i / 5}]) for i in range(6)}
    assert overall_buckets(dict(list(tasks.items())[:5])) is None
    overall = overall_buckets(tasks)
    assert overall[0] == pytest.approx(sum(i / 5 / 5 for i in range(6)) / 6) and overall[1:] == [0.0] * 10
