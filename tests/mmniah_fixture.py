"""A small MM-NIAH split in the released layout (annotations/<task>.jsonl, images/),
written by the tests: the six tasks, text and image needles, multiple choice with text
and image options, counting answers as a list and as the list's JSON text, needles
at several depths (one or several per sample), context lengths across buckets and one
under 1000 tokens (which the authors' scoring leaves out)."""

import json
import os

from tests.v2pe_helpers import write_image

# (task, samples): each sample as the released JSON would have it, images named below.
FILLER = "The harbour was quiet that morning, and the gulls circled above the boats. "


def _context(images: int, needle: str = "", depth: float = 0.5) -> str:
    parts = [FILLER * 2 + "<image>" for _ in range(images)]
    text = "".join(parts) + FILLER
    at = int(len(text) * depth)
    return text[:at] + needle + text[at:]


def samples() -> dict[str, list[dict]]:
    def meta(length, depth, choices=None, choice_images=None, needles=()):
        return {"placed_depth": depth, "context_length": length, "context_length_text": length - 256,
                "context_length_image": 256, "num_images": 1, "needles": list(needles), "choices": choices,
                "choices_image_path": choice_images}

    out = {
        "retrieval-text": [
            {"id": 0, "images_list": ["ret/0_a.png"], "context": _context(1, "The secret code is 7421. ", 0.2),
             "question": "What is the secret code?", "answer": "7421", "meta": meta(1500, 0.2, needles=["7421"])},
            {"id": 1, "images_list": ["ret/1_a.png", "ret/1_b.png"],
             "context": _context(2, "The lighthouse keeper is named Ada. ", 0.9),
             "question": "What is the lighthouse keeper's name?", "answer": "Ada", "meta": meta(5000, 1.0)},
            {"id": 2, "images_list": [], "context": _context(0, "Bob's boat is green. ", 0.5),
             "question": "What colour is Bob's boat?", "answer": "green", "meta": meta(600, 0.5)},  # < 1k: unscored
        ],
        "retrieval-image": [
            {"id": 0, "images_list": ["ret/0_a.png"], "context": _context(1),
             "question": "Which of the following images appears in the document?", "answer": 1,
             "meta": meta(2500, 0.6, choice_images=["opt/a.png", "opt/b.png", "opt/c.png"])},
        ],
        "counting-text": [
            {"id": 0, "images_list": ["ret/0_a.png"],
             "context": _context(1, "Little penguins: 3. ", 0.1) + "Little penguins: 5. ",
             "question": "List the number of little penguins in each needle.", "answer": [3, 5],
             "meta": meta(3000, [0.1, 0.9])},
            {"id": 1, "images_list": [], "context": _context(0, "Little penguins: 2. ", 0.4),
             "question": "List the number of little penguins in each needle.", "answer": "[2]",
             "meta": meta(1200, [0.4])},
        ],
        "counting-image": [
            {"id": 0, "images_list": ["cnt/0_a.png", "cnt/0_b.png"], "context": _context(2),
             "question": "How many cartoon penguins are in each image?", "answer": [1, 0], "meta": meta(9000, 0.3)},
        ],
        "reasoning-text": [
            {"id": 0, "images_list": ["ret/0_a.png"],
             "context": _context(1, "Ada is older than Bob. Bob is older than Cy. ", 0.3),
             "question": "Who is the youngest?", "answer": 2,
             "meta": meta(2000, 0.3, choices=["Ada", "Bob", "Cy"])},
        ],
        "reasoning-image": [
            {"id": 0, "images_list": ["cnt/0_a.png"], "context": _context(1),
             "question": "Which image shows the same object as the needle?", "answer": 0,
             "meta": meta(4000, 0.7, choice_images=["opt/a.png", "opt/b.png"])},
        ],
    }
    return out


IMAGES = ["ret/0_a.png", "ret/1_a.png", "ret/1_b.png", "cnt/0_a.png", "cnt/0_b.png", "opt/a.png", "opt/b.png",
          "opt/c.png"]


def write_split(root: str, tasks=None) -> str:
    """Writes the split under `root` (a local folder); returns it."""
    for i, name in enumerate(IMAGES):
        path = os.path.join(root, "images", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_image(path, seed=100 + i, size=(40 + 8 * i, 36))
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for task, rows in samples().items():
        if tasks and task not in tasks:
            continue
        with open(os.path.join(root, "annotations", f"{task}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return root
