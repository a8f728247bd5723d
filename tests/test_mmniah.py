"""MM-NIAH: its released format read, questions built and answers scored as its authors
do, and `MMNIAHEvaluation` end to end on a split in the released layout (one process and
a context-parallel group of two)."""

import json
import os

import fsspec
import pytest

from orchestrator.config import load_config
from tests import v2pe_cases
from tests.mmniah_fixture import write_split
from tests.test_v2pe_generate import decisive_model
from tests.v2pe_helpers import tiny_model
from workloads.data_errors import DataError
from workloads.v2pe.hf_checkpoint import save_pretrained
from workloads.v2pe.mmniah import (
    BINS,
    bucket_of,
    bucket_scores,
    find_tasks,
    normalise,
    parse_item,
    question_of,
    read_items,
    score,
)
from workloads.v2pe.mmniah_eval import MMNIAHEvaluation, eval_positions

# --- scoring: the authors' rules, case by case ----------------------------------------------


@pytest.mark.parametrize("answer,response,want", [
    # multiple choice (answer = option index): the letter, however it is dressed
    (1, "B", 1), (1, "b.", 1), (2, "The answer is C.", 1), (0, "**A**", 1), (1, "A", 0), (1, "B, because", 0),
    (2, "2", 1),  # a bare number is compared with the index itself, as the reference does
    (0, "None", 0), (0, "The camera is moving left.", 1),
    # counting: positionwise matches over the answer's length
    ([3, 5], "[3, 5]", 1.0), ([3, 5], "[3, 4]", 0.5), ([3, 5], "[3]", 0.5), ([3, 5], "```json\n[3, 5]\n```", 1.0),
    ([3, 5], '{"image 1": [3], "image 2": [5]}', 1.0), ([3, 5], "three and five", 0.0), ([3, 5], "7", 0.0),
    # open answers: VQA normalisation, then a whole-word match
    ("7421", "The code is 7421.", 1), ("Ada", "ada", 1), ("green", "It is green!", 1), ("car", "cars", 0),
    ("2 apples", "Two apples", 1), ("red car", "the red car", 1), ("don't", "dont", 1), ("blue", "green", 0),
])
def test_answers_are_scored_as_the_authors_score_them(answer, response, want):
    assert score(answer, response) == want


def test_normalisation_follows_the_vqa_rules():
    assert normalise("The  Two dogs, a cat.") == "2 dogs cat"
    assert normalise("1,000 people") == "1000 people"  # a comma inside a number joins it
    assert normalise("yes-no") == "yes no"


def test_buckets_and_depth_bins_are_the_authors():
    assert bucket_of(999) == -1 and bucket_of(1000) == 0 and bucket_of(63999) == BINS.index(48000)
    assert bucket_of(64000) == BINS.index(64000) and bucket_of(1_048_576) == BINS.index(1000000)
    # One bucket, two depth bins filled (score 1 and 0), three empty: the authors' mean
    # over the five bins counts the empty ones as 0.
    entries = [{"context_length": 1500, "depth": 0.1, "score": 1.0}, {"context_length": 1500, "depth": 1.0, "score": 0.0},
               {"context_length": 500, "depth": 0.5, "score": 1.0}]  # under 1k: left out
    (row,) = bucket_scores(entries)
    assert (row["bucket"], row["samples"], row["score"], row["mean"]) == ("1k", 2, 0.2, 0.5)
    # 0.6 / 0.2 is 2.999…: the reference puts depth 0.6 in bin 2, and so do we
    two = bucket_scores([{"context_length": 1500, "depth": 0.6, "score": 1.0},
                         {"context_length": 1500, "depth": 0.5, "score": 1.0}])
    assert two[0]["score"] == pytest.approx(1 / 5)  # both in one bin


# --- the released layout ------------------------------------------------------------------


