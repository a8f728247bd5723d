"""Tokenizers of the V2PE workload: an InternVL2 checkpoint's own, and a byte tokenizer.

`load_tokenizer(folder)` reads the tokenizer files published with an InternVL2 checkpoint
(`tokenizer.model`, `tokenizer_config.json`, `special_tokens_map.json`,
`added_tokens.json`; a local folder or any fsspec URL such as s3://) and gives the same
ids as the authors' `InternLM2Tokenizer` (a slow Hugging Face tokenizer over
sentencepiece) without running any code from the checkpoint:

- every added token (the `added_tokens_decoder` of tokenizer_config.json, then
  added_tokens.json, then the special tokens) is cut out of the text first, leftmost
  and longest match, with no stripping of the spaces around it unless the token says
  lstrip/rstrip;
- the text between added tokens goes to sentencepiece as it is (InternLM2's model is
  BPE with byte fallback, identity normalisation, no dummy prefix);
- `encode` adds no BOS and no EOS; the chat template (data.render_tokens) puts BOS first.

An added token's id overrides the piece sentencepiece has at that id (InternLM2's
`<|im_start|>` 92543 and `<|im_end|>` 92542 sit on unused pieces), and ids past the
sentencepiece model (`<img>` 92544 ... `</box>` 92552) count in the vocabulary the
model sees: `vocab_size` is every id, 92,553 for InternVL2-2B/8B.

`ByteTokenizer` (bytes as tokens plus the special tokens) serves the tiny model and the
synthetic data: no download, and one byte is one token, so token counts are exact.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

# The special tokens the V2PE data path needs, by role.
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
REQUIRED_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, IM_START, IM_END)


class TokenizerError(ValueError):
    """A tokenizer that cannot be read, or that does not fit the model; the message names both."""


class Tokenizer(Protocol):
    """What the data path needs of a tokenizer."""

    vocab_size: int  # every id the model must have an embedding for
    bos_id: int
    pad_id: int
    img_start_id: int
    img_end_id: int
    img_context_id: int
    name: str  # where it came from, for messages

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of `ids`; skip_special: without the special tokens (Hugging Face's
        skip_special_tokens, as the authors decode answers)."""
        ...

    def token_id(self, token: str) -> int: ...


class ByteTokenizer:
    """Bytes as tokens (0..255) plus InternVL2's special tokens (256..).

    Used by the tiny model and the synthetic data: it needs no download and makes token
    counts exact (one byte, one token).
    """

    SPECIALS = ("<pad>", "<s>", "</s>", IMG_START, IMG_END, IMG_CONTEXT, IM_START, IM_END)
    vocab_size = 272  # 256 bytes, the 8 special tokens, 8 ids kept free (the tiny model's vocabulary)
    name = "byte"

    def __init__(self):
        self.special_ids = {tok: 256 + i for i, tok in enumerate(self.SPECIALS)}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.SPECIALS, key=len, reverse=True)) + ")")
        self.pad_id = self.special_ids["<pad>"]
        self.bos_id = self.special_ids["<s>"]
        self.img_start_id = self.special_ids[IMG_START]
        self.img_end_id = self.special_ids[IMG_END]
        self.img_context_id = self.special_ids[IMG_CONTEXT]

    def token_id(self, token: str) -> int:
        return self.special_ids[token]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            out.extend([self.special_ids[part]] if i % 2 else part.encode("utf-8"))
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        inv = {v: k for k, v in self.special_ids.items()}
        buf, parts = bytearray(), []
        for t in ids:
            if t < 256:
                buf.append(t)
            elif not skip_special:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                parts.append(inv.get(t, f"<{t}>"))
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    lstrip: bool = False
    rstrip: bool = False


