"""`hf:<name or dir>`: a transformers CLIPModel or SiglipModel, from a local folder or the hub.

CLIP: image_features = vision_model pooler_output (post-layernorm CLS token),
image_head = visual_projection; text_features = text_model pooler_output (EOS token),
text_head = text_projection. Both heads are the pretrained projections.

SigLIP: the projections sit inside the towers (the vision attention-pooling head, the text
`head` Linear), so image_features / text_features are the towers' pooler outputs, already in
the joint space. To give MuMIC a trainable P_img and P_txt, both heads are Linear(D, D)
initialised at the identity; at initialisation the embeddings equal SigLIP's own.

The image processor config only supplies mean/std; images arrive as uint8 tensors from
mumic's own pipeline, so no image processor runs here.

A model folder or hub repository is data, never code: every transformers call passes
``trust_remote_code=False`` (so transformers never asks on the terminal whether to run a
repository's code), a config or tokenizer config that names custom code (``auto_map``) or
a model type other than CLIP / SigLIP is refused before anything is built, and weights are
read from safetensors files only (``use_safetensors=True``: no pickled ``.bin``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mumic.backbones.base import Backbone, identity_linear, quiet_local_loading
from mumic.errors import BackboneError

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("clip", "siglip")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: "pretrained" is the only head; "mlp"/"linear" (the lite choices) are accepted and ignored.
IMAGE_HEADS = ("pretrained", "mlp", "linear")


def _offline() -> bool:
    """True when the user switched the hub client off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _load_error(name: str, exc: BaseException) -> BackboneError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return BackboneError(
        f"could not load 'hf:{name}': {reason}; give a local directory saved with "
        f"save_pretrained, or check the name and network"
    )


def _custom_code(data: Any) -> str | None:
    """What in a parsed config.json / tokenizer_config.json asks for code from the model
    repository (its ``auto_map``), or None."""
    if isinstance(data, dict) and data.get("auto_map"):
        return f"auto_map {json.dumps(data['auto_map'], default=str)[:120]}"
    return None


