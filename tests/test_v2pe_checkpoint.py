"""InternVL2-format checkpoints: a tiny one is written here by hand, in the published layout."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from workloads.v2pe.hf_checkpoint import config_from_hf, load_pretrained, save_pretrained

V = dict(hidden=32, heads=2, layers=2, inter=64, image=56, patch=14)
L = dict(vocab=272, hidden=64, heads=4, kv=2, layers=2, inter=128)


def hf_config():
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "force_image_size": V["image"], "select_layer": -1, "ps_version": "v2", "template": "internlm2-chat",
        "max_dynamic_patch": 12, "min_dynamic_patch": 1, "use_thumbnail": True, "dynamic_image_size": True,
        "torch_dtype": "bfloat16", "use_backbone_lora": 0, "use_llm_lora": 0, "transformers_version": None,
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
        "vision_config": {"architectures": ["InternVisionModel"], "hidden_size": V["hidden"],
                          "num_attention_heads": V["heads"], "num_hidden_layers": V["layers"],
                          "intermediate_size": V["inter"], "image_size": V["image"], "patch_size": V["patch"],
                          "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm",
                          "layer_norm_eps": 1e-6, "drop_path_rate": 0.0, "hidden_act": "gelu", "num_channels": 3,
                          "model_type": "intern_vit_6b", "use_flash_attn": True, "dropout": 0.0,
                          "attention_dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02},
        "llm_config": {"architectures": ["InternLM2ForCausalLM"], "vocab_size": L["vocab"],
                       "hidden_size": L["hidden"], "num_attention_heads": L["heads"],
                       "num_key_value_heads": L["kv"], "num_hidden_layers": L["layers"],
                       "intermediate_size": L["inter"], "rms_norm_eps": 1e-5, "rope_theta": 1000000,
                       "bias": False, "tie_word_embeddings": False, "max_position_embeddings": 32768,
                       "rope_scaling": {"type": "dynamic", "factor": 2.0}, "hidden_act": "silu",
                       "model_type": "internlm2", "attn_implementation": "flash_attention_2", "bos_token_id": 1,
                       "eos_token_id": 2, "pad_token_id": 2, "use_cache": True, "temperature": 1.0, "top_p": 1.0,
                       "_name_or_path": "internlm/internlm2-chat-1_8b"},
    }


def hf_tensors(seed=0):
    """Every tensor of an InternVL2 checkpoint, by its published name and shape."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    c, n_patch = V["hidden"], (V["image"] // V["patch"]) ** 2
    t = {
        "vision_model.embeddings.class_embedding": r(1, 1, c),
        "vision_model.embeddings.patch_embedding.weight": r(c, 3, V["patch"], V["patch"]),
        "vision_model.embeddings.patch_embedding.bias": r(c),
        "vision_model.embeddings.position_embedding": r(1, n_patch + 1, c),
        "mlp1.0.weight": r(4 * c), "mlp1.0.bias": r(4 * c),
        "mlp1.1.weight": r(L["hidden"], 4 * c), "mlp1.1.bias": r(L["hidden"]),
        "mlp1.3.weight": r(L["hidden"], L["hidden"]), "mlp1.3.bias": r(L["hidden"]),
        "language_model.model.tok_embeddings.weight": r(L["vocab"], L["hidden"]),
        "language_model.model.norm.weight": r(L["hidden"]),
        "language_model.output.weight": r(L["vocab"], L["hidden"]),
    }
    for i in range(V["layers"]):
        p = f"vision_model.encoder.layers.{i}."
        t |= {p + "attn.qkv.weight": r(3 * c, c), p + "attn.qkv.bias": r(3 * c), p + "attn.proj.weight": r(c, c),
              p + "attn.proj.bias": r(c), p + "ls1": r(c), p + "ls2": r(c), p + "norm1.weight": r(c),
              p + "norm1.bias": r(c), p + "norm2.weight": r(c), p + "norm2.bias": r(c),
              p + "mlp.fc1.weight": r(V["inter"], c), p + "mlp.fc1.bias": r(V["inter"]),
              p + "mlp.fc2.weight": r(c, V["inter"]), p + "mlp.fc2.bias": r(c)}
    d = L["hidden"] // L["heads"]
    for i in range(L["layers"]):
        p = f"language_model.model.layers.{i}."
        t |= {p + "attention.wqkv.weight": r((L["heads"] + 2 * L["kv"]) * d, L["hidden"]),
              p + "attention.wo.weight": r(L["hidden"], L["hidden"]),
              p + "attention_norm.weight": r(L["hidden"]), p + "ffn_norm.weight": r(L["hidden"]),
              p + "feed_forward.w1.weight": r(L["inter"], L["hidden"]),
              p + "feed_forward.w3.weight": r(L["inter"], L["hidden"]),
              p + "feed_forward.w2.weight": r(L["hidden"], L["inter"])}
    return t