class SentencePieceTokenizer:
    """A published InternLM2 tokenizer: sentencepiece plus added tokens cut out first."""

    def __init__(self, model_proto: bytes, added: list[AddedToken], *, bos: str, pad: str, name: str,
                 specials: Iterable[str] = ()):
        import sentencepiece as spm

        self.name = name
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.added = {t.content: t for t in added}
        self._by_id = {t.id: t.content for t in added}
        # the special-tokens map (bos, eos, unk, pad, additional_special_tokens): what
        # Hugging Face's skip_special_tokens leaves out of a decoded text
        self._special = {self.added[t].id for t in specials if t in self.added}
        # Python's regex takes the first alternative that matches at the leftmost
        # position; longest first makes that the longest match (as the authors' trie).
        alternatives = sorted(self.added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")") if alternatives else None
        self.vocab_size = max([self.sp.get_piece_size(), *(t.id + 1 for t in added)])
        self.bos_id, self.pad_id = self.token_id(bos), self.token_id(pad)
        self.img_start_id = self.token_id(IMG_START)
        self.img_end_id = self.token_id(IMG_END)
        self.img_context_id = self.token_id(IMG_CONTEXT)
        for tok in REQUIRED_TOKENS:
            self.token_id(tok)

    def token_id(self, token: str) -> int:
        if token in self.added:
            return self.added[token].id
        pid = self.sp.piece_to_id(token)
        if pid == self.sp.unk_id() and token != self.sp.id_to_piece(pid):
            raise TokenizerError(f"tokenizer {self.name}: has no token {token!r} (needed by the InternVL2 chat data)")
        return pid

    def encode(self, text: str) -> list[int]:
        if self._split is None:
            return self.sp.encode(text)
        parts = self._split.split(text)  # text, token, text, token, ..., text
        # lstrip/rstrip tokens eat the whitespace beside them (none of InternVL2's do).
        for i in range(1, len(parts), 2):
            tok = self.added[parts[i]]
            if tok.lstrip:
                parts[i - 1] = parts[i - 1].rstrip()
            if tok.rstrip:
                parts[i + 1] = parts[i + 1].lstrip()
        out: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                out.append(self.added[part].id)
            elif part:
                out.extend(self.sp.encode(part))
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        out, run = [], []
        for t in ids:
            if skip_special and t in self._special:
                out.append(self.sp.decode(run))
                run = []
            elif t in self._by_id:
                out.append(self.sp.decode(run))
                run = []
                out.append(self._by_id[t])
            else:
                run.append(int(t))
        out.append(self.sp.decode(run))
        return "".join(out)


