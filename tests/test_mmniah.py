"""MM-NIAH: its released format read, and `MMNIAHEvaluation` end to end on a split in the
released layout (one process and a context-parallel group of two), under both protocols.
How a protocol asks and scores: tests/test_mmniah_protocol.py."""

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
from workloads.fields import FieldError
from workloads.v2pe.hf_checkpoint import save_pretrained
from workloads.v2pe.mmniah import find_tasks, parse_item, read_items
from workloads.v2pe.mmniah_eval import MMNIAHEvaluation, eval_positions
from workloads.v2pe.mmniah_protocol import MMNIAH, V2PE, task_buckets

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
    assert items["counting-text"][1].raw_answer == "[2]" and items["counting-text"][0].raw_answer == [3, 5]
    text, images = MMNIAH.message(items["reasoning-text"][0])
    assert text.endswith(" \nWho is the youngest?\nA. Ada\nB. Bob\nC. Cy\n"
                         "Answer with the option's letter from the given choices directly.")
    assert images == ["ret/0_a.png"]
    text, images = V2PE.message(items["retrieval-image"][0])
    assert text.endswith(" Which of the following images appears in the document?\nA. <image>\nB. <image>\n"
                         "C. <image>\nAnswer with the option's letter from the given choices directly.")
    assert images == ["ret/0_a.png", "opt/a.png", "opt/b.png", "opt/c.png"]  # options after the haystack's


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
            "evaluation.model_name": "tiny",
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


AUTHORS_FIELDS = {"question_id", "question", "answer", "response", "context_length", "placed_depth"}


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_an_evaluation_run_generates_scores_and_writes_the_authors_output(gloo_world, tmp_path):
    root = write_split(str(tmp_path / "mm_niah_val"))
    sets = {"evaluation.max_new_tokens": 4, "evaluation.model_name": "tiny"}
    cfg = job(tmp_path, root, **sets)
    model = exported_model(tmp_path)
    prepared = MMNIAHEvaluation().prepare(cfg, str(tmp_path / "run"), model)
    assert (prepared["_split"], prepared["_model"]) == ("val", "tiny")  # the split from the folder's name
    (res,) = gloo_world(1).run(v2pe_cases.mmniah_run, root, sets, model, prepared, str(tmp_path / "run"))
    # Every task has its eleven buckets (empty ones 0, as the authors count them); the
    # sample under 1000 tokens is not scored.
    by_task = {}
    for r in res.records:
        by_task.setdefault(r["task"], []).append(r)
    assert list(by_task) == ["retrieval-text", "retrieval-image", "counting-text", "counting-image",
                             "reasoning-text", "reasoning-image"]
    assert all(len(rows) == 11 for rows in by_task.values())
    assert [r["tokens"] for r in by_task["retrieval-text"] if r["samples"]] == [1000, 4000]
    assert [r["tokens"] for r in by_task["counting-text"] if r["samples"]] == [1000, 2000]
    assert res.table.startswith("Protocol: mm-niah (as OpenGVLab/MM-NIAH@2fd03dd")
    assert "| overall |" in res.table and "mmniah_overall_mean" in res.metrics  # all six tasks ran
    # The responses in the authors' files (<model>_<task>-<split>.jsonl): the question as
    # asked, id and answer as released; re-scoring them gives the same figures.
    out = tmp_path / "run" / "eval" / "mm-niah"
    assert sorted(p.name for p in out.iterdir()) == sorted(f"tiny_{t}-val.jsonl" for t in by_task)
    rows = read_rows(out / "tiny_retrieval-text-val.jsonl")
    assert [r["question_id"] for r in rows] == [0, 1, 2] and set(rows[0]) == AUTHORS_FIELDS
    assert rows[0]["question"] == "What is the secret code?\nAnswer the question using a single word or phrase."
    assert read_rows(out / "tiny_counting-text-val.jsonl")[1]["answer"] == "[2]"  # as released: the list's JSON text
    for task, rows in by_task.items():
        got = read_rows(out / f"tiny_{task}-val.jsonl")
        answers = [json.loads(r["answer"]) if "counting" in task and isinstance(r["answer"], str) else r["answer"]
                   for r in got]
        rescored = task_buckets([{"context_length": r["context_length"], "depth": _depth(r["placed_depth"]),
                                  "score": MMNIAH.score(a, r["response"])} for r, a in zip(got, answers)])
        assert [r["score"] for r in rescored] == [r["score"] for r in rows]
        assert res.metrics[f"mmniah_{task.replace('-', '_')}_mean"] == pytest.approx(
            sum(r["score"] for r in rescored) / 11)
    assert eval_positions(cfg, tiny_model().cfg)[0].stride == 64  # v2pe_rnd trained: the authors' stride


def _depth(d):
    return sum(d) / len(d) if isinstance(d, list) else d


