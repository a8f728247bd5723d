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


# Keys every Hugging Face config carries (transformers' PretrainedConfig: generation
# defaults, labels, bookkeeping). None of them changes what the network computes.
_HF_GENERIC = frozenset("""
    _attn_implementation_autoset _commit_hash _name_or_path add_cross_attention architectures auto_map
    bad_words_ids begin_suppress_tokens bos_token_id chunk_size_feed_forward cross_attention_hidden_size
    decoder_start_token_id diversity_penalty do_sample early_stopping encoder_no_repeat_ngram_size eos_token_id
    exponential_decay_length_penalty finetuning_task forced_bos_token_id forced_eos_token_id id2label is_decoder
    is_encoder_decoder label2id length_penalty max_length min_length model_type no_repeat_ngram_size
    num_beam_groups num_beams num_return_sequences output_attentions output_hidden_states output_scores
    pad_token_id prefix problem_type pruned_heads remove_invalid_values repetition_penalty return_dict
    return_dict_in_generate sep_token_id suppress_tokens task_specific_params temperature tf_legacy_loss
    tie_encoder_decoder tokenizer_class top_k top_p torch_dtype torchscript transformers_version typical_p
    use_bfloat16 use_cache initializer_range initializer_factor attn_implementation use_flash_attn hidden_size
    _flash_attn_2_enabled tie_word_embeddings
""".split())
# Data-side keys of the root: how the authors tile images. longview's data section owns
# tiling (data.max_tiles); the thumbnail follows use_thumbnail.
_ROOT_DATA = frozenset({"dynamic_image_size", "min_dynamic_patch", "max_dynamic_patch", "use_thumbnail"})
# V2PE's position modes (its `rope_pos_id_version`), as longview names them.
POSITION_MODES = ("default", "v2pe_fix", "v2pe_rnd")

# The LLMs InternVL2 checkpoints are built on, and which of them longview runs.
_OTHER_LLMS = {"Qwen2ForCausalLM": "Qwen2 (InternVL2-1B)", "Phi3ForCausalLM": "Phi-3 (InternVL2-4B)",
               "LlamaForCausalLM": "Llama (InternVL2-40B/76B)"}


class ConfigError(ValueError):
    """A config.json longview cannot honour; the message names the key and its value."""


class _Section:
    """One object of config.json: reads keys with the authors' defaults and refuses any
    key it neither reads nor knows to be inert."""

    def __init__(self, d, where: str, inert: frozenset = frozenset()):
        if not isinstance(d, dict):
            raise ConfigError(f"config.json: {where} must be an object, got {type(d).__name__}")
        self.d, self.where, self.inert, self.read = d, where, inert, set()

    def name(self, key: str) -> str:
        return key if self.where == "<root>" else f"{self.where}.{key}"

    def get(self, key: str, default=None):
        """The value, or the authors' configuration class default when missing."""
        self.read.add(key)
        return self.d.get(key, default)

    def need(self, key: str):
        self.read.add(key)
        if key not in self.d:
            raise ConfigError(f"config.json: {self.name(key)} is missing")
        return self.d[key]

    def only(self, key: str, default, allowed: tuple, why: str):
        """A key longview supports at some values only (missing means the authors' default)."""
        value = self.get(key, default)
        if value not in allowed:
            shown = "missing, which means " + repr(default) if key not in self.d else repr(value)
            raise ConfigError(f"config.json: {self.name(key)} is {shown}; longview supports "
                              f"{' or '.join(map(repr, allowed))} ({why})")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.d) - self.read - _HF_GENERIC - self.inert)
        if unknown:
            raise ConfigError(f"config.json: {', '.join(self.name(k) for k in unknown)} not understood by longview "
                              "(refused rather than ignored: it may change what the model computes)")


def _rope_scaling(llm: _Section) -> tuple[str | None, float]:
    rs = llm.get("rope_scaling")
    if rs is None:
        return None, 1.0
    kind = rs.get("type", rs.get("rope_type")) if isinstance(rs, dict) else None
    factor = rs.get("factor") if isinstance(rs, dict) else None
    if kind not in ("dynamic", "linear") or not isinstance(factor, (int, float)) or isinstance(factor, bool) \
            or factor < 1:
        raise ConfigError(f"config.json: llm_config.rope_scaling={rs!r} is not supported; longview supports "
                          "{'type': 'dynamic' or 'linear', 'factor': >= 1} (InternLM2's rotary scalings)")
    return kind, float(factor)


