"""The authors' `internlm2-chat` template: a conversation rendered to token ids, and
which of them are learned (the answers)."""

from __future__ import annotations

from collections.abc import Sequence

from ..data_errors import DataError
from .tokenizer import IM_END, IM_START, Tokenizer

IMAGE_PLACEHOLDER = "<image>"


# The default system message of the authors' `internlm2-chat` template (InternVL2's chat
# models were fine-tuned with it); a leading "system" turn in the data replaces it.
SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                  "是一个有用无害的人工智能助手。")


def parse_turns(conversations, sample: str) -> list[tuple[str, str]]:
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"sample {sample}: 'conversations' must be a non-empty list of turns", "conversation")
    out = []
    for i, turn in enumerate(conversations):
        who, value = (turn.get("from"), turn.get("value")) if isinstance(turn, dict) else (None, None)
        if who not in ("human", "gpt", "system") or not isinstance(value, str):
            raise DataError(f"sample {sample}: conversations[{i}] needs 'from' in human/gpt/system and a string "
                            "'value'", "conversation")
        out.append(({"human": "user", "gpt": "assistant", "system": "system"}[who], value))
    return out


def _chat_turns(convs: Sequence[tuple[str, str]], sample: str,
                strip: bool = True) -> tuple[str, list[tuple[str, str]]]:
    """(system message, alternating user/assistant turns) as the authors' preprocessing takes them."""
    turns = list(convs)
    system = SYSTEM_MESSAGE
    if turns and turns[0][0] == "system":
        system, turns = turns[0][1].strip(), turns[1:]
    if turns and turns[0][0] != "user":
        turns = turns[1:]  # the authors drop a first turn that is not the user's
    for i, (role, text) in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            raise DataError(f"sample {sample}: turn {i} is from {role!r} where the chat needs {want!r} (turns "
                            "alternate user/assistant after an optional system turn)", "conversation")
        if not text.strip():
            raise DataError(f"sample {sample}: turn {i} ({role}) is empty", "conversation")
    if not turns or turns[-1][0] != "assistant":
        raise DataError(f"sample {sample}: the chat must end with an answer ('gpt' turn) to learn from",
                        "conversation")
    return system, [(role, text.strip() if strip else text) for role, text in turns]


def render_tokens(
    convs: Sequence[tuple[str, str]], tiles_per_image: Sequence[int], *, tokenizer: Tokenizer, tokens_per_tile: int,
    sample: str = "?", strip: bool = True,
) -> tuple[list[int], list[bool]]:
    """Token ids of a chat in the authors' `internlm2-chat` template, and which are learned.

    convs: (role, text) turns with `<image>` placeholders; tiles_per_image: the tile count
    of each image in order of appearance. The rendering is the authors' training
    preprocessing (InternVL `preprocess_internlm`):

        <s><|im_start|>system\n{system}<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n{a}<|im_end|>...

    every text stripped (unless `strip` is false), nothing after `<|im_end|>`, each `<image>` in order becoming
    `<img>` + `<IMG_CONTEXT>` x (tokens_per_tile x that image's tiles) + `</img>`. The
    answers and their `<|im_end|>` are learned; BOS, the system turn, the user turns and
    each `<|im_start|>assistant\n` are not.

    The ids are those of one encode of the whole string: added tokens split the text
    first, so each piece between them is encoded alone here too. Only an answer and its
    `assistant\n` header share a piece; the header's length is counted the authors' way
    (encoded alone) and a sample where that would cut a token in two is refused.
    """
    system, turns = _chat_turns(convs, sample, strip)
    im_start, im_end = tokenizer.token_id(IM_START), tokenizer.token_id(IM_END)
    ids: list[int] = [tokenizer.bos_id, im_start, *tokenizer.encode(f"system\n{system}"), im_end]
    supervised: list[bool] = [False] * len(ids)
    img_i = 0
    for role, text in turns:
        pieces = text.split(IMAGE_PLACEHOLDER)
        body: list[int] = []
        for j, piece in enumerate(pieces):
            if j:
                n = tokens_per_tile * tiles_per_image[img_i]
                body += [tokenizer.img_start_id, *[tokenizer.img_context_id] * n, tokenizer.img_end_id]
                img_i += 1
            body += tokenizer.encode(f"{role}\n{piece}" if j == 0 else piece)
        header = len(tokenizer.encode(f"{role}\n"))
        if role == "assistant" and header + len(tokenizer.encode(pieces[0])) != len(tokenizer.encode(f"{role}\n{pieces[0]}")):
            raise DataError(f"sample {sample}: the answer's first token merges with the 'assistant\\n' header under "
                            f"tokenizer {tokenizer.name}, so the learned part has no token boundary", "tokenization")
        ids += [im_start, *body, im_end]
        learn = role == "assistant"
        supervised += [False] * (1 + header) + [learn] * (len(body) - header) + [learn]
    return ids, supervised


def render_prompt(
    convs: Sequence[tuple[str, str]], tiles_per_image: Sequence[int], *, tokenizer: Tokenizer, tokens_per_tile: int,
    sample: str = "?",
) -> list[int]:
    """Token ids of a chat that asks for the next answer: `convs` ends with a user turn,
    and the ids end with `<|im_start|>assistant\n`, as the authors' `model.chat` renders
    its query (the template's open assistant turn, one encode of the whole string; the
    texts as given: `model.chat` strips nothing, training's preprocessing strips them)."""
    ids, _ = render_tokens([*convs, ("assistant", "?")], tiles_per_image, tokenizer=tokenizer,
                           tokens_per_tile=tokens_per_tile, sample=sample, strip=False)
    # Cut the placeholder answer: keep up to its <|im_start|>, then the header encoded
    # alone (at the end of the string it is its own piece).
    last = len(ids) - 1 - ids[::-1].index(tokenizer.token_id(IM_START))
    return ids[: last + 1] + tokenizer.encode("assistant\n")
