"""Backbone adapters: the lite pair (real pretrained weights) and hf: (tiny saved models)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mumic.backbones import lite as lite_mod
from mumic.backbones import load_backbone
from mumic.errors import BackboneError

SIZE = 128


@pytest.fixture(scope="module")
def lite():
    """The real lite backbone at 128 px; each test resets the trainable modes it changes."""
    b = load_backbone("lite", image_size=SIZE)
    yield b
    b.set_trainable("frozen", "frozen")


def _images(size: int = SIZE) -> torch.Tensor:
    """Solid red, a checkerboard and a colour ramp, uint8 [3, 3, size, size]."""
    red = torch.zeros(3, size, size, dtype=torch.uint8)
    red[0] = 255
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = (((yy // 16 + xx // 16) % 2) * 255).to(torch.uint8).expand(3, size, size)
    ramp = torch.stack([xx * 255 // size, yy * 255 // size, 255 - xx * 255 // size]).to(torch.uint8)
    return torch.stack([red, checker, ramp])


# ---------------------------------------------------------------------------- lite


def test_lite_attributes_and_shapes(lite):
    assert lite.spec == "lite"
    assert (lite.embed_dim, lite.image_feature_dim, lite.text_feature_dim) == (384, 1280, 384)
    assert (lite.image_size, lite.native_image_size) == (SIZE, 224)
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5)
    assert lite.logit_scale is None and lite.logit_bias is None
    assert not lite.training
    px = _images()
    norm = lite.normalize(px)
    assert norm.dtype == torch.float32 and norm.device == px.device
    assert norm[0, 0, 0, 0].item() == pytest.approx(1.0) and norm[0, 1, 0, 0].item() == pytest.approx(-1.0)
    with torch.inference_mode():
        feats = lite.image_features(px)
        assert feats.shape == (3, 1280)
        assert lite.image_head(feats).shape == (3, 384)
        assert torch.allclose(lite.encode_image(px), lite.image_head(feats))
        tf = lite.text_features(["a photo of a cat", "dog", "a much longer sentence about many things"])
        assert tf.shape == (3, 384)
        assert lite.text_head(tf).shape == (3, 384)
        assert lite.encode_text(["a cat"]).shape == (1, 384)
        assert lite.text_features([]).shape == (0, 384)
    assert lite.config() == {"spec": "lite", "image_size": SIZE, "image_head": "mlp", "seed": 0}


def test_lite_image_input_checked(lite):
    with pytest.raises(BackboneError, match="uint8"):
        lite.image_features(torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(BackboneError, match="image_size"):
        lite.image_features(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(BackboneError, match="list of strings"):
        lite.text_features("a cat")


def test_lite_efficientnet_is_pretrained_imagenet(lite):
    """GAP features + the file's own ImageNet classifier reproduce the package's forward, and
    give confident, image-dependent predictions (a random network is near-uniform)."""
    from efficientnet_lite_pytorch import EfficientNet

    state = lite_mod.load_efficientnet_state()
    weight, bias = state["_fc.weight"], state["_fc.bias"]
    px = _images()
    with torch.inference_mode():
        feats = lite.image_features(px)
        logits = feats @ weight.T + bias
        reference = EfficientNet.from_name("efficientnet-lite0", image_size=SIZE)
        reference.load_state_dict(state)
        ref_logits = reference.eval()(lite.normalize(px))
    assert torch.isfinite(logits).all()
    assert torch.allclose(logits, ref_logits, atol=1e-4)
    assert F.cosine_similarity(feats[0], feats[1], dim=0) < 0.9  # red vs checkerboard
    top = logits.softmax(-1).max(-1).values
    assert (top > 20 / 1000).all(), top  # >= 20x a uniform guess


def test_lite_minilm_semantics(lite):
    with torch.inference_mode():
        e = F.normalize(lite.text_features(
            ["a photo of a cat", "a picture of a kitten", "a spreadsheet of tax numbers"]
        ), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_lite_text_head_starts_at_identity(lite):
    texts = ["a photo of a cat", "a red car"]
    with torch.inference_mode():
        assert torch.allclose(lite.encode_text(texts), F.normalize(lite.text_features(texts), dim=-1), atol=1e-6)
    assert torch.equal(lite.text_projection.weight, torch.eye(384))
    assert torch.equal(lite.text_projection.bias, torch.zeros(384))


def test_lite_set_trainable_groups(lite):
    tower = lite.image_tower
    n_tower = sum(p.numel() for p in tower.parameters())
    n_last = sum(
        p.numel() for m in [*tower._blocks[15:], tower._conv_head, tower._bn1] for p in m.parameters()
    )
    n_text = sum(p.numel() for p in lite.text_tower.parameters())
    n_heads = 1280 * 1024 + 1024 + 1024 * 384 + 384 + 384 * 384 + 384

    def counts():
        return {k: sum(p.numel() for p in v) for k, v in lite.param_groups().items()}

    try:
        lite.set_trainable("frozen", "frozen")
        assert counts() == {"image_tower": 0, "text_tower": 0, "heads": n_heads}
        lite.set_trainable("last", "frozen")
        assert counts() == {"image_tower": n_last, "text_tower": 0, "heads": n_heads}
        assert 0 < n_last < n_tower / 2
        lite.set_trainable("full", "tuned")
        assert counts() == {"image_tower": n_tower, "text_tower": n_text, "heads": n_heads}
        assert (lite.image_tower_mode, lite.text_tower_mode) == ("full", "tuned")
        with pytest.raises(BackboneError, match="frozen, last, full"):
            lite.set_trainable("some")
        with pytest.raises(BackboneError, match="frozen, tuned"):
            lite.set_trainable("frozen", "last")
    finally:
        lite.set_trainable("frozen", "frozen")


def test_lite_frozen_parts_keep_batchnorm_stats(lite):
    tower = lite.image_tower
    px = _images()

    def stats(bn):
        return bn.running_mean.clone(), bn.running_var.clone()

    try:
        lite.set_trainable("frozen", "frozen")
        lite.train()
        assert lite.training and not tower.training and not lite.text_tower.training
        assert lite.image_projection.training
        before = stats(tower._bn1)
        lite.encode_image(px).sum().backward()
        assert all(torch.equal(a, b) for a, b in zip(before, stats(tower._bn1)))
        assert all(p.grad is None for p in tower.parameters())
        assert lite.image_projection[0].weight.grad is not None

        lite.set_trainable("last", "tuned")
        lite.train()
        assert not tower._bn0.training and not tower._blocks[14].training
        assert tower._blocks[15].training and tower._bn1.training and lite.text_tower.training
        frozen_before, last_before = stats(tower._blocks[14]._bn2), stats(tower._bn1)
        with torch.no_grad():
            lite.image_features(px)
        assert all(torch.equal(a, b) for a, b in zip(frozen_before, stats(tower._blocks[14]._bn2)))
        assert not torch.equal(last_before[0], tower._bn1.running_mean)
    finally:
        lite.zero_grad(set_to_none=True)
        lite.set_trainable("frozen", "frozen")
        lite.eval()
        # Undo the statistics update of the tuned part for the other tests.
        lite.image_tower.load_state_dict(
            {k: v for k, v in lite_mod.load_efficientnet_state().items() if not k.startswith("_fc.")}
        )


def test_lite_tuned_prefixes(lite):
    keys = list(lite.state_dict())

    def covered(prefixes):
        return {k for k in keys if k.startswith(tuple(prefixes))}

    try:
        lite.set_trainable("frozen", "frozen")
        assert lite.tuned_prefixes() == ["image_projection.", "text_projection."]
        lite.set_trainable("last", "frozen")
        last = covered(lite.tuned_prefixes())
        assert "image_tower._bn1.running_mean" in last and "image_tower._blocks.15._bn2.running_var" in last
        assert "image_tower._blocks.14._bn2.running_var" not in last
        assert not any(k.startswith("image_tower._blocks.1.") for k in last)
        assert not any(k.startswith("text_tower.") for k in last)
        lite.set_trainable("full", "tuned")
        assert covered(lite.tuned_prefixes()) == set(keys)
    finally:
        lite.set_trainable("frozen", "frozen")


def test_lite_heads_deterministic_from_seed(lite):
    again = load_backbone("lite", image_size=64, image_head="linear", seed=0)
    other = load_backbone("lite", image_size=64, image_head="linear", seed=1)
    third = load_backbone("lite", image_size=64, image_head="linear", seed=0)
    assert again.image_projection.weight.shape == (384, 1280)
    assert torch.equal(again.image_projection.weight, third.image_projection.weight)
    assert not torch.equal(again.image_projection.weight, other.image_projection.weight)
    rebuilt = load_backbone(**again.config())
    assert torch.equal(rebuilt.image_projection.weight, again.image_projection.weight)
    assert "_fc.weight" not in "".join(again.state_dict())


@pytest.mark.parametrize("constant", ["EFFICIENTNET_SHA256", "MINILM_SHA256"])
def test_lite_checksum_mismatch(monkeypatch, constant):
    monkeypatch.setattr(lite_mod, constant, "0" * 64)
    with pytest.raises(BackboneError) as err:
        load_backbone("lite", image_size=64)
    msg = str(err.value)
    assert "0" * 64 in msg  # the expected (pinned) hash
    true_hash = {"EFFICIENTNET_SHA256": "579344248a93e230", "MINILM_SHA256": "53aa51172d142c89"}[constant]
    assert true_hash in msg and "reinstall" in msg
    assert (".pth" if constant == "EFFICIENTNET_SHA256" else "model.safetensors") in msg


def test_lite_bad_options():
    with pytest.raises(BackboneError, match="mlp, linear"):
        load_backbone("lite", image_head="transformer")
    with pytest.raises(BackboneError, match=">= 32"):
        load_backbone("lite", image_size=8)


# ---------------------------------------------------------------------------- hf


def test_hf_clip_matches_transformers(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    b = load_backbone("hf:" + str(tiny_clip_dir))
    ref = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    assert b.spec == "hf:" + str(tiny_clip_dir)
    assert (b.embed_dim, b.image_feature_dim, b.text_feature_dim) == (16, 32, 32)
    assert (b.image_size, b.native_image_size) == (32, 32)
    assert b.logit_scale == pytest.approx(math.exp(ref.logit_scale.item()))
    assert b.logit_bias is None
    assert b.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    px = _images(32)
    texts = ["a photo of a cat", "a red car", "dog"]
    with torch.inference_mode():
        feats = b.image_features(px)
        assert feats.shape == (3, 32) and b.encode_image(px).shape == (3, 16)
        pixel_values = b.normalize(px)
        expected = ref.visual_projection(ref.vision_model(pixel_values=pixel_values).pooler_output)
        assert torch.allclose(b.encode_image(px), expected, atol=1e-5)
        own = ref.get_image_features(pixel_values=pixel_values)
        own = own if isinstance(own, torch.Tensor) else own.pooler_output
        assert torch.allclose(b.encode_image(px), own, atol=1e-5)

        tok = AutoTokenizer.from_pretrained(tiny_clip_dir)(texts, padding=True, return_tensors="pt")
        ref_text = ref.text_projection(ref.text_model(**tok).pooler_output)
        assert b.text_features(texts).shape == (3, 32)
        assert torch.allclose(F.normalize(b.encode_text(texts), dim=-1), F.normalize(ref_text, dim=-1), atol=1e-5)
    assert b.config() == {"spec": b.spec, "image_size": 32, "image_head": "pretrained", "seed": 0}


def test_hf_clip_trainable_modes(tiny_clip_dir):
    b = load_backbone("hf:" + str(tiny_clip_dir))
    last = [b.image_tower.encoder.layers[-1], b.image_tower.post_layernorm]
    n_last = sum(p.numel() for m in last for p in m.parameters())
    b.set_trainable("last", "frozen")
    groups = b.param_groups()
    assert sum(p.numel() for p in groups["image_tower"]) == n_last
    assert groups["text_tower"] == []
    assert {id(p) for p in groups["heads"]} == {id(b.image_projection.weight), id(b.text_projection.weight)}
    assert b.tuned_prefixes() == [
        "image_projection.", "text_projection.",
        "image_tower.encoder.layers.1.", "image_tower.post_layernorm.",
    ]
    b.train()
    assert b.image_tower.encoder.layers[1].training and not b.image_tower.encoder.layers[0].training
    assert not b.image_tower.embeddings.training and not b.text_tower.training
    b.set_trainable("full", "tuned")
    assert b.tuned_prefixes()[2:] == ["image_tower.", "text_tower."]
    assert len(b.param_groups()["text_tower"]) == len(list(b.text_tower.parameters()))


def test_hf_clip_other_image_size(tiny_clip_dir):
    b = load_backbone("hf:" + str(tiny_clip_dir), image_size=48)
    with torch.inference_mode():
        assert b.encode_image(_images(48)).shape == (3, 16)
    assert load_backbone(**b.config()).image_size == 48


def test_hf_siglip_matches_transformers(tiny_siglip_dir):
    from transformers import AutoTokenizer, SiglipModel

    b = load_backbone("hf:" + str(tiny_siglip_dir), image_head="mlp")  # lite option: ignored
    ref = SiglipModel.from_pretrained(tiny_siglip_dir).eval()
    assert (b.embed_dim, b.image_feature_dim, b.text_feature_dim) == (32, 32, 32)
    assert b.logit_scale == pytest.approx(math.exp(2.0))
    assert b.logit_bias == pytest.approx(-3.0)
    assert b.mean == (0.5, 0.5, 0.5) and b.std == (0.5, 0.5, 0.5)  # from preprocessor_config.json
    assert torch.equal(b.image_projection.weight, torch.eye(32))
    assert torch.equal(b.text_projection.weight, torch.eye(32))
    px = _images(32)
    texts = ["a photo of a cat", "a red car"]
    with torch.inference_mode():
        expected = ref.vision_model(pixel_values=b.normalize(px)).pooler_output
        assert torch.allclose(b.encode_image(px), expected, atol=1e-5)
        tok = AutoTokenizer.from_pretrained(tiny_siglip_dir)(
            texts, padding="max_length", max_length=16, return_tensors="pt"
        )
        ref_text = ref.text_model(input_ids=tok["input_ids"]).pooler_output
        assert torch.allclose(b.text_features(texts), ref_text, atol=1e-5)
        assert torch.allclose(b.encode_text(texts), F.normalize(ref_text, dim=-1), atol=1e-5)
    b.set_trainable("last", "frozen")
    assert "image_tower.head." in b.tuned_prefixes()


def test_hf_missing_dir_fails_without_the_network_or_a_download(tmp_path, monkeypatch):
    """A missing folder is refused before transformers is asked; offline (as in the tests) a
    hub name is looked up in the local cache only; nothing probes the hub or opens a socket."""
    import socket

    from mumic.backbones import hf as hf_mod

    attempts = []
    real_load_parts = hf_mod._load_parts

    def load_parts(name, source, *, local_only, quiet):
        attempts.append((name, local_only))
        return real_load_parts(name, source, local_only=local_only, quiet=quiet)

    def no_network(*args, **kwargs):
        attempts.append(("network", args))
        raise OSError("the test has no network")

    monkeypatch.setattr(hf_mod, "_load_parts", load_parts)
    monkeypatch.setattr(hf_mod, "_hub_unreachable", lambda timeout=5.0: pytest.fail("probed the hub"))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(BackboneError, match="could not load 'hf:.*no such directory.*save_pretrained"):
        load_backbone("hf:" + str(tmp_path / "no-such-model"))
    assert attempts == []  # refused before transformers is asked
    with pytest.raises(BackboneError, match="could not load 'hf:org/not-cached-model'"):
        load_backbone("hf:org/not-cached-model")
    assert attempts == [("org/not-cached-model", True)]  # the local cache only
    with pytest.raises(BackboneError, match="could not load 'hf:"):
        load_backbone("hf:" + str(tmp_path))  # exists, but holds no model
    assert attempts == [("org/not-cached-model", True), (str(tmp_path), True)]


def test_hf_unreachable_hub_fails_fast(monkeypatch):
    """Online mode, a name not in the cache and no network: one probe, then our error."""
    from mumic.backbones import hf as hf_mod

    monkeypatch.setattr(hf_mod, "_offline", lambda: False)
    monkeypatch.setattr(hf_mod, "_hub_unreachable", lambda timeout=5.0: "no route to host")
    with pytest.raises(BackboneError, match="not in the local cache.*unreachable.*no route to host"):
        load_backbone("hf:org/not-cached-model")


def test_hf_unsupported_model_type(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(BackboneError, match="'bert'.*clip, siglip"):
        load_backbone("hf:" + str(tmp_path))


def test_hf_rejects_unknown_image_head(tiny_clip_dir):
    with pytest.raises(BackboneError, match="pretrained"):
        load_backbone("hf:" + str(tiny_clip_dir), image_head="resnet")


@pytest.mark.parametrize("spec", ["clip", "", "hf", "lite:big", "HF:x", 3])
def test_unknown_spec(spec):
    with pytest.raises(BackboneError, match="'lite', or 'hf:"):
        load_backbone(spec)


def test_empty_hf_name():
    with pytest.raises(BackboneError, match="needs a model name"):
        load_backbone("hf:")