def write_checkpoint(folder, tensors, sharded=False, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or hf_config()))
    if not sharded:
        save_file(tensors, str(folder / "model.safetensors"))
        return
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(folder / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in halves.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("sharded", [False, True])
def test_every_published_tensor_lands_in_its_parameter(tmp_path, sharded):
    tensors = hf_tensors()
    write_checkpoint(tmp_path / "ckpt", tensors, sharded)
    model = load_pretrained(str(tmp_path / "ckpt"))
    assert model.cfg.tokens_per_tile == 4 and model.cfg.llm.num_kv_heads == 2
    assert torch.equal(model.decoder.layers[1].attn.wqkv.weight, tensors["language_model.model.layers.1.attention.wqkv.weight"])
    assert torch.equal(model.decoder.layers[0].w3.weight, tensors["language_model.model.layers.0.feed_forward.w3.weight"])
    assert torch.equal(model.vision.blocks[1].fc2.bias, tensors["vision_model.encoder.layers.1.mlp.fc2.bias"])
    assert torch.equal(model.projector.fc2.weight, tensors["mlp1.3.weight"])
    assert torch.equal(model.decoder.lm_head.weight, tensors["language_model.output.weight"])
    assert torch.equal(model.vision.cls_token, tensors["vision_model.embeddings.class_embedding"])
    n_params = sum(1 for _ in model.parameters())
    assert n_params == len(tensors)  # nothing left at its initial value


def test_save_writes_the_same_format_back(tmp_path):
    tensors = hf_tensors(seed=1)
    write_checkpoint(tmp_path / "in", tensors)
    save_pretrained(load_pretrained(str(tmp_path / "in")), str(tmp_path / "out"))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(saved) == set(tensors)
    for k in tensors:
        assert torch.equal(saved[k], tensors[k]), k
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    want = hf_config()
    for section in ("vision_config", "llm_config"):
        for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"):
            assert cfg[section][key] == want[section][key], (section, key)
    assert cfg["llm_config"]["num_key_value_heads"] == 2 and cfg["force_image_size"] == 56


def test_round_trip_through_an_fsspec_url(tmp_path):
    import fsspec

    tensors = hf_tensors(seed=2)
    write_checkpoint(tmp_path / "in", tensors)
    model = load_pretrained(str(tmp_path / "in"))
    save_pretrained(model, "memory://ckpt/tiny")
    again = load_pretrained("memory://ckpt/tiny")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    assert fsspec.filesystem("memory").exists("/ckpt/tiny/config.json")


def test_bad_checkpoints_are_named(tmp_path):
    tensors = hf_tensors()
    extra = dict(tensors, **{"vision_model.encoder.layers.0.attn.q_norm.weight": torch.ones(32)})
    write_checkpoint(tmp_path / "extra", extra)
    unknown = r"\['vision_model.encoder.layers.0.attn.q_norm.weight'\]"
    with pytest.raises(ValueError, match=r"1 tensor\(s\) have no longview parameter: " + unknown):
        load_pretrained(str(tmp_path / "extra"))
    partial = {k: v for k, v in tensors.items() if k != "mlp1.1.bias"}
    write_checkpoint(tmp_path / "partial", partial)
    with pytest.raises(ValueError, match=r"missing tensors for 1 parameter\(s\): \['mlp1.1.bias'\]"):
        load_pretrained(str(tmp_path / "partial"))


def _drop(d, key):
    d.pop(key)


# (how config.json is changed, what the error must name)
REFUSED = [
    (lambda c: c["vision_config"].update(qk_normalization=True), r"vision_config.qk_normalization is True"),
    (lambda c: _drop(c["vision_config"], "qk_normalization"),
     r"vision_config.qk_normalization is missing, which means True"),  # the authors' InternVisionConfig default
    (lambda c: _drop(c, "ps_version"), r"ps_version is missing, which means 'v1'"),
    (lambda c: _drop(c["llm_config"], "bias"), r"llm_config.bias is missing, which means True"),
    (lambda c: c["llm_config"].update(architectures=["Qwen2ForCausalLM"]), r"Qwen2 \(InternVL2-1B\)"),
    (lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"]), r"Phi-3 \(InternVL2-4B\)"),
    (lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 4.0}), r"llm_config.rope_scaling="),
    (lambda c: c["vision_config"].update(drop_path_rate=0.1), r"vision_config.drop_path_rate is 0.1"),
    (lambda c: c.update(img_emb_down_sample_ratio=2), r"img_emb_down_sample_ratio is 2"),
    (lambda c: c.update(template="phi3-chat"), r"template is 'phi3-chat'"),
    (lambda c: c["llm_config"].update(sliding_window=4096), r"llm_config.sliding_window not understood"),
    (lambda c: c.update(some_new_option=True), r"some_new_option not understood"),
    (lambda c: _drop(c["llm_config"], "hidden_size"), r"shape"),  # defaults to 4096: the tensors disagree
]