def test_the_released_layout_reads_and_questions_are_built_as_the_authors(tmp_path):
    root = write_split(str(tmp_path / "mm_niah_val"))
    fs = fsspec.filesystem("file")
    tasks = find_tasks(fs, root)
    assert list(tasks) == ["retrieval-text", "retrieval-image", "counting-text", "counting-image", "reasoning-text",
                           "reasoning-image"]
    items = {t: list(read_items(fs, p, t)) for t, p in tasks.items()}
    assert items["counting-text"][1].answer == [2]  # released as JSON text
    assert items["counting-text"][0].depth == pytest.approx(0.5)  # two needles: their mean depth
    text, images = question_of(items["reasoning-text"][0])
    assert text.endswith("Who is the youngest?\nA. Ada\nB. Bob\nC. Cy\n"
                         "Answer with the option's letter from the given choices directly.")
    assert images == ["ret/0_a.png"]
    text, images = question_of(items["retrieval-image"][0])
    assert text.endswith("\nA. <image>\nB. <image>\nC. <image>\n"
                         "Answer with the option's letter from the given choices directly.")
    assert images == ["ret/0_a.png", "opt/a.png", "opt/b.png", "opt/c.png"]  # options after the haystack's
    text, _ = question_of(items["retrieval-text"][0])
    assert text.endswith("What is the secret code?\nAnswer the question using a single word or phrase.")


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(images_list=[]), r"retrieval-text sample 0 .*: 1 '<image>' placeholder\(s\) .* but 0"),
    (lambda r: r["meta"].update(context_length="long"), r"meta.context_length must be a token count, got long"),
    (lambda r: r["meta"].update(placed_depth=1.5), r"meta.placed_depth must be a number in \[0, 1\]"),
    (lambda r: r.pop("question"), r"'question' must be a string"),
    (lambda r: r["meta"].update(needles="7421"), r"f.jsonl:1\): meta.needles must be a list of strings, got 7421"),
    # an option's index without the options: said so, not "a wrong answer type"
    (lambda r: r.update(answer=2), r"f.jsonl:1\): answer 2 is an option's index but the sample has no options "
                                   r"\(meta.choices or meta.choices_image_path\)"),
])
def test_a_bad_sample_is_named(change, message):
    from tests.mmniah_fixture import samples

    rec = json.loads(json.dumps(samples()["retrieval-text"][0]))
    change(rec)
    with pytest.raises(DataError, match=message):
        parse_item(rec, "retrieval-text", "f.jsonl:1")


# --- the evaluation ---------------------------------------------------------------------------


def job(tmp_path, data, **extra):
    sets = {"evaluation.benchmark": "mm-niah", "evaluation.data": data, "data.max_tokens": 20000,
            "model.overrides": {"vision_image_size": 56}, **extra}
    return load_config("name: mm\nworkload: v2pe\n", overrides=sets)


def exported_model(tmp_path):
    model = decisive_model()  # answers far from ties: one process and a group agree token for token
    url = str(tmp_path / "export")
    save_pretrained(model, url)
    return url


def test_wrong_layout_missing_image_and_too_long_stop_prepare_naming_them(tmp_path):
    ev, model = MMNIAHEvaluation(), exported_model(tmp_path)
    with pytest.raises(DataError, match=r"evaluation.data: .*nowhere has no annotations/ folder"):
        ev.prepare(job(tmp_path, str(tmp_path / "nowhere")), str(tmp_path / "run"), model)
    root = write_split(str(tmp_path / "split"))
    (tmp_path / "split" / "images" / "opt" / "b.png").unlink()
    with pytest.raises(DataError, match=r"retrieval-image sample 0 .*: image opt/b.png is not in"):
        ev.prepare(job(tmp_path, root), str(tmp_path / "run"), model)
    root = write_split(str(tmp_path / "split2"), tasks=["counting-image"])
    with pytest.raises(DataError, match=r"counting-image sample 0 .*: meta.context_length 9000 exceeds "
                                        r"data.max_tokens=8192"):
        ev.prepare(job(tmp_path, root, **{"data.max_tokens": 8192}), str(tmp_path / "run"), model)
    with pytest.raises(DataError, match=r"has no reasoning-text.jsonl"):
        ev.prepare(job(tmp_path, root, **{"evaluation.tasks": ["reasoning-text"]}), str(tmp_path / "run"), model)


