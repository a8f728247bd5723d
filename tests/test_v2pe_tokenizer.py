"""The checkpoint's own tokenizer and the authors' chat template.

How these were checked against the authors' code (outside this repository, once): the
folder `write_tokenizer_folder` builds was loaded with the authors' InternLM2Tokenizer
(OpenGVLab/InternVL, transformers 4.46.3) and gave the same ids as `load_tokenizer` on
3,019 texts (those below plus random mixes of words, whitespace, Chinese, emoji and
special tokens), with and without BOS; and their `preprocess_internlm('internlm2-chat',
...)` gave the same input ids and labels as `render_tokens` on 400 random chats with
images. The tests here pin the rules those comparisons rest on.
"""

import pytest
import sentencepiece as spm

from tests.v2pe_tokenizer_folder import ADDED_AFTER_MODEL, write_tokenizer_folder
from workloads.data_errors import DataError
from workloads.v2pe.chat import SYSTEM_MESSAGE, render_prompt, render_tokens
from workloads.v2pe.tokenizer import ByteTokenizer, TokenizerError, check_fits, load_tokenizer, resolve_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tokenizer_folder(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(folder):
    return load_tokenizer(str(folder))


@pytest.fixture(scope="module")
def sp(folder):
    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def test_published_layout_ids(tok, sp):
    n = sp.get_piece_size()
    assert (tok.bos_id, tok.pad_id) == (1, 2)  # <s>, and pad is </s>
    assert tok.token_id("<|im_end|>") == n - 2 and tok.token_id("<|im_start|>") == n - 1  # override pieces
    assert [tok.token_id(t) for t in ADDED_AFTER_MODEL] == list(range(n, n + 9))  # past the model
    assert (tok.img_start_id, tok.img_end_id, tok.img_context_id) == (n, n + 1, n + 2)
    assert tok.vocab_size == n + 9  # every id, not only the pieces


@pytest.mark.parametrize("text", [
    "hello world", "  leading and trailing  ", "\n\nnewlines\n\t tabs", "中文测试，你好世界", "emoji 😀 ǅ",
    "1234567890", "", "   ",
])
def test_plain_text_is_sentencepiece_as_is(tok, sp, text):
    # no dummy prefix, no whitespace folding, no BOS: exactly the model's own encoding
    assert tok.encode(text) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_added_tokens_are_cut_out_first_keeping_spaces(tok, sp):
    ids = tok.encode(" <img> a</img>\n<IMG_CONTEXT><IMG_CONTEXT>")
    assert ids == [*sp.encode(" "), tok.img_start_id, *sp.encode(" a"), tok.img_end_id, *sp.encode("\n"),
                   tok.img_context_id, tok.img_context_id]
    # special tokens inside text are tokens too (the slow tokenizer's no-split set), BOS included
    assert tok.encode("x<s>y</s>") == [*sp.encode("x"), 1, *sp.encode("y"), 2]
    # a partial token is text
    assert tok.img_context_id not in tok.encode("<IMG_CONTEXT")
    # byte fallback: characters the model never saw are bytes, and decode back
    rare = "ꙮ𝔘"
    assert all(sp.id_to_piece(i).startswith("<0x") for i in tok.encode(rare))
    assert tok.decode(tok.encode(rare)) == rare


def test_decoding_without_special_tokens_leaves_out_the_special_tokens_map(tok):
    """As Hugging Face's skip_special_tokens (how the MM-NIAH authors decode answers): bos,
    eos, unk, pad and additional_special_tokens go; the text around them stays."""
    ids = [tok.bos_id, *tok.encode("an <img>answer</img>"), tok.token_id("<|im_end|>"), tok.token_id("</s>"),
           *tok.encode(" more")]
    assert tok.decode(ids, skip_special=True) == "an answer more"
    assert tok.decode(ids) == "<s>an <img>answer</img><|im_end|></s> more"
    byte = ByteTokenizer()
    assert byte.decode([*byte.encode("a<img>b"), byte.token_id("<|im_end|>")], skip_special=True) == "ab"


def test_template_is_the_authors_internlm2_chat(tok):
    convs = [("user", "  <image>\nWhat is it? "), ("assistant", " a cat\n"), ("user", "And <image>?"),
             ("assistant", "a dog")]
    ids, sup = render_tokens(convs, [2, 1], tokenizer=tok, tokens_per_tile=3)
    whole = ("<|im_start|>system\n" + SYSTEM_MESSAGE + "<|im_end|><|im_start|>user\n"
             "<img>" + "<IMG_CONTEXT>" * 6 + "</img>\nWhat is it?<|im_end|><|im_start|>assistant\na cat<|im_end|>"
             "<|im_start|>user\nAnd <img>" + "<IMG_CONTEXT>" * 3 + "</img>?<|im_end|><|im_start|>assistant\n"
             "a dog<|im_end|>")
    # BOS, then one encode of the whole string: rendering piece by piece changes no id
    assert ids == [tok.bos_id, *tok.encode(whole)]
    learned = [i for i, s in zip(ids, sup) if s]
    assert learned == tok.encode("a cat<|im_end|>a dog<|im_end|>")
    # A query to answer is rendered as the authors' model.chat renders it: the question
    # as given (training's preprocessing strips it, chat does not), the assistant turn open.
    prompt = render_prompt([("user", "  <image>\nWhat is it? ")], [1], tokenizer=tok, tokens_per_tile=3)
    assert prompt == [tok.bos_id, *tok.encode("<|im_start|>system\n" + SYSTEM_MESSAGE + "<|im_end|><|im_start|>user\n"
                                              "  <img>" + "<IMG_CONTEXT>" * 3 + "</img>\nWhat is it? <|im_end|>"
                                              "<|im_start|>assistant\n")]


def test_a_system_turn_replaces_the_default_and_turns_must_alternate(tok):
    ids, _ = render_tokens([("system", "Be brief."), ("user", "q"), ("assistant", "a")], [], tokenizer=tok,
                           tokens_per_tile=1)
    assert tok.decode(ids[1:]).startswith("<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\nq")
    with pytest.raises(DataError, match=r"turn 1 is from 'user' where the chat needs 'assistant'"):
        render_tokens([("user", "q"), ("user", "q2"), ("assistant", "a")], [], tokenizer=tok, tokens_per_tile=1)
    with pytest.raises(DataError, match=r"turn 1 \(assistant\) is empty"):
        render_tokens([("user", "q"), ("assistant", "  ")], [], tokenizer=tok, tokens_per_tile=1)


def test_byte_tokenizer_renders_the_same_template():
    byte = ByteTokenizer()
    ids, sup = render_tokens([("user", "hi"), ("assistant", "yo")], [], tokenizer=byte, tokens_per_tile=1)
    assert ids[0] == byte.bos_id
    assert byte.decode(ids[1:]) == (f"<|im_start|>system\n{SYSTEM_MESSAGE}<|im_end|><|im_start|>user\nhi<|im_end|>"
                                    "<|im_start|>assistant\nyo<|im_end|>")
    assert byte.decode([i for i, s in zip(ids, sup) if s]) == "yo<|im_end|>"


def test_tokenizer_and_model_must_belong_together(tok, folder):
    check_fits(tok, tok.vocab_size, "ckpt")
    with pytest.raises(TokenizerError, match=rf"tokenizer byte has 272 ids but model ckpt has {tok.vocab_size}"):
        check_fits(ByteTokenizer(), tok.vocab_size, "ckpt")
    with pytest.raises(TokenizerError, match=rf"tokenizer {folder} does not fit model tiny: its ids .* reach past"):
        check_fits(tok, 272, "tiny")
    assert isinstance(resolve_tokenizer("auto", None), ByteTokenizer)
    assert resolve_tokenizer("auto", str(folder)).vocab_size == tok.vocab_size  # the checkpoint's own
    assert isinstance(resolve_tokenizer("auto", str(folder / "no-tokenizer-here")), ByteTokenizer)
    assert isinstance(resolve_tokenizer("byte", str(folder)), ByteTokenizer)
    assert resolve_tokenizer(str(folder), None).vocab_size == tok.vocab_size


def test_unreadable_tokenizer_folders_are_named(tmp_path, folder):
    with pytest.raises(TokenizerError, match=r"no tokenizer.model in that folder"):
        load_tokenizer(str(tmp_path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match=r"tokenizer.model is not a sentencepiece model"):
        load_tokenizer(str(bad))
    (bad / "tokenizer.model").write_bytes((folder / "tokenizer.model").read_bytes())
    (bad / "tokenizer_config.json").write_text("{")
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json is not valid JSON"):
        load_tokenizer(str(bad))
    (bad / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"has no token '<img>'"):
        load_tokenizer(str(bad))


def test_synthetic_samples_under_a_subword_tokenizer_fit_the_length(tok):
    import re

    from workloads.v2pe.synth import SynthConfig, make_sample

    def sample(tokens):
        return make_sample(SynthConfig(tokens=tokens, images=3, tile=56, tokens_per_tile=4), 0, tok)[0]

    assert 1000 <= sample(1024)["tokens"] <= 1024  # within a few tokens, never over
    with pytest.raises(DataError, match=r"need \d+ tokens") as e:
        sample(1)
    base = int(re.search(r"need (\d+) tokens", str(e.value)).group(1))
    # exactly the room of the question and images, none for filler: the search still ends
    assert sample(base)["tokens"] == base