@pytest.mark.parametrize("change,message", REFUSED)
def test_config_fields_are_honoured_or_refused_by_name(tmp_path, change, message):
    cfg = hf_config()
    change(cfg)
    write_checkpoint(tmp_path / "ckpt", hf_tensors(), config=cfg)
    with pytest.raises(ValueError, match=message):
        load_pretrained(str(tmp_path / "ckpt"))


def test_missing_keys_take_the_authors_defaults():
    cfg = hf_config()
    for key in ("rms_norm_eps", "rope_theta", "max_position_embeddings", "rope_scaling", "num_key_value_heads"):
        del cfg["llm_config"][key]
    del cfg["use_thumbnail"]
    model = config_from_hf(cfg)
    # InternLM2Config: rms_norm_eps 1e-6, rope_theta 10000, 2048 positions, no scaling,
    # as many KV heads as heads; InternVLChatConfig: use_thumbnail False.
    assert (model.llm.rms_norm_eps, model.llm.rope_theta, model.llm.max_position_embeddings) == (1e-6, 10000, 2048)
    assert model.llm.rope_scaling is None and model.llm.num_kv_heads == model.llm.num_heads and not model.thumbnail
    published = config_from_hf(hf_config())
    assert (published.llm.rope_scaling, published.llm.rope_scaling_factor) == ("dynamic", 2.0)


def test_force_image_size_resizes_the_position_embedding(tmp_path):
    """force_image_size 84 over a ViT learned at 56: the 4x4 position grid is resized
    (bicubic, float32) to 6x6 as InternViT's _get_pos_embed does; the checkpoint keeps
    its learned shape when saved back."""
    cfg = hf_config()
    cfg["force_image_size"] = 84
    tensors = hf_tensors()
    write_checkpoint(tmp_path / "ckpt", tensors, config=cfg)
    model = load_pretrained(str(tmp_path / "ckpt"))
    assert (model.cfg.vision.image_size, model.cfg.tokens_per_tile) == (84, 9)
    pos = tensors["vision_model.embeddings.position_embedding"]
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    want = torch.cat([pos[:, :1], want.reshape(1, -1, 36).permute(0, 2, 1)], dim=1)
    torch.testing.assert_close(model.vision.position_embedding(), want, rtol=0, atol=0)  # the same ops: exact
    feats = model.encode_images(torch.randn(2, 3, 84, 84))
    assert feats.shape == (2 * 9, L["hidden"])
    save_pretrained(model, str(tmp_path / "back"))
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (saved["force_image_size"], saved["vision_config"]["image_size"]) == (84, 56)
    assert load_pretrained(str(tmp_path / "back")).cfg == model.cfg


def test_prepare_checks_the_checkpoints_own_heads(tmp_path):
    """At config load only the named size is known; once prepare_data has read the
    checkpoint's config.json, its heads decide whether the all-to-all degree fits."""
    from orchestrator.config import load_config
    from workloads.fields import FieldError
    from workloads.v2pe.inputs import prepare_data

    cfg = hf_config()
    cfg["llm_config"]["num_key_value_heads"] = 1  # the tiny size has 2 KV heads
    write_checkpoint(tmp_path / "ckpt", hf_tensors(), config=cfg)
    job = load_config("configs/v2pe-demo.yaml", overrides={
        "model.pretrained": str(tmp_path / "ckpt"), "parallelism.cp_a2a": 2, "storage.uri": str(tmp_path / "runs")})
    with pytest.raises(FieldError, match=rf"parallelism.cp_a2a: 2 does not divide the model's num_kv_heads=1 "
                                         rf"\({tmp_path / 'ckpt'}\)"):
        prepare_data(job, str(tmp_path / "runs" / "x"))


