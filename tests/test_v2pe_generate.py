"""Greedy generation: the KV cache against recomputing the whole sequence, the
context-parallel prefill and sharded decode against one process, token for token."""

import pytest
import torch

from tests import v2pe_cases
from tests.test_v2pe_evaluate import synth_samples
from tests.v2pe_helpers import tiny_model
from workloads.v2pe.data import EncodedSample
from workloads.v2pe.evaluate import score_sample
from workloads.v2pe.generate import generate
from workloads.v2pe.model import AttentionSpec
from workloads.v2pe.packing import pack
from workloads.v2pe.tokenizer import IM_END, ByteTokenizer

TOK = ByteTokenizer()
NEW = 10


def decisive_model():
    """The tiny model with its output layer scaled up: the top two logits of every step
    below lie ≥ 0.1 apart (checked in the first test), far above the ~1e-5 by which ring
    and single-process attention differ in float32, so equal tokens are a fair demand."""
    model = tiny_model()
    with torch.no_grad():
        model.decoder.lm_head.weight.mul_(20)
    return model


def prompt_of(sample: EncodedSample) -> EncodedSample:
    """The chat up to `<|im_start|>assistant\\n`: what the model answers."""
    t = int((sample.targets != -100).nonzero()[0])  # the header's last token predicts the answer
    return EncodedSample(sample_id=sample.sample_id, input_ids=sample.input_ids[: t + 1],
                         targets=torch.full((t + 1,), -100), pixels=sample.pixels)


def prompts(tmp_path):
    # two lengths, three images each (4 tokens per tile, up to 2 tiles per image)
    return [prompt_of(s) for s in synth_samples(tmp_path, lengths=(384, 512), per_length=1)]


def recompute_greedy(model, prompt, mode, stride, n):
    """The reference: the whole sequence through the model again for every new token."""
    ids, out, gaps = prompt.input_ids.clone(), [], []
    for _ in range(n):
        p = EncodedSample(sample_id="ref", input_ids=ids, targets=torch.full_like(ids, -100), pixels=prompt.pixels)
        b = pack([p], tokenizer=TOK, tokens_per_tile=4, multiple=2, mode=mode, stride=stride)
        with torch.no_grad():
            h = model.forward_hidden(b.input_ids, b.positions, model.encode_images(b.pixels), b.visual_index,
                                     AttentionSpec(cu_seqlens=b.cu_seqlens), b.rope_len)[0]
            logits = model.decoder.lm_head(h[len(ids) - 1])
        top = logits.topk(2).values
        gaps.append(float(top[0] - top[1]))
        out.append(int(logits.argmax()))
        ids = torch.cat([ids, torch.tensor([out[-1]])])
    return out, min(gaps)


@pytest.mark.parametrize("mode,stride", [("v2pe_fix", 64), ("default", None)])
def test_the_kv_cache_answers_as_recomputing_everything_does(tmp_path, mode, stride):
    model = decisive_model()
    for prompt in prompts(tmp_path):
        want, gap = recompute_greedy(model, prompt, mode, stride, NEW)
        assert gap > 0.1  # see decisive_model
        got = generate(model, prompt, tokenizer=TOK, mode=mode, stride=stride, max_new_tokens=NEW)
        assert got.tokens == want and got.stopped == "max_new_tokens" and got.prompt_tokens == len(prompt)


@pytest.mark.parametrize("world_size,a2a", [(2, 1), (4, 1), (4, 2)])
@pytest.mark.parametrize("mode,stride", [("v2pe_fix", 64), ("default", None)])
def test_generation_over_the_group_equals_one_process(gloo_world, tmp_path, world_size, a2a, mode, stride):
    model = decisive_model()
    ps = prompts(tmp_path)
    want = [generate(model, p, tokenizer=TOK, mode=mode, stride=stride, max_new_tokens=NEW,
                     return_prompt_logits=True) for p in ps]
    got = gloo_world(world_size).run(v2pe_cases.cp_generate, model.state_dict(), ps, mode, stride, a2a, NEW,
                                     torch.float32, True)
    for rank_result in got:  # every rank returns the whole answer
        for g, w in zip(rank_result, want):
            assert g.tokens == w.tokens and g.stopped == w.stopped
            # float32: the ring merges blocks in another order than one kernel call (~1e-6
            # relative); logits are O(10) after the output layer's scaling.
            torch.testing.assert_close(g.prompt_logits, w.prompt_logits, rtol=1e-4, atol=1e-4)


class StopAt(ByteTokenizer):
    """The byte tokenizer with `<|im_end|>` moved onto another id."""

    def __init__(self, im_end: int):
        super().__init__()
        self.im_end = im_end

    def token_id(self, token):
        return self.im_end if token == IM_END else super().token_id(token)


def test_generation_stops_at_im_end_and_agrees_with_teacher_forced_exact_match(tmp_path):
    model = decisive_model()
    prompt = prompts(tmp_path)[0]
    free = generate(model, prompt, tokenizer=TOK, mode="v2pe_fix", stride=64, max_new_tokens=NEW).tokens
    # The first token the model chooses that it has not chosen before becomes <|im_end|>:
    # generation must stop right there and leave it out.
    k = next(i for i in range(2, NEW) if free[i] not in free[:i])
    tok = StopAt(free[k])
    got = generate(model, prompt, tokenizer=tok, mode="v2pe_fix", stride=64, max_new_tokens=NEW)
    assert got.tokens == free[:k] and got.stopped == "im_end"

    def scored(answer):
        """The needle task's teacher-forced score of `answer` + <|im_end|> after the prompt."""
        ids = torch.cat([prompt.input_ids, torch.tensor(answer + [free[k]])])
        targets = torch.full_like(ids, -100)
        targets[len(prompt) - 1: -1] = ids[len(prompt):]
        s = EncodedSample(sample_id="t", input_ids=ids, targets=targets, pixels=prompt.pixels)
        return score_sample(model, s, tokenizer=tok, mode="v2pe_fix", stride=64, argmax=True)

    assert scored(got.tokens).exact_match  # what greedy generation answered, teacher forcing agrees with
    # ... token for token at the answer's positions (the V2PE authors' MM-NIAH check)
    assert scored(got.tokens).chosen[:-1] == got.tokens
    wrong = [*got.tokens[:-1], (got.tokens[-1] + 1) % 256]
    assert not scored(wrong).exact_match


def test_bf16_prefill_error_does_not_grow_with_the_ring():
    """The prompt's logits in bfloat16 over W = 2, 4, 8 gloo ranks against float64 on one
    process: no larger than one bfloat16 process's own error (BENCHMARKS.md lists them).
    The bound: 1.25x the single process's mean and 1.5x its max — the ring merges
    blocks in float32, so only the order of bfloat16 roundings differs."""
    from benchmarks.generate_cpu import precision

    rows = {r["W"]: r for r in precision(2048, [1, 2, 4, 8])}
    for W in (2, 4, 8):
        assert rows[W]["mean_abs_err"] <= 1.25 * rows[1]["mean_abs_err"], rows
        assert rows[W]["max_abs_err"] <= 1.5 * rows[1]["max_abs_err"], rows
    assert rows[1]["mean_abs_err"] > 0  # bfloat16 does differ from float64: the comparison measures something
