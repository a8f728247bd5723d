"""A tokenizer folder in the published InternVL2 layout, built in the test.

A small sentencepiece model trained with the options of InternLM2's (BPE, byte fallback,
identity normalisation, no dummy prefix, whitespace kept), then the three JSON files of
an InternVL2 checkpoint: `<|im_end|>`/`<|im_start|>` override the model's last two
pieces (as 92542/92543 override unused pieces in InternLM2's), and `<img>` ... `</box>`
take the ids after the model's last piece (as 92544...92552 do).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Which image carries a black square?",
    "Image 1: the background colour is red; image 2: blue. Answer with one word.",
    "   leading spaces, trailing spaces   \n\n\tand tabs\t, newlines\r\n and 1234567890 digits",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。",
    "长上下文的图文交错数据：每张图片的位置编码步长可以很小。",
    "def train(step: int) -> float:\n    return loss * 0.5  # comments too",
] * 40

ADDED_AFTER_MODEL = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]


def write_tokenizer_folder(folder: Path, vocab_size: int = 700) -> Path:
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        character_coverage=0.9999, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    # Two unused control pieces at the end, which <|im_end|>/<|im_start|> take over (as
    # InternLM2's [UNUSED_TOKEN_145]/[UNUSED_TOKEN_146] at 92542/92543): text never yields them.
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto.FromString(buf.getvalue())
    for name in ("[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"):
        proto.pieces.add(piece=name, score=0.0, type=pb.ModelProto.SentencePiece.CONTROL)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    n = len(proto.pieces)

    def entry(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    decoder = {"0": entry("<unk>"), "1": entry("<s>"), "2": entry("</s>"), str(n - 2): entry("<|im_end|>"),
               str(n - 1): entry("<|im_start|>")}
    added = {tok: n + i for i, tok in enumerate(ADDED_AFTER_MODEL)}
    decoder |= {str(i): entry(tok) for tok, i in added.items()}
    specials = ["<|im_start|>", "<|im_end|>", *ADDED_AFTER_MODEL]
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": decoder, "additional_special_tokens": specials, "bos_token": "<s>",
        "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>", "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000, "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "additional_special_tokens": specials, "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
        "unk_token": "<unk>"}))
    (folder / "added_tokens.json").write_text(json.dumps(added))
    return folder
