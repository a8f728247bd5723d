"""Hostile data is contained: every bad line or image reference of a JSONL ends as one
DataError naming the file and line (fail), or as a counted skip (skip), through both
readers (the eager `load_samples` and the stream's `build_index`), without a hang, an
unbounded read, a fetch outside the dataset, or raw control characters in a message."""

import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.v2pe_helpers import data_config, make_records, write_image
from workloads.data_errors import DataError, LoadReport, printable
from workloads.v2pe.data import load_samples
from workloads.v2pe.stream import build_index
from workloads.v2pe.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _chat(images):
    return {"id": "x", "image": images,
            "conversations": [{"from": "human", "value": "<image>" * len(images) + " which?"},
                              {"from": "gpt", "value": "a"}]}


def _write(folder, lines: list[bytes]) -> str:
    path = os.path.join(folder, "data.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path


def _both(path, **cfg):
    """(eager error or report, stream error or report) with data.on_bad_sample = cfg's."""
    def eager(c):
        report = LoadReport(path)
        load_samples(path, tokenizer=TOK, cfg=c, report=report)
        return report

    out = []
    for read in (eager, lambda c: build_index(path, tokenizer=TOK, cfg=c).report):
        try:
            out.append(read(data_config(max_tokens=4096, **cfg)))
        except DataError as e:
            out.append(e)
    return out


def _bad_line_cases(tmp_path):
    folder = str(tmp_path)
    make_records(folder)
    good = json.dumps(_chat(["a.png"])).encode()
    os.mkdir(os.path.join(folder, "adir"))
    os.mkfifo(os.path.join(folder, "fifo.png"))
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir(exist_ok=True)
    write_image(str(outside / "secret.png"), 9)
    os.symlink(outside / "secret.png", os.path.join(folder, "link.png"))
    write_image(os.path.join(folder, "big.png"), 4, size=(200, 200))
    deep = b'{"id": "deep", "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    return folder, good, {
        "invalid UTF-8": (b'{"id": "caf\xe9"}', "not UTF-8 text (byte 11 of the line)"),
        "200,000-deep JSON": (deep, "JSON nested too deeply to read"),
        "a directory as image": (json.dumps(_chat(["adir"])).encode(), "adir is not a regular file"),
        "a FIFO as image": (json.dumps(_chat(["fifo.png"])).encode(), "fifo.png is not a regular file"),
        "/dev/zero": (json.dumps(_chat(["/dev/zero"])).encode(), "image /dev/zero is outside the dataset's root"),
        "absolute path": (json.dumps(_chat([str(outside / "secret.png")])).encode(), "is outside the dataset's root"),
        "../ out of the root": (json.dumps(_chat(["../x.png"])).encode(), "image ../x.png is outside"),
        "symlink out of the root": (json.dumps(_chat(["link.png"])).encode(), "image link.png is outside"),
        "file:// URL": (json.dumps(_chat([f"file://{outside}/secret.png"])).encode(), "is outside the dataset's root"),
        "http URL": (json.dumps(_chat(["http://127.0.0.1:9/x.png"])).encode(), "is outside the dataset's root"),
        "image over max_image_pixels": (json.dumps(_chat(["big.png"])).encode(), "is 200x200 pixels, more than "
                                        "data.max_image_pixels=10000"),
        "line over max_line_bytes": (b'{"id": "' + b"x" * (1 << 20) + b'"}', "longer than data.max_line_bytes=1048576"),
    }


def test_each_hostile_line_is_one_named_error_or_one_counted_skip(tmp_path):
    folder, good, cases = _bad_line_cases(tmp_path)
    limits = {"max_line_bytes": 1 << 20, "max_image_pixels": 10_000}
    for what, (line, message) in cases.items():
        path = _write(folder, [good, line, good])
        for result in _both(path, **limits):  # fail: the first bad sample stops the reader, naming it
            assert isinstance(result, DataError), what
            assert message in str(result) and (f"{path}:2" in str(result) or f"{path} line 2" in str(result)), \
                (what, str(result))
        for result in _both(path, on_bad_sample="skip", **limits):
            assert isinstance(result, LoadReport) and result.total_skipped == 1, (what, result)
    # With the root allowed, the file itself is judged: /dev/zero is no regular file.
    path = _write(folder, [good, cases["/dev/zero"][0]])
    for result in _both(path, allowed_roots=("/dev",)):
        assert isinstance(result, DataError) and "/dev/zero is not a regular file" in str(result), str(result)