def test_the_split_name_comes_from_the_folder_or_the_config(tmp_path):
    ev, model = MMNIAHEvaluation(), exported_model(tmp_path)
    root = write_split(str(tmp_path / "my-copy"), tasks=["retrieval-text"])
    with pytest.raises(FieldError, match=r"evaluation.split: the folder 'my-copy' does not say whether it is "
                                         r"MM-NIAH's val or test split"):
        ev.prepare(job(tmp_path, root), str(tmp_path / "run"), model)
    got = ev.prepare(job(tmp_path, root, **{"evaluation.split": "test", "evaluation.model_name": None}),
                     str(tmp_path / "run"), model)
    # the model: the checkpoint folder's name, its parent's for a longview export
    assert (got["_split"], got["_model"]) == ("test", os.path.basename(tmp_path))


def test_a_repeated_id_stops_prepare_naming_both_lines(tmp_path):
    ev, model = MMNIAHEvaluation(), exported_model(tmp_path)
    root = write_split(str(tmp_path / "mm_niah_val"), tasks=["retrieval-text"])
    ann = tmp_path / "mm_niah_val" / "annotations" / "retrieval-text.jsonl"
    first = ann.read_text().splitlines()[0]
    with open(ann, "a") as f:
        f.write(first + "\n")  # line 4: id 0 again (the authors' scripts key answers by id)
    with pytest.raises(DataError, match=r"retrieval-text sample 0 \(.*retrieval-text.jsonl:4\): id 0 is also the "
                                        r"id of the sample at .*retrieval-text.jsonl:1"):
        ev.prepare(job(tmp_path, root), str(tmp_path / "run"), model)


def test_answers_over_a_context_parallel_group_equal_one_process(gloo_world, tmp_path):
    root = write_split(str(tmp_path / "mm_niah_val"), tasks=["retrieval-text", "retrieval-image"])
    model = exported_model(tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    sets = {"evaluation.max_new_tokens": 4, "evaluation.strides": [64], "evaluation.model_name": "tiny"}
    cfg = job(tmp_path, root, **sets)
    prepared = MMNIAHEvaluation().prepare(cfg, one, model)
    (want,) = gloo_world(1).run(v2pe_cases.mmniah_run, root, sets, model, prepared, one)
    got = gloo_world(2).run(v2pe_cases.mmniah_run, root, sets, model, prepared, two)
    assert got[0].records == got[1].records == want.records
    for task in ("retrieval-text", "retrieval-image"):
        assert (tmp_path / "two" / "eval" / "mm-niah" / f"tiny_{task}-val.jsonl").read_text() == \
            (tmp_path / "one" / "eval" / "mm-niah" / f"tiny_{task}-val.jsonl").read_text()


def test_the_v2pe_teacher_forced_check_beside_greedy_answers_over_the_group(gloo_world, tmp_path):
    """V2PE's protocol with its teacher-forced check: the same verdicts from a group of two
    as from one process, written as the authors' long evaluation writes them. (That the
    check passes the model's own greedy answer: test_v2pe_generate.)"""
    root = write_split(str(tmp_path / "mm_niah_val"), tasks=["retrieval-text", "retrieval-image"])
    model = exported_model(tmp_path)
    sets = {"evaluation.protocol": "v2pe", "evaluation.teacher_forced": True, "evaluation.model_name": "tiny",
            "evaluation.max_new_tokens": 6, "evaluation.strides": [64]}
    cfg = job(tmp_path, root, **sets)
    prepared = MMNIAHEvaluation().prepare(cfg, str(tmp_path / "one"), model)
    (want,) = gloo_world(1).run(v2pe_cases.mmniah_run, root, sets, model, prepared, str(tmp_path / "one"))
    got = gloo_world(2).run(v2pe_cases.mmniah_run, root, sets, model, prepared, str(tmp_path / "two"))
    assert got[0].records == got[1].records == want.records
    assert got[0].curves == want.curves and "mmniah_forced_retrieval_text" in want.curves
    assert "V2PE's teacher-forced check" in want.table and want.table.startswith("Protocol: v2pe")
    forced = tmp_path / "one" / "eval" / "mm-niah" / "teacher-forced" / "tiny_retrieval-text-val.jsonl"
    rows = read_rows(forced)
    assert set(rows[0]) == AUTHORS_FIELDS | {"correct"}
    assert (tmp_path / "two" / "eval" / "mm-niah" / "teacher-forced" / forced.name).read_text() == forced.read_text()
    greedy = read_rows(tmp_path / "one" / "eval" / "mm-niah" / "tiny_retrieval-text-val.jsonl")
    assert greedy[0]["question"] == "What is the secret code?\nAnswer the question using a single word or phrase."
    # eval_mm_niah_long.py:358-361: right only when the argmax text is the answer
    for r in read_rows(forced):
        assert r["correct"] == (r["response"] == (chr(65 + r["answer"]) if isinstance(r["answer"], int)
                                                  else str(r["answer"])))