def config_from_hf(cfg: dict) -> V2PEModelConfig:
    """The model of an InternVL2 config.json. Each key is honoured or refused by name; a
    missing key means what it means in the authors' configuration classes."""
    root = _Section(cfg, "<root>", _ROOT_DATA)
    arch = root.get("architectures", ["InternVLChatModel"])
    if arch != ["InternVLChatModel"]:
        raise ConfigError(f"config.json: architectures={arch!r} is not an InternVL chat model (InternVLChatModel)")
    root.only("downsample_ratio", 0.5, (0.5,), "InternVL2's pixel shuffle")
    root.only("select_layer", -1, (-1,), "features of the last ViT layer")
    root.only("ps_version", "v1", ("v2",), "InternVL2's pixel shuffle order")
    root.only("template", None, ("internlm2-chat", None), "longview renders the internlm2-chat template")
    root.only("dynamic_image_size", False, (True,), "InternVL2 dynamic tiling")
    root.only("min_dynamic_patch", 1, (1,), "tiling starts at one tile")
    root.only("pad2square", False, (False,), "images are tiled, not padded")
    root.only("img_emb_down_sample_ratio", None, (None,), "V2PE's adaptive pooling of visual tokens is not implemented")
    for key, default in (("use_backbone_lora", 0), ("use_llm_lora", 0)):
        root.only(key, default, (0,), "merge LoRA weights into the checkpoint before loading it")
    for key, default in (("attn_type", None), ("group_list", None), ("compress_seq", False), ("chunk_num", 1),
                         ("interaction", True), ("dynamic_max_patch", False), ("min_num_frame", 4),
                         ("max_num_frame", 20)):
        root.only(key, default, (default,), "options of the V2PE authors' code that longview does not implement")

    v = _Section(root.need("vision_config"), "vision_config")
    v.only("architectures", ["InternVisionModel"], (["InternVisionModel"],), "InternViT")
    v.only("norm_type", "rms_norm", ("layer_norm",), "InternViT-300M's LayerNorm")
    v.only("qk_normalization", True, (False,), "InternViT-300M has none")
    v.only("qkv_bias", False, (True,), "InternViT-300M's attention has biases")
    v.only("hidden_act", "gelu", ("gelu",), "exact GELU")
    v.only("num_channels", 3, (3,), "RGB tiles")
    for key in ("dropout", "attention_dropout", "drop_path_rate"):
        v.only(key, 0.0, (0, 0.0), "longview trains without dropout; set it to 0.0 in config.json")
    image_size = v.get("image_size", 224)
    force = root.get("force_image_size")
    vision = VisionConfig(
        image_size=force or image_size,
        pretrain_image_size=image_size if force and force != image_size else None,
        patch_size=v.get("patch_size", 14),
        hidden_size=v.need("hidden_size"),
        num_heads=v.need("num_attention_heads"),
        num_layers=v.need("num_hidden_layers"),
        intermediate_size=v.need("intermediate_size"),
        layer_norm_eps=v.get("layer_norm_eps", 1e-6),
    )
    v.finish()

    l = _Section(root.need("llm_config"), "llm_config", frozenset({"scale_img"}))
    llm_arch = l.get("architectures", [""])
    if llm_arch != ["InternLM2ForCausalLM"]:
        name = _OTHER_LLMS.get(llm_arch[0] if isinstance(llm_arch, list) and llm_arch else "", repr(llm_arch))
        raise ConfigError(f"config.json: llm_config.architectures={llm_arch!r}: the language model is {name}; "
                          "longview supports InternLM2 (InternVL2-2B, InternVL2-8B)")
    l.only("bias", True, (False,), "InternLM2's layers have no biases")
    l.only("hidden_act", "silu", ("silu",), "InternLM2's SwiGLU")
    l.only("scale_img", False, (False,), "an option of the V2PE authors' code that longview does not implement")
    l.only("pretraining_tp", 1, (1,), "tensor-parallel slicing of the pretraining code")
    mode, stride = _positions(l, root)
    heads = l.get("num_attention_heads", 32)
    kind, factor = _rope_scaling(l)
    llm = LLMConfig(
        vocab_size=l.get("vocab_size", 103168),
        hidden_size=l.get("hidden_size", 4096),
        num_heads=heads,
        num_kv_heads=l.get("num_key_value_heads") or heads,
        num_layers=l.get("num_hidden_layers", 32),
        intermediate_size=l.get("intermediate_size", 11008),
        rms_norm_eps=l.get("rms_norm_eps", 1e-6),
        rope_theta=l.get("rope_theta", 10000),
        rope_scaling=kind,
        rope_scaling_factor=factor,
        max_position_embeddings=l.get("max_position_embeddings", 2048),
    )
    l.finish()
    thumbnail = bool(root.get("use_thumbnail", False))
    root.finish()
    return V2PEModelConfig(vision=vision, llm=llm, downsample_ratio=0.5, thumbnail=thumbnail,
                           position_mode=mode, position_stride=stride)