def test_text_from_the_data_is_printed_escaped(tmp_path):
    folder = str(tmp_path)
    make_records(folder)
    rec = _chat(["missing.png"])
    rec["id"] = "evil\x1b[2J\x1b[31mid\nline"
    path = _write(folder, [json.dumps(rec).encode()])
    for result in _both(path):
        assert isinstance(result, DataError)
        msg = str(result)
        assert "\x1b" not in msg and "\n" not in msg and "evil\\x1b[2J\\x1b[31mid\\x0aline" in msg, msg
    assert printable("a" * 300).endswith("...") and len(printable("a" * 300)) == 203


# Hostile lines: arbitrary bytes, arbitrary JSON, and chat records whose fields and image
# references are drawn from a mix of plausible and hostile values.
REFS = st.sampled_from(["a.png", "b.png", "missing.png", "../a.png", "/etc/passwd", "/dev/zero", "adir", "fifo.png",
                        "file:///etc/passwd", "http://127.0.0.1:9/a.png", "s3://elsewhere/a.png", "", ".", "a.png/x"])
TEXT = st.text(max_size=40)
JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                       lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
                       max_leaves=20)
RECORD = st.fixed_dictionaries({
    "id": TEXT | st.integers() | st.none(),
    "image": st.lists(REFS, max_size=3) | REFS | JSONISH,
    "conversations": st.lists(st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "x"]),
                                                     "value": TEXT | st.just("<image>") | JSONISH}), max_size=3)
                     | JSONISH,
})
LINE = (st.binary(max_size=200) | JSONISH.map(lambda v: json.dumps(v).encode())
        | RECORD.map(lambda r: json.dumps(r).encode()))


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    make_records(str(folder))
    os.mkdir(folder / "adir")
    os.mkfifo(folder / "fifo.png")
    return str(folder)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=6))
def test_generated_hostile_lines_end_as_counted_skips_or_one_named_error(hostile_folder, lines):
    good = json.dumps(_chat(["a.png"])).encode()
    lines = [ln.replace(b"\n", b" ") for ln in lines]  # one record per line
    path = _write(hostile_folder, [good, *lines])
    nonempty = 1 + sum(1 for ln in lines if ln.strip())
    for result in _both(path, on_bad_sample="skip", max_line_bytes=4096):
        # Every line is a sample or a counted skip: nothing crashes, nothing is lost unseen.
        assert isinstance(result, LoadReport), result
        assert result.loaded + result.total_skipped == nonempty, (result.loaded, result.skipped)
    for result in _both(path, max_line_bytes=4096):
        if isinstance(result, DataError):  # fail mode: the first bad line, named
            assert f"{path}:" in str(result) or f"{path} line " in str(result), str(result)
            assert "\x1b" not in str(result)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300) | st.lists(st.sampled_from([b"a", b"bc", b"\n", b"\r", b"xyz" * 5]),
                                              max_size=40).map(b"".join),
       max_bytes=st.integers(1, 20), chunk=st.integers(1, 16))
def test_lines_are_read_in_bounded_chunks_as_a_plain_split_would(data, max_bytes, chunk):
    import io

    from workloads.files import iter_lines

    want, offset = [], 0
    for n, line in enumerate(data.split(b"\n")[:-1] + ([data.rsplit(b"\n", 1)[-1]] if not data.endswith(b"\n")
                                                        and data else []), start=1):
        raw = line + b"\n" if offset + len(line) < len(data) else line
        want.append((offset, n, raw if len(raw) <= max_bytes else None))
        offset += len(raw)
    assert list(iter_lines(io.BytesIO(data), max_bytes, chunk=chunk)) == want