def test_every_input_problem_stops_prepare_before_the_job_naming_file_line_and_field(tmp_path):
    """What the workers met mid-generation, or never: all found by `prepare`, on the driver,
    before any worker starts, each naming the file, the line and the field."""
    ev, model = MMNIAHEvaluation(), exported_model(tmp_path)

    def split(name, **kw):
        root = write_split(str(tmp_path / name), **kw)
        return root, tmp_path / name / "annotations"

    root, ann = split("empty", tasks=["retrieval-text", "counting-text"])
    (ann / "counting-text.jsonl").write_text("")
    with pytest.raises(DataError, match=r"counting-text \(.*empty/annotations/counting-text.jsonl\): no samples "
                                        r"\(an empty annotations file\)"):
        ev.prepare(job(tmp_path, root), str(tmp_path / "run"), model)

    root, ann = split("long", tasks=["retrieval-text"])
    first = (ann / "retrieval-text.jsonl").read_text().splitlines()[0]
    with open(ann / "retrieval-text.jsonl", "a") as f:  # line 4: 20 MB, past data.max_line_bytes (16 MiB)
        f.write(json.dumps({**json.loads(first), "context": "x" * (20 << 20)}) + "\n")
    with pytest.raises(DataError, match=r"retrieval-text line 4 \(.*retrieval-text.jsonl:4\): longer than "
                                        r"data.max_line_bytes=16777216"):
        ev.prepare(job(tmp_path, root), str(tmp_path / "run"), model)

    root, ann = split("link", tasks=["retrieval-text"])
    secret = tmp_path / "outside.png"
    (tmp_path / "link" / "images" / "ret" / "0_a.png").rename(secret)
    os.symlink(secret, tmp_path / "link" / "images" / "ret" / "0_a.png")  # a link out of the split
    with pytest.raises(DataError, match=r"images_list: sample retrieval-text sample 0 \(.*retrieval-text.jsonl:1\): "
                                        r"image ret/0_a.png is outside the dataset's root"):
        ev.prepare(job(tmp_path, root), str(tmp_path / "run"), model)

    root, ann = split("typo", tasks=["retrieval-text"])
    (ann / "retreival-image.jsonl").write_text(first + "\n")  # misspelt: would go unscored
    with pytest.raises(DataError, match=r"annotations has annotation file\(s\) of no MM-NIAH task: "
                                        r"retreival-image.jsonl"):
        ev.prepare(job(tmp_path, root), str(tmp_path / "run"), model)


def test_an_evaluation_run_generates_scores_and_writes_the_authors_output(gloo_world, tmp_path):
    root = write_split(str(tmp_path / "mm_niah_val"))
    sets = {"evaluation.max_new_tokens": 4}
    cfg = job(tmp_path, root, **sets)
    model = exported_model(tmp_path)
    prepared = MMNIAHEvaluation().prepare(cfg, str(tmp_path / "run"), model)
    (res,) = gloo_world(1).run(v2pe_cases.mmniah_run, root, sets, model, prepared, str(tmp_path / "run"))
    # Every task has a curve against context length; the sample under 1000 tokens is not scored.
    assert {r["task"] for r in res.records} == {"retrieval-text", "retrieval-image", "counting-text",
                                                 "counting-image", "reasoning-text", "reasoning-image"}
    assert sorted(res.curves["mmniah_retrieval_text"]) == [1000, 4000]
    assert sorted(res.curves["mmniah_counting_text"]) == [1000, 2000]
    assert "| retrieval-text |" in res.table and "overall" not in res.table.split("\n")[-3]  # buckets differ per task
    # The responses in the authors' output format; re-scoring them gives the same curves.
    out = tmp_path / "run" / "eval" / "mm-niah" / "retrieval-text.jsonl"
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["0", "1", "2"]
    assert set(rows[0]) == {"question_id", "question", "answer", "response", "context_length", "placed_depth"}
    rescored = bucket_scores([{"context_length": r["context_length"], "depth": r["placed_depth"],
                               "score": score(r["answer"], r["response"])} for r in rows])
    assert {r["tokens"]: r["score"] for r in rescored} == res.curves["mmniah_retrieval_text"]
    assert eval_positions(cfg, tiny_model().cfg)[0].stride == 64  # v2pe_rnd trained: the authors' stride


def test_answers_over_a_context_parallel_group_equal_one_process(gloo_world, tmp_path):
    root = write_split(str(tmp_path / "mm_niah_val"), tasks=["retrieval-text", "retrieval-image"])
    model = exported_model(tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    sets = {"evaluation.max_new_tokens": 4, "evaluation.strides": [64]}
    cfg = job(tmp_path, root, **sets)
    prepared = MMNIAHEvaluation().prepare(cfg, one, model)
    (want,) = gloo_world(1).run(v2pe_cases.mmniah_run, root, sets, model, prepared, one)
    got = gloo_world(2).run(v2pe_cases.mmniah_run, root, sets, model, prepared, two)
    assert got[0].records == got[1].records == want.records
    for task in ("retrieval-text", "retrieval-image"):
        assert (tmp_path / "two" / "eval" / "mm-niah" / f"{task}.jsonl").read_text() == \
            (tmp_path / "one" / "eval" / "mm-niah" / f"{task}.jsonl").read_text()
