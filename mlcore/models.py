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

``Conv4(norm="batch", per_step_bn=S)`` is MAML++'s per-step batch normalisation
(:class:`PerStepBatchNorm2d`): one (γ_j, β_j) and one set of running statistics per inner step j.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BodyHead", "MLP", "Conv4", "BatchStatNorm2d", "PerStepBatchNorm2d", "inner_step", "per_step_norms",
           "use_running_stats", "frozen_running_stats", "NORMS"]

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


_INNER_STEP: ContextVar[int | None] = ContextVar("mlcore_inner_step", default=None)
_STATS_FROZEN: ContextVar[bool] = ContextVar("mlcore_running_stats_frozen", default=False)


@contextlib.contextmanager
def inner_step(j: int) -> Iterator[None]:
    """Inside the block, per-step layers (:class:`PerStepBatchNorm2d`) use the parameters and statistics of
    inner step ``j``. :func:`mlcore.inner.trajectory` sets it around the support forward at θ_j, and
    :func:`mlcore.inner.outputs_at` around a query forward; set it yourself only to call such a network
    outside mlcore's inner loop. A Python value, not a tensor: the same under vmap, grad and first order."""
    if isinstance(j, bool) or not isinstance(j, int) or j < 0:
        raise ValueError(f"inner_step: the step index must be a non-negative integer, got {j!r}")
    token = _INNER_STEP.set(j)
    try:
        yield
    finally:
        _INNER_STEP.reset(token)


@contextlib.contextmanager
def frozen_running_stats() -> Iterator[None]:
    """Inside the block, per-step layers do not update their running statistics, even in training mode
    (:func:`mlcore.family.predict` runs in it: evaluating leaves the model as it was)."""
    token = _STATS_FROZEN.set(True)
    try:
        yield
    finally:
        _STATS_FROZEN.reset(token)