def _positions(llm: _Section, root: _Section) -> tuple[str | None, int | None]:
    """The position mode and stride a V2PE checkpoint was trained with: its llm_config's
    `rope_pos_id_version` / `rope_pos_id_stride` (the authors' code reads them there; a
    copy at the root, which some of their scripts write, must agree). None: not said."""
    found = {}
    for sec in (llm, root):
        for key in ("rope_pos_id_version", "rope_pos_id_stride"):
            if key in sec.d:
                value = sec.get(key)
                if key in found and found[key][1] != value:
                    raise ConfigError(f"config.json: {sec.name(key)}={value!r} disagrees with "
                                      f"{found[key][0]}={found[key][1]!r}")
                found.setdefault(key, (sec.name(key), value))
    mode = found.get("rope_pos_id_version", (None, None))[1]
    stride = found.get("rope_pos_id_stride", (None, None))[1]
    if mode is not None and mode not in POSITION_MODES:
        raise ConfigError(f"config.json: {found['rope_pos_id_version'][0]}={mode!r} is not one of "
                          f"{', '.join(POSITION_MODES)} (V2PE's position modes)")
    if stride is not None and (not isinstance(stride, int) or isinstance(stride, bool) or not 1 <= stride <= 256):
        raise ConfigError(f"config.json: {found['rope_pos_id_stride'][0]}={stride!r} is not an integer in 1..256 "
                          "(δ = stride/256)")
    return mode, stride


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
        "use_thumbnail": cfg.thumbnail,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "image_size": v.pretrain_image_size or v.image_size,
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
            "rope_scaling": {"type": l.rope_scaling, "factor": l.rope_scaling_factor} if l.rope_scaling else None,
            "max_position_embeddings": l.max_position_embeddings,
            "hidden_act": "silu",
            "bias": False,
            "tie_word_embeddings": False,
            **({"rope_pos_id_version": cfg.position_mode} if cfg.position_mode else {}),
            **({"rope_pos_id_stride": cfg.position_stride} if cfg.position_stride else {}),
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


def read_config(path: str) -> V2PEModelConfig:
    """The model config.json of a checkpoint folder describes (no tensors read)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    config = posixpath.join(root, "config.json")
    if not fs.exists(config):
        raise ConfigError(f"model.pretrained: {path} has no config.json (an InternVL2 checkpoint folder)")
    try:
        return config_from_hf(json.loads(fs.cat_file(config)))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}/config.json is not valid JSON ({e})") from None


def load_pretrained(path: str, *, dtype: torch.dtype = torch.float32) -> V2PEModel:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    cfg = read_config(path)
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


def save_pretrained(model: V2PEModel, path: str, *, dtype: torch.dtype | None = None,
                    state: dict[str, torch.Tensor] | None = None) -> None:
    """state: the model's full state dict when `model` holds only shards of it (FSDP)."""
    import fsspec
    from safetensors.torch import save as st_save

    fs, root = fsspec.core.url_to_fs(path)
    fs.makedirs(root, exist_ok=True)
    state = model.state_dict() if state is None else state
    tensors = {to_hf_name(n): (t.to(dtype) if dtype else t).detach().contiguous().cpu() for n, t in state.items()}
    fs.pipe_file(posixpath.join(root, "config.json"), json.dumps(config_to_hf(model.cfg), indent=2).encode())
    fs.pipe_file(posixpath.join(root, "model.safetensors"), st_save(tensors, metadata={"format": "pt"}))
