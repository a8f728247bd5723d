"""Fine-tuning a checkpoint in the published InternVL2 layout, as a user brings one.

A tiny InternVL2 folder (config.json, model.safetensors and the four tokenizer files)
and a chat JSONL with PNG images are put in the local S3; `longview train` points
`model.pretrained` and `data.train` at them and trains two steps with context
parallelism 2 over two Ray workers; the export is a complete folder that loads again.
"""

import json
import math
import uuid
from dataclasses import replace

import torch

from tests.e2e.conftest import BUCKET, cli, history, s3fs_direct
from tests.test_v2pe_checkpoint import hf_config, hf_tensors, write_checkpoint
from tests.v2pe_helpers import make_records
from tests.v2pe_tokenizer_folder import write_tokenizer_folder
from workloads.v2pe.hf_checkpoint import load_pretrained
from workloads.v2pe.tokenizer import load_tokenizer


def _upload(s3, local, prefix):
    for p in sorted(local.rglob("*")):
        if p.is_file():
            s3.pipe_file(f"{prefix}/{p.relative_to(local)}", p.read_bytes())


def test_a_published_layout_checkpoint_fine_tunes_with_its_own_tokenizer(services, tmp_path):
    fs = services
    s3 = s3fs_direct(fs)
    ckpt = tmp_path / "InternVL2-tiny"
    tok = load_tokenizer(str(write_tokenizer_folder(ckpt)))
    cfg = hf_config()
    cfg["llm_config"]["vocab_size"] = tok.vocab_size
    tensors = hf_tensors()
    for key in ("language_model.model.tok_embeddings.weight", "language_model.output.weight"):
        tensors[key] = torch.randn(tok.vocab_size, tensors[key].shape[1])
    write_checkpoint(ckpt, tensors, config=cfg)
    data = tmp_path / "data"
    make_records(str(data))
    # The V2PE authors' meta-file layout: annotations in one folder, images under a root.
    (data / "annotation").mkdir()
    (data / "data.jsonl").rename(data / "annotation" / "train.jsonl")
    (data / "meta.json").write_text(json.dumps({"tiny_long_vqa": {
        "root": ".", "annotation": "annotation/train.jsonl", "repeat_time": 2, "data_augment": False, "length": 3}}))
    tag = uuid.uuid4().hex[:8]
    ckpt_url, data_url = f"s3://{BUCKET}/models/{tag}", f"s3://{BUCKET}/datasets/{tag}"
    _upload(s3, ckpt, ckpt_url[5:])
    _upload(s3, data, data_url[5:])

    name = f"ft-{tag}"
    args = ["train", "configs/v2pe-demo.yaml", "--set", f"name={name}", "--set", f"storage.uri=s3://{BUCKET}/runs",
            "--set", f"model.pretrained={ckpt_url}", "--set", f"data.train={data_url}/meta.json",
            "--set", "data.max_tokens=1024", "--set", "data.max_tiles=2", "--set", "training.steps=2",
            "--set", "training.checkpoint_every=2"]
    # The byte tokenizer does not belong to this model: refused by name before anything runs.
    proc = cli(fs["env"], *args, "--set", "data.tokenizer=byte", check=False, timeout=180)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: training {name} failed: TokenizerError: tokenizer byte has 272 ids but model {ckpt_url} has "
        f"{tok.vocab_size} embeddings: they do not belong together (set data.tokenizer to the checkpoint's "
        "tokenizer folder, or 'byte' for the tiny model)")

    cli(fs["env"], *args)
    losses, _ = history(fs, name)
    assert [s for s, _ in losses] == [1, 2] and all(math.isfinite(v) and v > 0 for _, v in losses)
    export = f"{BUCKET}/runs/{name}/export"
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json"} <= {p.rsplit("/", 1)[1] for p in s3.ls(export)}
    saved = json.loads(s3.cat_file(f"{export}/config.json"))
    assert saved["llm_config"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    # The export loads again, with its tokenizer, and training moved the weights.
    back = tmp_path / "export"
    s3.get(export + "/", str(back), recursive=True)
    model = load_pretrained(str(back))
    assert load_tokenizer(str(back)).encode("<|im_start|>user\nhi") == tok.encode("<|im_start|>user\nhi")
    original = load_pretrained(str(ckpt))
    # the same model; its config.json now also records the positions the run trained with
    assert model.cfg.position_mode == "v2pe_rnd" and original.cfg.position_mode is None
    assert model.cfg == replace(original.cfg, position_mode="v2pe_rnd")
    assert not torch.equal(model.decoder.lm_head.weight, original.decoder.lm_head.weight)

    # Evaluation reads the export's own tokenizer; its needle samples are sized in that
    # tokenizer's tokens (at most the requested length).
    proc = cli(fs["env"], "eval", "configs/v2pe-demo.yaml", "--set", f"name={name}", "--set",
               f"storage.uri=s3://{BUCKET}/runs", "--set", "evaluation.lengths=[1024]", "--set",
               "evaluation.strides=[256]", "--set", "evaluation.samples_per_length=1", "--set", "evaluation.images=2")
    assert any(ln.startswith("| 1024 |") for ln in proc.stdout.splitlines()), proc.stdout[-3000:]
    # The evaluation set's folder names what it holds: length, task, images, samples, pool.
    folder = f"{BUCKET}/runs/{name}/data/eval-1024-needle-2img-1-pool64"
    sample = json.loads(s3.cat_file(f"{folder}/data.jsonl").splitlines()[0])
    assert all(p.startswith("images/pool-") for p in sample["image"])  # the demo's pictures come from a pool
    assert 1000 <= sample["tokens"] <= 1024
