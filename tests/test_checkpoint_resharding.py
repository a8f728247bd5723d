"""Checkpoints written by W workers resume on W' (resharded), saved in the background
and read in parts: real processes over gloo, checkpoints on a real S3-protocol endpoint
(rclone on 127.0.0.1)."""

import itertools
import json
import os

import pytest
import torch

from orchestrator.services import LOCAL_CREDENTIALS, start_s3, stop_pid
from tests import v2pe_cases
from tests.v2pe_helpers import encoded, tiny_model
from workloads.v2pe.packing import pack

B = 6  # global batch: 6 samples per optimizer step at dp 1, 2 and 3
STEPS = 3


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    svc = start_s3(tmp_path_factory.mktemp("s3"), ["ckpt"])
    saved = dict(os.environ)
    os.environ.update(LOCAL_CREDENTIALS)  # what the endpoint's clients are given (the ranks inherit it)
    yield svc.url
    os.environ.clear()
    os.environ.update(saved)
    stop_pid(svc.pid)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """Six distinct packed rows with different supervised token counts (documents padded
    to multiples of 8: zigzag sharding over up to 4 context-parallel ranks)."""
    samples, tok = encoded(str(tmp_path_factory.mktemp("rows")))
    orders = [p for k in (1, 2, 3) for p in itertools.permutations(range(3), k)][:6]
    return [pack([samples[j] for j in order], tokenizer=tok, tokens_per_tile=4, multiple=8, mode="v2pe_rnd",
                 generator=torch.Generator().manual_seed(k)) for k, order in enumerate(orders)]


@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_checkpoint_of_4_workers_resumes_on_2_and_6(gloo_world, s3, rows, sharding):
    """Written by dp 2 x cp 2; resumed by dp 1 x cp 2, dp 3 x cp 2 and dp 1 x cp 4."""
    state = tiny_model().state_dict()
    uri = f"s3://ckpt/{sharding}"
    straight, _, _ = gloo_world(4).run(v2pe_cases.resharded_run, state, rows, sharding, uri, s3, STEPS, B,
                                       False, {1})[0]
    got = {}
    for world, cp in ((2, 2), (6, 2), (4, 4)):
        results = gloo_world(world).run(v2pe_cases.resharded_run, state, rows, sharding, uri, s3, STEPS, B, True,
                                        set(), cp)
        losses, _, start = results[0]
        assert start == 1
        got[world, cp] = losses
    # Steps 2 and 3 after the restore: step 2 checks the weights, step 3 the Adam moments
    # and the schedule. Same samples per step at every worker count, weighted by tokens:
    # what differs is the order of float32 sums (all-reduce over 2, 4 or 6 ranks, micro-
    # steps accumulated 6, 3 or 2 at a time, attention merged over 2 or 4 ring blocks),
    # ~1e-7 relative per sum; eps=1e-3 keeps
    # Adam's updates linear in that noise, so 1e-5 relative holds with margin.
    for layout, losses in got.items():
        assert losses == pytest.approx(straight[1:], rel=1e-5), (layout, losses, straight)


def test_fsdp_restore_reads_about_its_share(gloo_world, s3, rows, tmp_path):
    """Each of 4 FSDP ranks reads about a quarter of the checkpoint's tensor bytes, counted
    by the storage layer; a replicated model (sharding none) needs all of them per rank."""
    import s3fs

    state = tiny_model().state_dict()
    fs = s3fs.S3FileSystem(endpoint_url=s3, key=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                           secret=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    for sharding in ("fsdp", "none"):
        uri = f"s3://ckpt/share-{sharding}"
        gloo_world(4).run(v2pe_cases.resharded_run, state, rows, sharding, uri, s3, 1, B, False, {1})
        manifest = json.loads(fs.cat_file(f"ckpt/share-{sharding}/step-0000001/manifest.json"))
        tensors = sum(size for name, (size, _) in manifest["files"].items() if name.endswith(".distcp"))
        small = sum(size for name, (size, _) in manifest["files"].items() if not name.endswith(".distcp"))
        reads = [read for _, read, _ in gloo_world(4).run(v2pe_cases.resharded_run, state, rows, sharding, uri, s3,
                                                          1, B, True, set())]
        # Every rank also reads the manifest, DCP's index and its RNG file (`small`, plus the
        # manifest itself); the tensors are cut into 4 dim-0 shards, a few small ones (norm
        # weights, Adam's step counts) replicated: 1.3x a quarter allows for those.
        for read in reads:
            if sharding == "fsdp":
                assert read <= 1.3 * tensors / 4 + small + len(json.dumps(manifest)), (read, tensors)
            else:
                assert read >= tensors, (read, tensors)