# Every key transformers' PretrainedConfig.__init__ sets (4.37-4.46), with its default:
# `to_dict()` writes them all into each sub-config of InternVLChatConfig's config.json.
PRETRAINED_CONFIG_KEYS = {
    "return_dict": True, "output_hidden_states": False, "output_attentions": False, "torchscript": False,
    "torch_dtype": None, "use_bfloat16": False, "tf_legacy_loss": False, "pruned_heads": {},
    "tie_word_embeddings": True, "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "is_decoder": False,
    "cross_attention_hidden_size": None, "add_cross_attention": False, "tie_encoder_decoder": False,
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
    "typical_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "num_return_sequences": 1, "output_scores": False,
    "return_dict_in_generate": False, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "architectures": None, "finetuning_task": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "label2id": {"LABEL_0": 0, "LABEL_1": 1},
    "tokenizer_class": None, "prefix": None, "bos_token_id": None, "pad_token_id": None, "eos_token_id": None,
    "sep_token_id": None, "decoder_start_token_id": None, "task_specific_params": None, "problem_type": None,
    "_name_or_path": "", "transformers_version": "4.37.2",
}


def authors_config(version="v2pe_fix", stride=64):
    """config.json as the V2PE authors' InternVLChatConfig.save_pretrained writes it: every
    PretrainedConfig key in each sub-config (the sub-config's own values over them), V2PE's
    position keys in llm_config."""
    cfg = hf_config()
    for sub in ("vision_config", "llm_config"):
        cfg[sub] = {**PRETRAINED_CONFIG_KEYS, **cfg[sub]}
    cfg["llm_config"].update(rope_pos_id_version=version, rope_pos_id_stride=stride)
    cfg["vision_config"]["tie_word_embeddings"] = True  # InternVisionConfig leaves the default
    return cfg


def test_the_authors_config_json_loads_with_its_position_mode(tmp_path):
    cfg = authors_config()
    assert "tie_word_embeddings" in cfg["vision_config"] and "rope_pos_id_version" in cfg["llm_config"]
    write_checkpoint(tmp_path / "ckpt", hf_tensors(), config=cfg)
    model = load_pretrained(str(tmp_path / "ckpt"))
    assert (model.cfg.position_mode, model.cfg.position_stride) == ("v2pe_fix", 64)
    # The same numbers as the published layout without the generic keys.
    write_checkpoint(tmp_path / "plain", hf_tensors())
    ids = torch.randint(0, L["vocab"], (1, 40))
    pos = torch.arange(40, dtype=torch.float64)[None]
    from workloads.v2pe.model import AttentionSpec

    empty, index = torch.zeros(0, L["hidden"]), torch.full((1, 40), -1)
    with torch.no_grad():
        a = model.forward_hidden(ids, pos, empty, index, AttentionSpec())
        b = load_pretrained(str(tmp_path / "plain")).forward_hidden(ids, pos, empty, index, AttentionSpec())
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # same weights, same code: bit for bit
    # Saved back, the position keys survive.
    save_pretrained(model, str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "config.json").read_text())["llm_config"]
    assert (again["rope_pos_id_version"], again["rope_pos_id_stride"]) == ("v2pe_fix", 64)


@pytest.mark.parametrize("change,message", [
    (lambda c: c["llm_config"].update(rope_pos_id_version="v3"), r"llm_config.rope_pos_id_version='v3' is not one"),
    (lambda c: c["llm_config"].update(rope_pos_id_stride=0), r"llm_config.rope_pos_id_stride=0 is not an integer"),
    (lambda c: c.update(rope_pos_id_version="default"), r"rope_pos_id_version='default' disagrees with "
                                                          r"llm_config.rope_pos_id_version='v2pe_fix'"),
])
def test_bad_position_keys_are_named(change, message):
    cfg = authors_config()
    change(cfg)
    with pytest.raises(ValueError, match=message):
        config_from_hf(cfg)


def test_the_checkpoints_positions_are_the_jobs_defaults_unless_the_yaml_says_otherwise():
    from orchestrator.config import ConfigError, load_config

    mc = config_from_hf(authors_config("v2pe_fix", 64))
    base = "name: p\nworkload: v2pe\n"
    cfg = load_config(base)
    pos = cfg.data.positions(mc)
    assert (pos.mode, pos.stride, pos.source) == ("v2pe_fix", 64, "the checkpoint's config.json")
    cfg = load_config(base, overrides={"data.position_mode": "v2pe_rnd"})
    pos = cfg.data.positions(mc)
    assert (pos.mode, pos.stride, pos.source) == ("v2pe_rnd", None, "the job's config")
    cfg = load_config(base, overrides={"data.position_stride": 16})
    assert cfg.data.positions(mc).stride == 16 and "v2pe_fix (stride 16, δ = 1/16)" in str(cfg.data.positions(mc))
    # Without a checkpoint's word: V2PE's training mode.
    assert load_config(base).data.positions(config_from_hf(hf_config())).mode == "v2pe_rnd"
    with pytest.raises(ConfigError, match="data.position_stride: required when data.position_mode is 'v2pe_fix'"):
        load_config(base, overrides={"data.position_mode": "v2pe_fix"})
