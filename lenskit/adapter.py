"""The one adapter lenses read a model through, keyed by its architecture.

:class:`ModelAdapter` is the only place that knows how a model family reads a
residual out: its final norm, its unembedding (with bias where it has one), its
post-unembedding transform, and which residual rows it has (:class:`Row`: block
inputs, the stream between attention and MLP where the family has one, the output).
Architectures outside :data:`ARCHITECTURES` are refused in one line rather than
read with guessed conventions. Loading lives in :mod:`lenskit.models`, which
re-exports these names.

Example:
    >>> from lenskit.adapter import ModelAdapter
    >>> from lenskit.models import load_model
    >>> adapter = ModelAdapter(load_model("tiny-gpt2"))
    >>> [row.label for row in adapter.rows(("resid_pre", "resid_mid"))][:3]
    ['L0', 'L0.mid', 'L1']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from lenskit.errors import LenskitError

__all__ = ["ARCHITECTURES", "SUBLAYER_POINTS", "ArchitectureSpec", "ModelAdapter", "Row"]


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one model family reads its residual stream out.

    Attributes:
        family: A short family name for messages.
        norm: ``"rms"`` or ``"layernorm"``: the kind of final norm.
        unembed_bias: Whether the unembedding carries a bias.

    Whether attention and MLP run in sequence (with a ``resid_mid`` stream between
    them) or in parallel is read from each model's config (GPT-NeoX has both kinds).
    """

    family: str
    norm: str
    unembed_bias: bool


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "LlamaForCausalLM": ArchitectureSpec("llama", "rms", False),
    "MistralForCausalLM": ArchitectureSpec("mistral", "rms", False),
    "Qwen2ForCausalLM": ArchitectureSpec("qwen2", "rms", False),
    "Qwen3ForCausalLM": ArchitectureSpec("qwen3", "rms", False),
    "GemmaForCausalLM": ArchitectureSpec("gemma", "rms", False),
    "Gemma2ForCausalLM": ArchitectureSpec("gemma2", "rms", False),
    "GPT2LMHeadModel": ArchitectureSpec("gpt2", "layernorm", False),
    "GPTNeoXForCausalLM": ArchitectureSpec("gpt-neox", "layernorm", False),
    "OPTForCausalLM": ArchitectureSpec("opt", "layernorm", False),
    "PhiForCausalLM": ArchitectureSpec("phi", "layernorm", True),
}
_NORM_TYPES = {"rms": ("RMS", "RMSPre"), "layernorm": ("LN", "LNPre")}
SUBLAYER_POINTS = ("resid_pre", "resid_mid")
"""Residual points a lens row can sit at inside the blocks, in stream order."""


@dataclass(frozen=True)
class Row:
    """One place in the residual stream that a lens reads.

    Attributes:
        layer: The block index (``n_layers`` for the model's final residual).
        point: ``"resid_pre"`` (the block's input), ``"resid_mid"`` (between its
            attention and MLP) or ``"resid_post"`` (the final residual).
        label: ``L12``, ``L12.mid`` or ``output``.
        hook: The TransformerLens hook name that holds it.
    """

    layer: int
    point: str
    label: str
    hook: str


