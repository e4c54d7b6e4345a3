"""``hf:<repo id or local dir>``: Hugging Face transformers DINOv2 (with or without registers).

transformers is the optional extra ``hf`` and is imported only here. The token sequence of these models is
``[CLS, registers..., patches]``, so patch tokens are ``[:, 1 + num_register_tokens:]`` (transformers' own
``Dinov2Backbone`` drops only index 0, which is wrong for register models). ``hidden_states`` are the block
outputs *before* the final layernorm, so ``norm=True`` applies ``model.layernorm`` explicitly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ModelError
from .base import DenseEncoder, resolve_layer
from .convert import fingerprint_state_dict
from .weights import offline

SUPPORTED_TYPES = ("dinov2", "dinov2_with_registers")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ModelError("hf: models need the optional dependency transformers, which is not installed",
                         hint='pip install "densebench[hf]"  (or pip install "transformers>=4.47")') from e
    return transformers


class HFEncoder(DenseEncoder):
    """A transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``."""

    def __init__(self, model: torch.nn.Module, *, name: str, layer: int = -1, norm: bool = True,
                 source: str | None = None):
        super().__init__(layer=layer, norm=norm)
        cfg = model.config
        if cfg.model_type not in SUPPORTED_TYPES:
            raise ModelError(f"{name} is a transformers {cfg.model_type!r} model; "
                             f"hf: supports {', '.join(SUPPORTED_TYPES)}",
                             hint="wrap other models in a plugin (pkg.module:factory)")
        self.model = model.eval()
        ps = cfg.patch_size
        self.patch_size = int(ps if isinstance(ps, int) else ps[0])
        self.embed_dim = int(cfg.hidden_size)
        self.depth = int(cfg.num_hidden_layers)
        self.num_register_tokens = int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.num_prefix_tokens = 1 + self.num_register_tokens
        self.name = name
        self.native_size = int(cfg.image_size) if isinstance(cfg.image_size, int) else None
        self.source = source
        self.fingerprint = fingerprint_state_dict(model.state_dict(), arch=f"hf:{cfg.model_type}",
                                                  config={"layer_norm_eps": cfg.layer_norm_eps,
                                                          "num_attention_heads": cfg.num_attention_heads})
        self.check_layer(layer)

    def check_layer(self, layer: int) -> int:
        return resolve_layer(layer, self.depth, self.name)

    def _features(self, images: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
        idx = self.check_layer(layer)
        if idx == self.depth - 1 and norm:
            tokens = self.model(pixel_values=images).last_hidden_state
        else:
            hidden = self.model(pixel_values=images, output_hidden_states=True).hidden_states
            tokens = hidden[idx + 1]                      # hidden_states[0] is the embedding output
            if norm:
                tokens = self.model.layernorm(tokens)
        b, _, h, w = images.shape
        tokens = tokens[:, self.num_prefix_tokens:]
        return tokens.reshape(b, h // self.patch_size, w // self.patch_size, tokens.shape[-1])

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update({"loader": "hf", "arch": self.model.config.model_type, "depth": self.depth,
                  "num_prefix_tokens": self.num_prefix_tokens, "num_register_tokens": self.num_register_tokens,
                  "pos_interp": "hf-bicubic-size", "weights_source": self.source})
        return d


def load_hf(repo: str, *, name: str, layer: int, norm: bool) -> HFEncoder:
    """Load ``repo`` (a hub id or a local ``save_pretrained`` directory) with ``AutoModel``.

    Offline (``DENSEBENCH_OFFLINE``/``HF_HUB_OFFLINE``) only the local HF cache is consulted.
    """
    tf = _transformers()
    local_only = offline()
    try:
        model = tf.AutoModel.from_pretrained(repo, local_files_only=local_only)
    except (OSError, ValueError) as e:
        where = "in the Hugging Face cache" if local_only else "locally or on the hub"
        raise ModelError(f"transformers model {repo!r} could not be loaded {where} ({str(e).splitlines()[0]})",
                         hint=f"run `huggingface-cli download {repo}` while online (it lands in the HF cache, "
                              "$HF_HOME/hub), or pass a local directory: --model hf:/path/to/model") from e
    return HFEncoder(model, name=name, layer=layer, norm=norm, source=repo)
