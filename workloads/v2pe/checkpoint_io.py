"""InternVL2 Hugging Face checkpoints: config.json + safetensors, local path or s3://.

`load_pretrained(dir)` builds a `V2PEModel` from an InternVL2-format folder (as
published for InternVL2-2B/8B: `vision_model.*`, `mlp1.*`, `language_model.*` names,
one `model.safetensors` or shards listed in `model.safetensors.index.json`) by mapping
every parameter name; `save_pretrained(model, dir)` writes the same format back.
Unknown or missing tensors and unsupported architecture options are errors that name
them: a silently half-loaded model is worse than none.
"""

from __future__ import annotations

import json
import posixpath
import re

import torch

from .model import LLMConfig, V2PEModel, V2PEModelConfig, VisionConfig

# (longview name pattern, InternVL2 name pattern); {i} is a layer index.
_NAME_MAP = [
    ("vision.patch_embed.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("vision.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision.pos_embed", "vision_model.embeddings.position_embedding"),
    ("vision.blocks.{i}.norm1.{p}", "vision_model.encoder.layers.{i}.norm1.{p}"),
    ("vision.blocks.{i}.qkv.{p}", "vision_model.encoder.layers.{i}.attn.qkv.{p}"),
    ("vision.blocks.{i}.proj.{p}", "vision_model.encoder.layers.{i}.attn.proj.{p}"),
    ("vision.blocks.{i}.ls1", "vision_model.encoder.layers.{i}.ls1"),
    ("vision.blocks.{i}.norm2.{p}", "vision_model.encoder.layers.{i}.norm2.{p}"),
    ("vision.blocks.{i}.fc1.{p}", "vision_model.encoder.layers.{i}.mlp.fc1.{p}"),
    ("vision.blocks.{i}.fc2.{p}", "vision_model.encoder.layers.{i}.mlp.fc2.{p}"),
    ("vision.blocks.{i}.ls2", "vision_model.encoder.layers.{i}.ls2"),
    ("projector.norm.{p}", "mlp1.0.{p}"),
    ("projector.fc1.{p}", "mlp1.1.{p}"),
    ("projector.fc2.{p}", "mlp1.3.{p}"),
    ("decoder.embed.weight", "language_model.model.tok_embeddings.weight"),
    ("decoder.layers.{i}.attn_norm.weight", "language_model.model.layers.{i}.attention_norm.weight"),
    ("decoder.layers.{i}.attn.wqkv.weight", "language_model.model.layers.{i}.attention.wqkv.weight"),
    ("decoder.layers.{i}.attn.wo.weight", "language_model.model.layers.{i}.attention.wo.weight"),
    ("decoder.layers.{i}.ffn_norm.weight", "language_model.model.layers.{i}.ffn_norm.weight"),
    ("decoder.layers.{i}.w1.weight", "language_model.model.layers.{i}.feed_forward.w1.weight"),
    ("decoder.layers.{i}.w2.weight", "language_model.model.layers.{i}.feed_forward.w2.weight"),
    ("decoder.layers.{i}.w3.weight", "language_model.model.layers.{i}.feed_forward.w3.weight"),
    ("decoder.norm.weight", "language_model.model.norm.weight"),
    ("decoder.lm_head.weight", "language_model.output.weight"),
]


def _compile(pattern: str) -> re.Pattern:
    rx = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(rx + "$")


_TO_HF = [(_compile(a), b) for a, b in _NAME_MAP]
_FROM_HF = [(_compile(b), a) for a, b in _NAME_MAP]


def _rename(name: str, table) -> str | None:
    for rx, template in table:
        m = rx.match(name)
        if m:
            return template.format(**m.groupdict())
    return None


def to_hf_name(name: str) -> str:
    out = _rename(name, _TO_HF)
    if out is None:
        raise KeyError(f"parameter {name!r} has no InternVL2 name")
    return out


def from_hf_name(name: str) -> str | None:
    return _rename(name, _FROM_HF)


# --- config.json ----------------------------------------------------------------------------


def _need(d: dict, key: str, where: str):
    if key not in d:
        raise ValueError(f"config.json: {where}.{key} is missing")
    return d[key]


def config_from_hf(cfg: dict) -> V2PEModelConfig:
    v, l = _need(cfg, "vision_config", "<root>"), _need(cfg, "llm_config", "<root>")
    checks = [
        (cfg.get("downsample_ratio", 0.5) == 0.5, "downsample_ratio", cfg.get("downsample_ratio"), "0.5"),
        (cfg.get("select_layer", -1) == -1, "select_layer", cfg.get("select_layer"), "-1 (last ViT layer)"),
        (cfg.get("ps_version", "v2") == "v2", "ps_version", cfg.get("ps_version"), "'v2'"),
        (not v.get("qk_normalization", False), "vision_config.qk_normalization", v.get("qk_normalization"), "false"),
        (v.get("norm_type", "layer_norm") == "layer_norm", "vision_config.norm_type", v.get("norm_type"),
         "'layer_norm' (InternViT-300M)"),
        (not l.get("bias", False), "llm_config.bias", l.get("bias"), "false (InternLM2)"),
        (not l.get("tie_word_embeddings", False), "llm_config.tie_word_embeddings", l.get("tie_word_embeddings"),
         "false"),
    ]
    for ok, key, value, allowed in checks:
        if not ok:
            raise ValueError(f"config.json: {key}={value!r} is not supported; longview supports {allowed}")
    image_size = cfg.get("force_image_size") or _need(v, "image_size", "vision_config")
    vision = VisionConfig(
        image_size=image_size,
        patch_size=_need(v, "patch_size", "vision_config"),
        hidden_size=_need(v, "hidden_size", "vision_config"),
        num_heads=_need(v, "num_attention_heads", "vision_config"),
        num_layers=_need(v, "num_hidden_layers", "vision_config"),
        intermediate_size=_need(v, "intermediate_size", "vision_config"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
    )
    llm = LLMConfig(
        vocab_size=_need(l, "vocab_size", "llm_config"),
        hidden_size=_need(l, "hidden_size", "llm_config"),
        num_heads=_need(l, "num_attention_heads", "llm_config"),
        num_kv_heads=l.get("num_key_value_heads", l["num_attention_heads"]),
        num_layers=_need(l, "num_hidden_layers", "llm_config"),
        intermediate_size=_need(l, "intermediate_size", "llm_config"),
        rms_norm_eps=l.get("rms_norm_eps", 1e-5),
        rope_theta=l.get("rope_theta", 1e6),
    )
    return V2PEModelConfig(vision=vision, llm=llm, downsample_ratio=cfg.get("downsample_ratio", 0.5))


def config_to_hf(cfg: V2PEModelConfig) -> dict:
    v, l = cfg.vision, cfg.llm
    return {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "downsample_ratio": cfg.downsample_ratio,
        "force_image_size": v.image_size,
        "select_layer": -1,
        "ps_version": "v2",
        "template": "internlm2-chat",
        "dynamic_image_size": True,
        "use_thumbnail": True,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_size": v.hidden_size,
            "num_attention_heads": v.num_heads,
            "num_hidden_layers": v.num_layers,
            "intermediate_size": v.intermediate_size,
            "layer_norm_eps": v.layer_norm_eps,
            "norm_type": "layer_norm",
            "qkv_bias": True,
            "qk_normalization": False,
            "hidden_act": "gelu",
            "num_channels": 3,
        },
        "llm_config": {
            "architectures": ["InternLM2ForCausalLM"],
            "model_type": "internlm2",
            "vocab_size": l.vocab_size,
            "hidden_size": l.hidden_size,
            "num_attention_heads": l.num_heads,
            "num_key_value_heads": l.num_kv_heads,
            "num_hidden_layers": l.num_layers,
            "intermediate_size": l.intermediate_size,
            "rms_norm_eps": l.rms_norm_eps,
            "rope_theta": l.rope_theta,
            "hidden_act": "silu",
            "bias": False,
            "tie_word_embeddings": False,
        },
    }


# --- tensors ------------------------------------------------------------------------------------


def _read_tensors(fs, root: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load as st_load

    index = posixpath.join(root, "model.safetensors.index.json")
    if fs.exists(index):
        files = sorted(set(json.loads(fs.cat_file(index))["weight_map"].values()))
    elif fs.exists(posixpath.join(root, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{root}: neither model.safetensors nor model.safetensors.index.json exists")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(st_load(fs.cat_file(posixpath.join(root, f))))
    return tensors


def load_pretrained(path: str, *, dtype: torch.dtype = torch.float32) -> V2PEModel:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    cfg = config_from_hf(json.loads(fs.cat_file(posixpath.join(root, "config.json"))))
    model = V2PEModel(cfg)
    tensors = _read_tensors(fs, root)
    state = {}
    unknown = []
    for hf_name, t in tensors.items():
        ours = from_hf_name(hf_name)
        if ours is None:
            unknown.append(hf_name)
            continue
        if ours == "vision.cls_token" or ours == "vision.pos_embed":
            t = t.reshape(model.state_dict()[ours].shape)  # stored (1, 1, C) / (1, N, C) either way
        state[ours] = t.to(dtype)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} tensor(s) have no longview parameter: {sorted(unknown)[:5]}")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path}: missing tensors for {len(missing)} parameter(s): {[to_hf_name(m) for m in missing][:5]}")
    for name, t in state.items():
        if t.shape != expected[name].shape:
            raise ValueError(f"{path}: {to_hf_name(name)} has shape {tuple(t.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(state)
    return model.to(dtype)


def save_pretrained(model: V2PEModel, path: str, *, dtype: torch.dtype | None = None) -> None:
    import fsspec
    from safetensors.torch import save as st_save

    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    tensors = {
        to_hf_name(n): (t.to(dtype) if dtype else t).detach().contiguous().cpu() for n, t in model.state_dict().items()
    }
    fs.pipe_file(posixpath.join(root, "config.json"), json.dumps(config_to_hf(model.cfg), indent=2).encode())
    fs.pipe_file(posixpath.join(root, "model.safetensors"), st_save(tensors, metadata={"format": "pt"}))