class ModelAdapter:
    """Final norm, unembedding and layer layout of one model, keyed by its architecture.

    Lens rows are numbered ``0..n_layers``: row ``i < n_layers`` is the input of
    block ``i`` and row ``n_layers`` is the model's final residual (the output of
    the last block), which the model itself reads out.

    Args:
        model: A ``TransformerBridge``.
    """

    def __init__(self, model: Any) -> None:
        cfg = model.cfg
        self.model = model
        self.architecture = str(getattr(cfg, "architecture", None) or type(model).__name__)
        if self.architecture not in ARCHITECTURES:
            families = ", ".join(spec.family for spec in ARCHITECTURES.values())
            raise LenskitError(
                f"lenskit does not support {self.architecture} models yet (supported: "
                f"{families}): use a model of a supported family"
            )
        self.spec = ARCHITECTURES[self.architecture]
        norm_type = getattr(cfg, "normalization_type", None)
        if norm_type is not None and norm_type not in _NORM_TYPES[self.spec.norm]:
            raise LenskitError(
                f"{self.architecture} declares normalization_type={norm_type!r}, not the "
                f"{self.spec.norm} norm lenskit expects for it: "
                "fix ARCHITECTURES in lenskit.adapter"
            )
        self.name: str = getattr(model, "lenskit_name", None) or str(cfg.model_name)
        self.n_layers: int = int(cfg.n_layers)
        self.d_model: int = int(cfg.d_model)
        self.d_vocab: int = int(model.W_U.shape[1])
        self.n_ctx: int = int(cfg.n_ctx)

    @property
    def has_mid(self) -> bool:
        """Whether blocks run attention then MLP, with a ``resid_mid`` stream between them."""
        if getattr(self.model.cfg, "parallel_attn_mlp", False):
            return False
        return "blocks.0.hook_resid_mid" in self.model.hook_dict

    def rows(self, points: tuple[str, ...] | list[str] = ("resid_pre",)) -> list[Row]:
        """Lens rows in stream order: per block its ``points``, then the final residual.

        Args:
            points: Points inside each block, from :data:`SUBLAYER_POINTS`.

        Raises:
            LenskitError: For an unknown point, or ``resid_mid`` on a family whose
                attention and MLP read the same input (no stream between them).
        """
        wanted = list(dict.fromkeys(points))
        unknown = [p for p in wanted if p not in SUBLAYER_POINTS]
        if unknown or not wanted:
            raise LenskitError(
                f"unknown row point {(unknown or ['(none)'])[0]!r}: use "
                f"{' and/or '.join(SUBLAYER_POINTS)}"
            )
        if "resid_mid" in wanted and not self.has_mid:
            raise LenskitError(
                f"{self.name} ({self.spec.family}) runs attention and MLP in parallel, so "
                "it has no resid_mid stream between them: read block inputs (resid_pre) only"
            )
        ordered = [p for p in SUBLAYER_POINTS if p in wanted]
        out = [
            Row(i, p, f"L{i}" if p == "resid_pre" else f"L{i}.mid", f"blocks.{i}.hook_{p}")
            for i in range(self.n_layers)
            for p in ordered
        ]
        final = f"blocks.{self.n_layers - 1}.hook_resid_post"
        return [*out, Row(self.n_layers, "resid_post", "output", final)]

    @property
    def n_rows(self) -> int:
        """Number of lens rows: one per block input plus the final residual."""
        return self.n_layers + 1

    def row_label(self, row: int) -> str:
        """Human label of lens row ``row``."""
        return "output" if row == self.n_layers else f"L{row}"

    def check_row(self, row: int) -> int:
        """Return ``row`` if it is a valid lens row, else raise a one-line error."""
        if not 0 <= int(row) <= self.n_layers:
            raise LenskitError(
                f"layer {row} is out of range for {self.name}: use 0..{self.n_layers} "
                f"({self.n_layers} is the final residual)"
            )
        return int(row)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """The unembedding matrix."""
        return self.model.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        """The unembedding bias (zeros where the model has none)."""
        return self.model.b_U

    def final_norm(self, h: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_model"]:
        """Apply the model's own final norm, with statistics recomputed for ``h``."""
        lead = h.shape[:-1]
        flat = h.reshape(1, -1, self.d_model)  # the norm module contracts on [batch, pos, d]
        return self.model.ln_final(flat).reshape(*lead, self.d_model)

    def unembed(self, x: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
        """Unembed normalised residuals: ``x @ W_U + b_U`` and the model's output transform."""
        flat = x.reshape(-1, self.d_model)
        logits = torch.addmm(self.b_U, flat, self.W_U)  # the bias added inside the matmul
        return self.model.adapter.apply_output_logits_transform(
            logits.reshape(*x.shape[:-1], logits.shape[-1])
        )

    def readout(self, h: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch d_vocab"]:
        """Read residuals through the final norm and unembedding, exactly as the model does.

        The same modules and weights as TransformerLens's ``logit_readout`` (the real
        ``ln_final``, ``W_U``, ``b_U`` and output transform), called directly: one
        matmul over all rows is about 2x faster here than ``logit_readout``, which
        also computes a softmax and entropy for every chunk and walks the module
        tree on every call (``benchmarks/bench_trajectory.py``).
        """
        return self.unembed(self.final_norm(h))

    @property
    def norm_eps(self) -> float:
        """The final norm's epsilon (inside the square root)."""
        module = getattr(self.model.ln_final, "original_component", None)
        for name in ("eps", "variance_epsilon"):
            value = getattr(module, name, None)
            if isinstance(value, int | float):
                return float(value)
        return float(getattr(self.model.cfg, "eps", 1e-5))

    def norm_scale(self, h: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch 1"]:
        """The final norm's divisor: ``sqrt(mean(x^2) + eps)``, ``x = h`` centred for LayerNorm."""
        x = h.float()
        if self.spec.norm == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + self.norm_eps).sqrt()

    def frozen_norm(
        self, x: Float[Tensor, "*batch d_model"], scale: Float[Tensor, "*#batch 1"]
    ) -> Float[Tensor, "*batch d_model"]:
        """The final norm's linear part with its divisor frozen at ``scale``: ``g * x / scale``.

        ``x`` is centred first for LayerNorm; the norm's bias is left out. With ``scale =
        norm_scale(h)`` this is exact: ``final_norm(h) = frozen_norm(h, scale) + final_norm(0)``.
        Computed through the model's own norm module, so family details (Gemma's
        ``1 + w`` gain) come from the model itself.
        """
        zero = self.final_norm(x.new_zeros(self.d_model))
        return (self.final_norm(x) - zero).float() * (self.norm_scale(x) / scale)

    def output_slope(
        self, logits: Float[Tensor, "*batch d_vocab"]
    ) -> Float[Tensor, "*batch d_vocab"]:
        """Slope of the model's elementwise output transform at ``logits`` (ones where it has none).

        Gemma 2 soft-caps its logits (``c * tanh(x / c)``); the other families return
        the unembedding as it is.
        """
        transform = self.model.adapter.apply_output_logits_transform
        _, slope = torch.func.jvp(transform, (logits,), (torch.ones_like(logits),))
        return slope

    def hook_name(self, row: int, point: str = "resid_pre") -> str:
        """TransformerLens hook name of a residual point for lens row ``row``."""
        row = self.check_row(row)
        if row == self.n_layers:
            return f"blocks.{self.n_layers - 1}.hook_resid_post"
        return f"blocks.{row}.hook_{point}"