def _check_local_folder(name: str, source: str) -> None:
    """Refuse a local model folder that names custom code or an unsupported model type, or
    holds pickled weights only, before transformers reads it."""
    folder = Path(source)
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    if pickled and not any(folder.glob("*.safetensors")):
        raise BackboneError(
            f"'hf:{name}': the folder holds pickled weights only ({', '.join(pickled[:3])}); mumic loads "
            f"safetensors only — re-save the model with save_pretrained (it writes model.safetensors)"
        )
    for fname in ("config.json", "tokenizer_config.json"):
        path = folder / fname
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise BackboneError(f"'hf:{name}': {path} is not readable JSON ({exc}); re-save the model with save_pretrained") from None
        custom = _custom_code(data)
        if custom:
            raise BackboneError(
                f"'hf:{name}': {path} asks for code from the model folder ({custom}); mumic never runs "
                f"model code — use a standard CLIPModel or SiglipModel checkpoint"
            )
        if fname == "config.json" and isinstance(data, dict) and data.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise BackboneError(
                f"'hf:{name}': {path} has model_type {data.get('model_type')!r}; supported model types: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )


def _read_preprocessor(source: str, local: bool, local_only: bool) -> dict[str, Any]:
    """The saved image processor settings as a dict, or {} when there are none."""
    try:
        if local:
            path = Path(source) / "preprocessor_config.json"
            if not path.is_file():
                return {}
        else:
            from transformers.utils import cached_file

            found = cached_file(
                source,
                "preprocessor_config.json",
                local_files_only=local_only,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
            if found is None:
                return {}
            path = Path(found)
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("could not read preprocessor_config.json of %s (%s); using CLIP mean/std", source, exc)
        return {}


def _triple(value: Any, default: tuple[float, float, float]) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return tuple(float(v) for v in value)  # type: ignore[return-value]
    return default


def _hub_unreachable(timeout: float = 5.0) -> str | None:
    """None if the configured model hub answers one request, else the reason it does not.

    One request without retries, so an offline machine fails in seconds instead of waiting
    through the hub client's retry back-off.
    """
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as exc:  # any transport failure means "unreachable"
        return str(exc) or type(exc).__name__
    return None


def _load_parts(name: str, source: str, *, local_only: bool, quiet: bool) -> tuple[Any, Any, Any]:
    """(config, CLIPModel | SiglipModel, tokenizer) for `source`, or a BackboneError."""
    from transformers import AutoConfig, AutoTokenizer, CLIPModel, SiglipModel

    if os.path.isdir(source):
        _check_local_folder(name, source)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_only, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, exc) from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise BackboneError(
            f"'hf:{name}' is a {model_type!r} model; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    custom = _custom_code({"auto_map": getattr(config, "auto_map", None)})
    if custom:
        raise BackboneError(
            f"'hf:{name}': its config asks for code from the model repository ({custom}); mumic never runs "
            f"model code — use a standard CLIPModel or SiglipModel checkpoint"
        )
    model_cls = CLIPModel if model_type == "clip" else SiglipModel
    try:
        with quiet_local_loading(quiet):
            model = model_cls.from_pretrained(
                source, config=config, local_files_only=local_only, dtype=torch.float32,
                trust_remote_code=False, use_safetensors=True,
            )
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only, trust_remote_code=False)
    except ImportError as exc:
        raise BackboneError(f"could not load 'hf:{name}': {exc}; install the missing package") from exc
    except (OSError, ValueError) as exc:
        raise _load_error(name, exc) from exc
    return config, model, tokenizer


class HFBackbone(Backbone):
    """A transformers CLIPModel / SiglipModel behind the Backbone interface.

    embed_dim is CLIP's projection_dim, or SigLIP's vision hidden size. image_size defaults to
    the vision config's; another size interpolates the position embeddings.
    image_tower="last" trains the last vision encoder layer and the post layernorm (plus, for
    SigLIP, the attention-pooling head).

    A hub name already in the local cache loads from the cache without any network request;
    otherwise one quick request checks that the hub is reachable before downloading.
    """

    # transformers' CLIP / SigLIP vision transformer: its parts are read by name
    image_tower: Any

    def __init__(self, name: str, *, image_size: int | None = None, image_head: str | None = None, seed: int = 0) -> None:
        if not name:
            raise BackboneError("'hf:' needs a model name or a local directory, e.g. hf:openai/clip-vit-base-patch32")
        if image_head is not None and image_head not in IMAGE_HEADS:
            raise BackboneError(
                f"'hf:' backbones use their pretrained projections; image_head must be None or "
                f"'pretrained', got {image_head!r}"
            )
        if image_head in ("mlp", "linear"):
            logger.debug("image_head=%r applies to 'lite' only; 'hf:' uses its pretrained projection", image_head)
        source = os.path.expanduser(name)
        local = os.path.isdir(source)
        if not local and _looks_like_path(name):
            raise BackboneError(
                f"could not load 'hf:{name}': no such directory; give a local directory saved "
                f"with save_pretrained, or check the name and network"
            )
        local_only = True
        if local or _offline():
            config, model, tokenizer = _load_parts(name, source, local_only=True, quiet=local)
        else:
            try:  # a model already in the local cache loads without touching the network
                config, model, tokenizer = _load_parts(name, source, local_only=True, quiet=False)
            except BackboneError:
                unreachable = _hub_unreachable()
                if unreachable:
                    raise BackboneError(
                        f"could not load 'hf:{name}': it is not in the local cache and the model hub "
                        f"is unreachable ({unreachable}); give a local directory saved with "
                        f"save_pretrained, or check the name and network"
                    ) from None
                local_only = False
                config, model, tokenizer = _load_parts(name, source, local_only=False, quiet=False)
        model_type = config.model_type

        vision_cfg, text_cfg = config.vision_config, config.text_config
        native = int(vision_cfg.image_size)
        image_size = native if image_size is None else image_size
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < vision_cfg.patch_size:
            raise BackboneError(f"'hf:{name}' image_size must be an integer >= {vision_cfg.patch_size}, got {image_size!r}")
        pre = _read_preprocessor(source, local, local_only)
        mean = _triple(pre.get("image_mean"), CLIP_MEAN)
        std = _triple(pre.get("image_std"), CLIP_STD)

        if model_type == "clip":
            embed_dim = int(config.projection_dim)
            image_dim, text_dim = int(vision_cfg.hidden_size), int(text_cfg.hidden_size)
            logit_bias = None
        else:
            if not getattr(vision_cfg, "vision_use_head", True):
                raise BackboneError(f"'hf:{name}': SigLIP without a vision pooling head is not supported")
            embed_dim = int(vision_cfg.hidden_size)
            image_dim = embed_dim
            text_dim = int(getattr(text_cfg, "projection_size", None) or text_cfg.hidden_size)
            if text_dim != embed_dim:
                raise BackboneError(
                    f"'hf:{name}': text projection size {text_dim} differs from the image embedding "
                    f"size {embed_dim}"
                )
            logit_bias = float(model.logit_bias.detach().float().reshape(-1)[0].item())
        logit_scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0].item())

        super().__init__(
            spec=f"hf:{name}",
            embed_dim=embed_dim,
            image_size=image_size,
            native_image_size=native,
            mean=mean,
            std=std,
            image_feature_dim=image_dim,
            text_feature_dim=text_dim,
            logit_scale=logit_scale,
            logit_bias=logit_bias,
        )
        self.name = name
        self.model_type = model_type
        self.seed = int(seed)
        self.tokenizer = tokenizer
        self.text_max_length = int(text_cfg.max_position_embeddings)
        self.image_tower = model.vision_model
        self.text_tower = model.text_model
        if model_type == "clip":
            self.image_projection = model.visual_projection
            self.text_projection = model.text_projection
        else:
            # Identity init needs no randomness; the seed is kept for config() symmetry.
            self.image_projection = identity_linear(embed_dim)
            self.text_projection = identity_linear(embed_dim)
        del model  # the towers and projections are held directly; logit scale/bias read above
        self._finish_init()
        logger.info("loaded backbone 'hf:%s' (%s) at %d px", name, model_type, image_size)

    def _image_tower_last(self) -> list[nn.Module]:
        tower = self.image_tower
        parts: list[nn.Module] = [tower.encoder.layers[-1], tower.post_layernorm]
        if self.model_type == "siglip":
            parts.append(tower.head)
        return parts

    def image_features(self, pixels: Tensor) -> Tensor:
        """The vision tower's pooler_output: CLIP's CLS token, SigLIP's attention pool."""
        x = self.normalize(pixels.to(self.device))
        out = self.image_tower(
            pixel_values=x, interpolate_pos_encoding=self.image_size != self.native_image_size
        )
        return out.pooler_output

    def text_features(self, texts: list[str]) -> Tensor:
        """The text tower's pooler_output (CLIP: EOS token; SigLIP: last token through its head).

        SigLIP was trained on text padded to its full length and without an attention mask,
        so it is tokenised with padding="max_length" and run without the mask.
        """
        texts = self._check_texts(texts)
        if not texts:
            return torch.zeros(0, self.text_feature_dim, device=self.device)
        if self.model_type == "siglip":
            enc = self.tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.text_max_length,
                return_tensors="pt",
            )
            out = self.text_tower(input_ids=enc["input_ids"].to(self.device))
        else:
            enc = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.text_max_length, return_tensors="pt"
            )
            out = self.text_tower(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
            )
        return out.pooler_output

    def config(self) -> dict[str, Any]:
        return {"spec": self.spec, "image_size": self.image_size, "image_head": "pretrained", "seed": self.seed}
