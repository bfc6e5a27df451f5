"""Shared fixtures: tiny CLIP / SigLIP models saved to disk, loadable offline."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# Tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests never write to the user's feature cache.
os.environ["MUMIC_CACHE"] = tempfile.mkdtemp(prefix="mumic-test-cache-")

TINY_WORDS = (
    "a photo picture of the an cat kitten dog puppy red blue green car tree house "
    "spreadsheet tax numbers emoji smiling face"
).split()
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
TINY_IMAGE_SIZE = 32
TINY_TEXT_LENGTH = 16
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _tiny_tokenizer():
    """A lower-casing word-level tokenizer over TINY_WORDS: <bos> words <eos>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, UNK, BOS, EOS, *TINY_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=TINY_TEXT_LENGTH,
    )
    return fast, len(vocab)


def _tiny_configs(vocab_size: int) -> tuple[dict, dict]:
    text = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TINY_TEXT_LENGTH,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=TINY_IMAGE_SIZE, patch_size=8,
    )
    return text, vision


def _write_preprocessor(folder: Path, mean: list[float], std: list[float]) -> None:
    """preprocessor_config.json as CLIPImageProcessor saves it (written directly: the
    processor class itself would want an image backend the tests do not need)."""
    cfg = {
        "image_processor_type": "CLIPImageProcessor",
        "crop_size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        "size": {"shortest_edge": TINY_IMAGE_SIZE},
        "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
        "do_rescale": True, "do_resize": True, "resample": 3,
        "rescale_factor": 1 / 255, "image_mean": mean, "image_std": std,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPModel (seed 0) saved with tokenizer and preprocessor config."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny_clip")
    tokenizer, vocab_size = _tiny_tokenizer()
    text, vision = _tiny_configs(vocab_size)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_preprocessor(folder, CLIP_MEAN, CLIP_STD)
    return folder


@pytest.fixture(scope="session")
def tiny_siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SiglipModel (seed 0) saved with tokenizer and preprocessor config."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    folder = tmp_path_factory.mktemp("tiny_siglip")
    tokenizer, vocab_size = _tiny_tokenizer()
    text, vision = _tiny_configs(vocab_size)
    text["projection_size"] = vision["hidden_size"]
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():  # distinct, recognisable values instead of the 0-init
        model.logit_scale.fill_(2.0)
        model.logit_bias.fill_(-3.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _write_preprocessor(folder, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # as SigLIP's own
    return folder


@pytest.fixture(scope="session")
def page_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small Shapes set (images/, manifest.csv, labels.yaml) for the served page."""
    from mumic.data.synthetic import make_shapes

    return make_shapes(tmp_path_factory.mktemp("page_shapes"), n=40, size=48, seed=5).parent


@pytest.fixture(scope="session")
def page_run(page_shapes: Path, tmp_path_factory: pytest.TempPathFactory, tiny_clip_dir: Path) -> Path:
    """A tiny trained run (a few steps of the tiny CLIP) over page_shapes."""
    from mumic.config import load_config
    from mumic.train import fit

    tmp = tmp_path_factory.mktemp("page_run")
    cfg = load_config(overrides={
        "manifest": str(page_shapes / "manifest.csv"), "labels_file": str(page_shapes / "labels.yaml"), "out": str(tmp / "run"),
        "cache_dir": str(tmp / "cache"), "backbone": f"hf:{tiny_clip_dir}", "batch_size": 16, "eval_every": 2, "max_steps": 4,
        "warmup_steps": 1, "patience": 100, "majority_n": 3,
    })
    return fit(cfg, progress=False)


@pytest.fixture(scope="session")
def page_index(page_run: Path, page_shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An index of every page_shapes image, built with page_run (mumic.search)."""
    from mumic.search import build_index

    return build_index(page_run, page_shapes / "manifest.csv", tmp_path_factory.mktemp("page_index") / "index",
                       progress=False, device="cpu")