def _read_json(fs, path: str, name: str) -> dict:
    if not fs.exists(path):
        return {}
    try:
        value = json.loads(fs.cat_file(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"tokenizer {name}: {posixpath.basename(path)} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"tokenizer {name}: {posixpath.basename(path)} must hold a JSON object")
    return value


def _token_text(value, what: str, name: str) -> str:
    """special_tokens_map / tokenizer_config give a token as a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerError(f"tokenizer {name}: {what} must be a token string, got {value!r}")
    return value


def load_tokenizer(path: str) -> SentencePieceTokenizer:
    """The tokenizer of an InternVL2 checkpoint folder (local or any fsspec URL)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    model = posixpath.join(root, "tokenizer.model")
    if not fs.exists(model):
        raise TokenizerError(f"tokenizer {path}: no tokenizer.model in that folder (an InternVL2 checkpoint folder "
                             "has tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json)")
    config = _read_json(fs, posixpath.join(root, "tokenizer_config.json"), path)
    special = _read_json(fs, posixpath.join(root, "special_tokens_map.json"), path)
    extra = _read_json(fs, posixpath.join(root, "added_tokens.json"), path)

    added: dict[str, AddedToken] = {}
    decoder = config.get("added_tokens_decoder", {})
    if not isinstance(decoder, dict):
        raise TokenizerError(f"tokenizer {path}: tokenizer_config.json added_tokens_decoder must be an object")
    for key, entry in decoder.items():
        if not (isinstance(entry, dict) and str(key).isdigit()):
            raise TokenizerError(f"tokenizer {path}: added_tokens_decoder[{key!r}] must map an id to a token object")
        if entry.get("single_word"):
            raise TokenizerError(f"tokenizer {path}: added token {entry.get('content')!r} has single_word=true, "
                                 "which longview does not support")
        content = _token_text(entry, f"added_tokens_decoder[{key}]", path)
        added[content] = AddedToken(content, int(key), bool(entry.get("lstrip")), bool(entry.get("rstrip")))
    for content, tid in extra.items():
        if not isinstance(tid, int) or isinstance(tid, bool):
            raise TokenizerError(f"tokenizer {path}: added_tokens.json {content!r} must map to an integer id")
        added.setdefault(content, AddedToken(content, tid))

    def special_token(key: str, default: str) -> str:
        value = special.get(key, config.get(key, default))
        return _token_text(value, key, path)

    bos, pad = special_token("bos_token", "<s>"), special_token("pad_token", "</s>")
    proto = fs.cat_file(model)
    try:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
        raise TokenizerError(f"tokenizer {path}: tokenizer.model is not a sentencepiece model ({e})") from None
    # Special tokens that are not added tokens yet are cut out of text too (the slow
    # Hugging Face tokenizer puts every special token in its no-split set).
    specials = [special_token(k, d) for k, d in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"),
                                                 ("pad_token", "</s>"))]
    for extra_special in special.get("additional_special_tokens", config.get("additional_special_tokens", [])) or []:
        specials.append(_token_text(extra_special, "additional_special_tokens", path))
    for content in specials:
        if content not in added:
            pid = sp.piece_to_id(content)
            if pid != sp.unk_id() or content == sp.id_to_piece(pid):
                added[content] = AddedToken(content, pid)
    return SentencePieceTokenizer(proto, list(added.values()), bos=bos, pad=pad, name=path, specials=specials)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def resolve_tokenizer(choice: str, checkpoint: str | None) -> Tokenizer:
    """`data.tokenizer`: "auto" (the checkpoint folder's own tokenizer when it has one, else
    bytes), "byte", or a tokenizer folder / URL."""
    if choice == "byte":
        return ByteTokenizer()
    if choice != "auto":
        return load_tokenizer(choice)
    if checkpoint:
        import fsspec

        fs, root = fsspec.core.url_to_fs(checkpoint)
        if fs.exists(posixpath.join(root, "tokenizer.model")):
            return load_tokenizer(checkpoint)
    return ByteTokenizer()


def copy_tokenizer(tokenizer: Tokenizer, url: str) -> None:
    """Puts a loaded tokenizer's files beside an exported checkpoint, so the export is a
    complete InternVL2 folder (nothing to copy for the byte tokenizer)."""
    if not isinstance(tokenizer, SentencePieceTokenizer):
        return
    import fsspec

    src_fs, src = fsspec.core.url_to_fs(tokenizer.name)
    dst_fs, dst = fsspec.core.url_to_fs(url)
    for name in TOKENIZER_FILES:
        path = posixpath.join(src, name)
        if src_fs.exists(path):
            dst_fs.pipe_file(posixpath.join(dst, name), src_fs.cat_file(path))


def check_fits(tokenizer: Tokenizer, vocab_size: int, model: str) -> None:
    """A tokenizer whose ids reach past the model's embeddings, or that does not cover the
    model's vocabulary, would train garbage without an error: stop here, naming both."""
    ids = {"bos": tokenizer.bos_id, "pad": tokenizer.pad_id, IMG_START: tokenizer.img_start_id,
           IMG_END: tokenizer.img_end_id, IMG_CONTEXT: tokenizer.img_context_id}
    for tok in (IM_START, IM_END):
        ids[tok] = tokenizer.token_id(tok)
    past = {k: v for k, v in ids.items() if not 0 <= v < vocab_size}
    if past:
        raise TokenizerError(f"tokenizer {tokenizer.name} does not fit model {model}: its ids {past} reach past the "
                             f"model's vocabulary of {vocab_size}")
    if tokenizer.vocab_size != vocab_size:
        raise TokenizerError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but model {model} has "
                             f"{vocab_size} embeddings: they do not belong together (set data.tokenizer to the "
                             "checkpoint's tokenizer folder, or 'byte' for the tiny model)")