class PerStepBatchNorm2d(nn.Module):
    """MAML++'s per-step batch normalisation (Antoniou et al. 2019, "How to train your MAML", §4, "Per-Step
    Batch Normalization Weights and Biases" (BNWB) and "... Running Statistics" (BNRS)).

    At inner step j = 0 … S−1 (the index set by :func:`inner_step`):

        y = γ_j · (x − μ) / sqrt(σ² + ε) + β_j,     μ, σ² = μ_B, σ²_B  (this batch: transductive, default)
                                                          or  m_j, v_j  (``use_running_stats``: not transductive)

    ===================  ========  ==================================================================
    code                 paper     meaning, shape
    ===================  ========  ==================================================================
    ``weight[j]``        γ_j       scale of step j, ``weight`` (S, C) (BNWB)
    ``bias[j]``          β_j       shift of step j, ``bias`` (S, C) (BNWB)
    ``running_mean[j]``  —         momentum average of the batch means of step j's forwards, buffer (S, C) (BNRS)
    ``running_var[j]``   —         the same for the (unbiased) batch variances, (S, C) buffer (BNRS)
    ``steps``            —         S, the inner steps; a network built for S steps runs exactly S
    ===================  ========  ==================================================================

    Which index a forward uses (as in the authors' released code, ``few_shot_learning_system.py``,
    ``MAMLFewShotClassifier.forward``): at step j the support forward at θ_j uses index j, the update
    gives θ_{j+1}, and the query forward at θ_{j+1} (every step with the multi-step loss, the last only
    without) uses index j too; the final query forward uses S−1. S index sets in all.

    γ_j and β_j are meta-learned only: the inner loop does not move them (``inner_adapt=False``,
    :func:`mlcore.inner.adapted`), as in the authors' code, where ``enable_inner_loop_optimizable_bn_params``
    is false in every released configuration (and setting it true replaces the per-step γ, β by one shared
    pair that the inner loop adapts). Set ``inner_adapt = True`` to adapt them too.

    Running statistics. In training mode (``model.train()``) and with ``track_running_stats`` every
    forward updates m_j ← (1 − momentum) m_j + momentum μ_B (v_j likewise with the unbiased σ²_B), from
    detached values, so the meta-gradient graph is untouched; under ``torch.func.vmap`` such an in-place
    update is impossible, so :func:`mlcore.inner.resolve_strategy` picks the per-task loop for it and
    refuses ``strategy="vmap"`` (evaluate with ``model.eval()``, or inside :func:`frozen_running_stats`,
    where nothing is updated and vmap works). Normalising *with* them is a separate, explicit choice:
    ``use_running_stats = True`` (or :func:`use_running_stats`), for a non-transductive evaluation in
    which a query's logits do not depend on the other queries.

    **What the authors' released code does** (``meta_neural_network_architectures.py``,
    ``MetaBatchNormLayer.forward``): it always calls ``F.batch_norm(..., training=True, momentum=0.1)``
    with the step-j rows of its running statistics, so they are collected at every forward but never used
    to normalise, in training and at evaluation alike: the normalisation is transductive and the running
    statistics have no effect on any output. During evaluation they are saved at each task's first support
    forward and restored after the task (``restore_backup_stats``), so evaluating leaves them unchanged.
    Ours defaults to the same (batch statistics; :func:`mlcore.family.predict` freezes the statistics
    instead of saving and restoring them; same result). Statistics-only batch norm followed by a separate
    scale and shift, as :class:`BatchStatNorm2d`: exact under vmap.
    """

    def __init__(self, channels: int, steps: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PerStepBatchNorm2d: {name} must be a positive integer, got {value!r}")
        if not 0 < momentum <= 1:
            raise ValueError(f"PerStepBatchNorm2d: momentum must lie in (0, 1], got {momentum!r}")
        self.steps, self.eps, self.momentum = steps, eps, momentum
        self.weight = nn.Parameter(torch.ones(steps, channels))     # γ_j, (S, C)
        self.bias = nn.Parameter(torch.zeros(steps, channels))      # β_j, (S, C)
        self.register_buffer("running_mean", torch.zeros(steps, channels))   # m_j, (S, C)
        self.register_buffer("running_var", torch.ones(steps, channels))     # v_j, (S, C)
        self.track_running_stats = True
        self.use_running_stats = False
        self.inner_adapt = False

    @property
    def updates_running_stats(self) -> bool:
        """True if a forward now updates the running statistics in place (see the class docstring)."""
        return self.training and self.track_running_stats and not self.use_running_stats and not _STATS_FROZEN.get()

    def forward(self, x: Tensor) -> Tensor:
        j = _INNER_STEP.get()
        if j is None:
            raise RuntimeError(
                f"PerStepBatchNorm2d (MAML++ per-step batch norm, {self.steps} steps) needs the inner-step index "
                f"j to pick γ_j, β_j: call the network through mlcore's inner loop (maml.meta_loss, adapt, "
                f"predict, inner.trajectory / outputs_at), or inside `with mlcore.models.inner_step(j):` "
                f"with j in 0..{self.steps - 1}")
        if j >= self.steps:
            raise ValueError(f"PerStepBatchNorm2d was built for {self.steps} inner steps (indices "
                             f"0..{self.steps - 1}), but is called at step {j}: build the network with "
                             f"per_step_bn=inner_steps")
        if self.use_running_stats:   # not transductive: m_j, v_j, the same for every example
            mean, var = self.running_mean[j], self.running_var[j]
            x = (x - mean[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
        else:
            if self.updates_running_stats:
                self._update(j, x.detach())
            x = F.batch_norm(x, None, None, weight=None, bias=None, training=True, eps=self.eps)
        return x * self.weight[j][:, None, None] + self.bias[j][:, None, None]  # (N, C, H, W)

    @torch.no_grad()
    def _update(self, j: int, x: Tensor) -> None:
        m = self.momentum
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), correction=1)   # (C,), as nn.BatchNorm2d
        try:   # computed first, copied in one step: under vmap the copy fails before anything changed
            self.running_mean[j].copy_((1 - m) * self.running_mean[j] + m * mean)
            self.running_var[j].copy_((1 - m) * self.running_var[j] + m * var)
        except RuntimeError as error:
            if "vmap" not in str(error):
                raise
            raise RuntimeError(
                "PerStepBatchNorm2d cannot update its running statistics (shared by all tasks) inside "
                "torch.func.vmap, where each task has its own batch statistics: use strategy='loop', "
                "model.eval(), track_running_stats = False, or mlcore.models.frozen_running_stats()") from error


def per_step_norms(model: nn.Module) -> dict[str, PerStepBatchNorm2d]:
    """The model's :class:`PerStepBatchNorm2d` layers by module name (empty for any other network)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PerStepBatchNorm2d)}


def use_running_stats(model: nn.Module, enabled: bool = True) -> None:
    """Make every per-step layer normalise with its running statistics m_j, v_j (``enabled``, not
    transductive) or with the batch statistics (``False``, the default and the authors' code)."""
    layers = per_step_norms(model)
    if not layers:
        raise ValueError(f"use_running_stats: {type(model).__name__} has no per-step batch-norm layer; build it "
                         f"with Conv4(norm='batch', per_step_bn=inner_steps)")
    for m in layers.values():
        m.use_running_stats = bool(enabled)


def _norm_layer(norm: str, channels: int, groups: int, per_step_bn: int | None = None) -> nn.Module:
    if per_step_bn is not None:
        if isinstance(per_step_bn, bool) or not isinstance(per_step_bn, int) or per_step_bn <= 0:
            raise ValueError(f"Conv4: per_step_bn is the number of inner steps S (a positive integer) or None, "
                             f"got {per_step_bn!r}")
        if norm != "batch":
            raise ValueError(f"Conv4: per_step_bn is MAML++'s per-step batch norm, so it needs norm='batch', "
                             f"got norm={norm!r}")
        return PerStepBatchNorm2d(channels, per_step_bn)
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
        per_step_bn: with ``norm="batch"``, MAML++'s per-step batch norm for this many inner steps
            (:class:`PerStepBatchNorm2d`); ``None``: one γ, β shared by all steps (:class:`BatchStatNorm2d`).

    Shapes: x (N, in_channels, image_size, image_size) → logits (N, n_way), or embeddings
    (N, hidden · s²) with ``n_way=None``, where s = image_size halved (floor) four times.
    """

    def __init__(self, in_channels: int = 1, n_way: int | None = 5, hidden: int = 64, norm: Norm = "batch",
                 image_size: int = 28, groups: int = 8, per_step_bn: int | None = None) -> None:
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
            blocks += [nn.Conv2d(channels, hidden, 3, padding=1), _norm_layer(norm, hidden, groups, per_step_bn),
                       nn.ReLU(), nn.MaxPool2d(2)]
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
