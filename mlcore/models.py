"""Networks used throughout the book: the sine MLP and the 4-block convolutional net.

Both split into a ``body`` (the feature extractor) and a ``head`` (the last linear layer), so that
parameter names read ``body.…`` and ``head.…``; ANIL adapts ``head`` only, Prototypical and Matching
Networks use the body alone (``Conv4(..., n_way=None)``).

Normalisation policy (``Conv4(norm=...)``), and what each does at meta-test time:

===========  =====================================================================================
``"batch"``  Transductive batch statistics, the choice of MAML (Finn et al. 2017) and most MAML-era
             code: every forward pass normalises with the mean and variance of the batch it is given,
             in training *and* at test time; no running statistics exist. At meta-test time the
             support set is normalised with support statistics during adaptation, the query set with
             query statistics: predictions for one query example depend on the other query examples
             (transductive). Written as a statistics-only ``F.batch_norm`` followed by a separate
             per-channel scale and shift, which is exact under ``torch.func.vmap`` — unlike
             ``nn.BatchNorm2d``, whose affine form gives a wrong second-order meta-gradient under
             vmap without any error (see ``book`` chapter 3).
``"group"``  ``GroupNorm``: statistics per example over groups of channels. Not transductive: each
             query example is classified on its own, exactly as in deployment.
``"none"``   No normalisation (plain conv → ReLU → pool); slower to train, nothing transductive.
===========  =====================================================================================
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BodyHead", "MLP", "Conv4", "BatchStatNorm2d", "NORMS"]

NORMS = ("batch", "group", "none")
Norm = Literal["batch", "group", "none"]


class BodyHead(nn.Module):
    """A network that computes ``head(body(x))``: the contract ANIL's feature reuse relies on.

    Subclasses set the modules ``body`` (features) and ``head`` (the last layer, or ``None`` for an
    embedding network) and keep this ``forward``; :mod:`mlcore.anil` may then compute the body's features
    once per task instead of once per inner step. ``check_input`` may refuse inputs of the wrong shape.
    """

    body: nn.Module
    head: nn.Module | None

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error for inputs the body cannot take (default: accept everything)."""

    def embed(self, x: Tensor) -> Tensor:
        """Body only: the features the head is applied to."""
        self.check_input(x)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        z = self.embed(x)
        return self.head(z) if self.head is not None else z


class MLP(BodyHead):
    """Fully connected ReLU network; the sine regressor of Finn et al. (2017) is ``MLP(1, (40, 40), 1)``.

    Shapes: x (N, in_features) → (N, out_features).
    """

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] = (40, 40), out_features: int = 1) -> None:
        super().__init__()
        if isinstance(hidden, (int, float)) or not hasattr(hidden, "__iter__"):
            raise TypeError(f"MLP: hidden is the tuple of hidden-layer widths, e.g. (40, 40) for two layers "
                            f"or ({hidden!r},) for one; got {hidden!r}")
        for name, value in (("in_features", in_features), ("out_features", out_features), *(
                (f"hidden[{i}]", h) for i, h in enumerate(hidden))):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MLP: {name} must be a positive integer, got {value!r}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)
        self.in_features = in_features

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"MLP expects inputs of shape (N, {self.in_features}), got "
                             f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}; a regression input of one "
                             f"feature needs its last dimension: x.unsqueeze(-1)")


class BatchStatNorm2d(nn.Module):
    """Batch normalisation with the current batch's statistics only (transductive), vmap-exact.

    y = γ · (x − μ_B) / sqrt(σ²_B + ε) + β, with μ_B, σ²_B the per-channel mean and (biased) variance
    over (N, H, W) of *this* batch, in training and evaluation alike. No running statistics are kept,
    so nothing is shared between a meta-model and its adapted copies.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics-only batch norm (no affine inside) and a separate scale/shift: exact under vmap.
        x = F.batch_norm(x, None, None, weight=None, bias=None, training=True, eps=self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]  # (N, C, H, W)


def _norm_layer(norm: str, channels: int, groups: int) -> nn.Module:
    if norm == "batch":
        return BatchStatNorm2d(channels)
    if norm == "group":
        if channels % groups:
            raise ValueError(f"Conv4: hidden={channels} is not divisible by groups={groups} for GroupNorm")
        return nn.GroupNorm(groups, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"Conv4: norm={norm!r} is not one of {NORMS}")


class Conv4(BodyHead):
    """The standard 4-block convolutional network of Vinyals et al. (2016), used by MAML, ProtoNets…

    Each block: 3×3 conv (``hidden`` channels, padding 1) → norm → ReLU → 2×2 max-pool.
    28×28 inputs (Omniglot) leave a 1×1×hidden map, 84×84 inputs (mini-ImageNet) a 5×5×hidden map.

    Args:
        in_channels: 1 for Omniglot, 3 for RGB.
        n_way: classes of the linear head; ``None`` builds the embedding network only (no head).
        hidden: channels of every conv layer (64 in the papers).
        norm: ``"batch"``, ``"group"`` or ``"none"`` (see the module docstring).
        image_size: input height = width; fixes the head's input size.
        groups: groups for ``norm="group"``.

    Shapes: x (N, in_channels, image_size, image_size) → logits (N, n_way), or embeddings
    (N, hidden · s²) with ``n_way=None``, where s = image_size halved (floor) four times.
    """

    def __init__(self, in_channels: int = 1, n_way: int | None = 5, hidden: int = 64, norm: Norm = "batch",
                 image_size: int = 28, groups: int = 8) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("hidden", hidden), ("image_size", image_size)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Conv4: {name} must be a positive integer, got {value!r}")
        if n_way is not None and (not isinstance(n_way, int) or n_way < 2):
            raise ValueError(f"Conv4: n_way must be an integer >= 2 (or None for no head), got {n_way!r}")
        side = image_size
        for _ in range(4):
            side //= 2
        if side == 0:
            raise ValueError(f"Conv4: image_size={image_size} is too small for four 2x2 poolings (need >= 16)")
        blocks: list[nn.Module] = []
        channels = in_channels
        for _ in range(4):
            blocks += [nn.Conv2d(channels, hidden, 3, padding=1), _norm_layer(norm, hidden, groups), nn.ReLU(),
                       nn.MaxPool2d(2)]
            channels = hidden
        blocks.append(nn.Flatten())
        self.body = nn.Sequential(*blocks)
        self.norm = norm
        self.in_channels = in_channels
        self.image_size = image_size
        self.embedding_dim = hidden * side * side
        self.head = nn.Linear(self.embedding_dim, n_way) if n_way is not None else None

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels \
                or x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(
                f"Conv4 expects images of shape (N, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
