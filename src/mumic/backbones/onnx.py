"""onnxruntime as the CPU inference engine of a backbone's towers.

On a CPU, onnxruntime runs the `lite` EfficientNet tower about 3x faster than eager
PyTorch (fused convolutions, no Python per layer). The tower's graph (uint8 pixels ->
features, normalisation inside) is exported once per tower and kept in the mumic cache.
`lite`'s frozen MiniLM text tower runs the same way, tokenised by the `tokenizers`
library, so that a text query imports neither transformers nor the BERT stack once its
graph is cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mumic.config import default_cache_dir
from mumic.errors import ConfigError, ExportError, MumicError
from mumic.io import atomic_path, atomic_write_text, file_sha256
from mumic.readers import read_text

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17


def onnx_export(module: Any, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                dynamic: dict[str, dict[int, str]], opset: int) -> None:
    import torch

    with warnings.catch_warnings():
        # the TorchScript-based exporter warns about its own deprecation and about traced
        # Python conditionals that are constant for a given model
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_axes=dynamic, do_constant_folding=True,
            )
        except Exception as e:
            raise ExportError(f"ONNX export of {path.name} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e


ENGINES = ("auto", "torch", "onnxruntime")


def resolve_engine(engine: str, device: Any) -> str:
    """'torch' or 'onnxruntime' for a model on ``device``: auto is onnxruntime on the CPU
    (the lite tower runs about 3x faster there than in eager PyTorch) and torch on GPUs."""
    import torch

    if engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    cpu = torch.device(device).type == "cpu"
    if engine == "onnxruntime" and not cpu:
        raise ConfigError(f"engine 'onnxruntime' runs the image tower on the CPU, but the model is on {device}; use engine torch")
    if engine == "auto":
        return "onnxruntime" if cpu else "torch"
    return engine


def image_tower_key(backbone: Any) -> str:
    """A key for f_img's exact function: backbone config, resolution, every weight of the
    image tower, and the torch and onnxruntime versions that build and run its graph."""
    import onnxruntime
    import torch

    h = hashlib.blake2b(digest_size=12)
    cfg = {k: v for k, v in backbone.config().items() if k not in ("seed", "image_head")}
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(f"{backbone.image_size}|{torch.__version__}|{onnxruntime.__version__}|{DEFAULT_OPSET}".encode())
    for name, t in sorted(backbone.image_tower.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: onnxruntime session settings that turn off the thread pools' spinning when idle
SPIN_OFF = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = int(threads or torch.get_num_threads())
    opts.inter_op_num_threads = 1
    # no busy-waiting between runs: a spinning pool burns a core while idle, which a
    # service's event loop (and every other process on a small CPU) then lacks
    for key in SPIN_OFF:
        opts.add_session_config_entry(key, "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _record(path: Path) -> Path:
    """The file beside a cached graph that holds the sha256 of its bytes."""
    return path.with_name(path.name + ".sha256")


def cached_session(path: Path, export: Callable[[Path], None], threads: int | None, what: str) -> Any:
    """An onnxruntime session of the cached graph at ``path``, exported first by
    ``export(tmp_path)`` when it is missing, when its bytes differ from the sha256 recorded
    at export (a truncated or corrupted file), or when onnxruntime cannot load it; a graph
    cached before digests were recorded is trusted once it loads, and its digest recorded."""
    record = _record(path)
    if path.is_file():
        try:
            expected = read_text(record).strip() if record.is_file() else None
        except MumicError:  # an unreadable record is as good as none
            expected = None
        if expected is None or file_sha256(path) == expected:
            try:
                session = _session(path, threads)
            except Exception as e:  # onnxruntime raises InvalidProtobuf, Fail, ... (its own types)
                problem = f"onnxruntime cannot load it ({str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__})"
            else:
                if expected is None:
                    with contextlib.suppress(OSError):  # a read-only cache: checked again next time
                        atomic_write_text(record, file_sha256(path) + "\n")
                return session
        else:
            problem = "not the file that was exported (its sha256 differs: truncated or corrupted)"
        log.warning("the cached %s graph %s is %s; exporting it again", what, path, problem)
    with atomic_path(path) as tmp:
        export(tmp)
        digest = file_sha256(tmp)
    atomic_write_text(record, digest + "\n")
    log.info("exported the %s for onnxruntime to %s", what, path)
    return _session(path, threads)


class OnnxImageTower:
    """f_img (uint8 pixels [N, 3, S, S] -> float32 features) run by onnxruntime on the CPU.

    The graph is exported once per image tower (same weights, resolution and versions) and
    kept in the mumic cache (``MUMIC_CACHE``, default ``~/.cache/mumic``) under ``onnx/``;
    later calls load it. Outputs match PyTorch to about 1e-5."""

    def __init__(self, backbone: Any, cache_dir: str | Path | None = None, threads: int | None = None) -> None:
        import torch
        from torch import nn

        self.image_size = backbone.image_size
        path = Path(cache_dir or default_cache_dir()) / "onnx" / f"image-tower-{image_tower_key(backbone)}.onnx"

        class Tower(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.backbone = backbone

            def forward(self, pixels: torch.Tensor) -> torch.Tensor:
                return self.backbone.image_features(pixels)

        def export(tmp: Path) -> None:
            example = torch.zeros((2, 3, self.image_size, self.image_size), dtype=torch.uint8)
            was_training = backbone.training
            backbone.eval()
            try:
                with torch.no_grad():
                    dynamic = {"pixels": {0: "batch"}, "features": {0: "batch"}}
                    onnx_export(Tower().eval(), (example,), tmp, ["pixels"], ["features"], dynamic, DEFAULT_OPSET)
            finally:
                backbone.train(was_training)

        self.path = path
        self.session = cached_session(path, export, threads, "image tower")

    def __call__(self, pixels: Any) -> Any:
        import numpy as np
        import torch

        if pixels.dtype != torch.uint8 or pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"expected uint8 pixels [N, 3, {self.image_size}, {self.image_size}], got {pixels.dtype} {list(pixels.shape)}")
        x = np.ascontiguousarray(pixels.detach().cpu().numpy())
        return torch.from_numpy(self.session.run(None, {"pixels": x})[0])


class OnnxMiniLM:
    """`lite`'s frozen text tower (MiniLM-L6, mean-pooled over real tokens) run by
    onnxruntime, tokenised by `tokenizers` exactly as transformers' fast tokenizer does
    (lower-cased WordPiece, [CLS] ... [SEP], truncated to `max_length`, padded to the
    longest text). The graph is exported once per pinned MiniLM and torch/onnxruntime
    versions (building the tower with transformers that one time) and cached like the
    image tower's. Outputs match PyTorch to about 1e-5."""

    def __init__(self, folder: str | Path, weights_sha256: str, max_length: int, build: Any,
                 cache_dir: str | Path | None = None, threads: int | None = None) -> None:
        import onnxruntime
        import torch
        from tokenizers import Tokenizer

        self.max_length = int(max_length)
        self.tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id("[PAD]") or 0, pad_token="[PAD]")
        key = hashlib.blake2b(f"{weights_sha256}|{self.max_length}|{torch.__version__}|{onnxruntime.__version__}|{DEFAULT_OPSET}".encode(),
                              digest_size=12).hexdigest()
        path = Path(cache_dir or default_cache_dir()) / "onnx" / f"text-tower-minilm-{key}.onnx"
        self.path = path
        self.session = cached_session(path, lambda tmp: self._export(build(), tmp), threads, "MiniLM text tower")

    @staticmethod
    def _export(tower: Any, tmp: Path) -> None:
        import torch
        from torch import nn

        class Pooled(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.tower = tower

            def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
                hidden = self.tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)

        ids = torch.ones((2, 8), dtype=torch.long)
        with torch.no_grad():
            onnx_export(Pooled().eval(), (ids, torch.ones_like(ids)), tmp, ["input_ids", "attention_mask"], ["features"],
                        {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "features": {0: "batch"}},
                        DEFAULT_OPSET)

    def __call__(self, texts: list[str]) -> Any:
        import numpy as np
        import torch

        enc = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return torch.from_numpy(self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0])
