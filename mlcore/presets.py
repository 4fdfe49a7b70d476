"""Training presets that follow the papers' own protocols, and the configuration they fill in.

A :class:`Config` says everything a run needs: the method, the episodes it trains on, the optimiser,
the inner loop, how often it validates, and the **test protocol** (ways, shots, queries per class,
episodes, inner steps at test, transductive batch statistics or not). A preset is a named Config
whose values come from a paper or from its authors' released code; ``source`` says which, value by
value where they differ. ``python -m mlcore.train PRESET`` trains one; any option overrides a value.

Which values come from where (also printed by ``python -m mlcore.train --list``):

MAML (Finn, Abbeel & Levine, ICML 2017), Omniglot, from the commands in the docstring of ``main.py``
in the authors' code (github.com/cbfinn/maml) and the paper's Appendix A.1: Adam with meta-lr 1e-3
(the flag's default), 40,000 meta-iterations (the code's Omniglot commands, ``--metatrain_iterations=40000``;
the paper's Appendix A.1 says "All models were trained for 60000 iterations", which is the code's
MiniImagenet setting);
5-way: meta-batch 32, one inner step at α = 0.4; 20-way: meta-batch 16, five inner steps at α = 0.1;
support and query sets both hold K examples per class (``DataGenerator(update_batch_size*2, …)``);
600 test tasks. At test the code adapts with 10 steps (``test_num_updates = 10``) and prints the
accuracy after each; the paper says 5-way was evaluated after 3 steps (the preset uses the code's 10;
``python -m mlcore.evaluate RUN --inner-steps 3`` gives the paper's). The code has 5-shot commands for
neither 5- nor 20-way: the 5-shot presets set K = 5 in the same commands. FOMAML is the same code
with ``--stop_grad``; the MAML paper reports no first-order Omniglot number (Nichol et al. 2018 give
98.3 ± 0.5 for 5-way 1-shot). One difference is kept on purpose: the code's Omniglot network downsamples
with strided convolutions (``--max_pool`` defaults to False), the presets' ``Conv4`` with 2×2 max-pooling,
as Vinyals et al. and Snell et al. do. Sine regression (Section 5.1 of the paper and the code's
defaults): 10 shots, meta-batch 25, one inner step at α = 0.01 (ten at test), 70,000 iterations.

Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017), Section 3.1: training episodes of 60
classes with 5 queries per class, the training shot equal to the test shot, Adam at 1e-3 halved every
2,000 episodes, one episode per step; accuracy over 1,000 test episodes, 15 queries per class in the
authors' code (github.com/jakesnell/prototypical-networks, ``data.test_query``); the 20-way numbers
are the same trained models tested 20-way. The authors' code stops early on validation loss (patience
200 epochs of 100 episodes), then retrains on train+val, and evaluates with ``model.eval()``: batch
norm with running statistics, so each query is classified on its own (not transductive). The presets
train on the train split only, for 10,000 episodes (the rate is then halved five times, to 1/32),
keep the best-on-validation weights, and use batch statistics of each episode (transductive); the
``-gn`` preset (GroupNorm) and ``--no-transductive`` evaluation are the non-transductive variants.

Matching Networks (Vinyals et al., NeurIPS 2016) have no released code; the presets train with the
episode shape of the test task (5-way, K shots, 15 queries per class), Adam at 1e-3, cosine attention,
with and without Full Context Embeddings. The paper's softmax is over raw cosines (``matching_scale``
1); without FCE the Conv4 embeddings come out of a ReLU, so every cosine lies in [0, 1] and, 5-way
1-shot, the attention can put at most e/(e + 4) ≈ 0.40 on the right class: the loss cannot fall
below 0.90 and its gradient stays weak. In 2,000-step pilots (5-way 1-shot, no FCE, val split) scale
1 reached 82.9%, 5 → 91.2%, 10 → 94.2%, 20 → 95.2%, 50 → 94.9% (``results/matching_scale/pilot.json``).
The presets use ``matching_scale`` 20, chosen there on validation accuracy; this is a deviation from
the paper, stated in each preset's source.

ANIL (Raghu et al., ICLR 2020) and Meta-SGD (Li et al., 2017) use MAML's Omniglot protocol above
(ANIL: the same code with the inner loop restricted to the head; Meta-SGD: learned per-parameter rates
initialised at MAML's α). Reptile (Nichol, Achiam & Schulman, 2018) uses the README command of the
authors' code (github.com/openai/supervised-reptile) for transductive 1-shot 5-way Omniglot, the
setting of the paper's 97.68% (Reptile + Transduction), since the presets' test protocol is
transductive: Adam inner loop (β1 = 0) at 1e-3, 3 inner steps, 15 training shots per class, 10 tasks
per meta-step, outer step size 1 annealed linearly to 0 over 100,000 meta-iterations, 5 inner steps
at test (``--inner-iters 3 --train-shots 15 --meta-batch 10 --meta-iters 100000 --eval-iters 5
--learning-rate 0.001 --meta-step 1 --meta-step-final 0 --transductive``). Differences: the authors'
inner loop takes mini-batches of 25 of the 75 images (``--inner-batch 25``), here each step is
full-batch; their test set is not rotated and has 1 query per class over 10,000 tasks, here the
Vinyals test split (rotations included) and the preset's episodes.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields

__all__ = ["Config", "PRESETS", "METHODS", "GRADIENT_METHODS", "METRIC_METHODS", "get_preset", "preset_table",
           "preset_markdown"]

GRADIENT_METHODS = ("maml", "fomaml", "metasgd", "anil", "reptile")
METRIC_METHODS = ("protonet", "matching", "matching-fce")
METHODS = GRADIENT_METHODS + METRIC_METHODS
DATASETS = ("omniglot", "sine")
NORMS = ("batch", "group", "none")


@dataclass(frozen=True)
class Config:
    """Every setting of a training run and of its test protocol.

    Training episodes: ``n_way``-way ``k_shot``-shot with ``n_query`` queries per class,
    ``meta_batch`` episodes per optimiser step, ``steps`` steps. Outer optimiser: Adam at ``meta_lr``,
    halved every ``lr_halve_every`` steps (0: never). Inner loop (gradient-based methods):
    ``inner_steps`` steps at ``inner_lr`` during training, ``test_inner_steps`` at test. Validation:
    ``val_episodes`` fixed episodes of the **val** split, drawn with the test protocol, every
    ``val_every`` steps; the best-on-validation weights are kept. Test protocol: ``test_n_way``
    (0: ``n_way``), ``test_k_shot`` (0: ``k_shot``), ``test_n_query`` queries per class,
    ``test_episodes`` episodes, and ``transductive``: batch statistics over the episode's whole query
    set (True) or each query classified on its own with the support set (False).
    """

    method: str
    dataset: str = "omniglot"
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 1
    meta_batch: int = 32
    steps: int = 40_000
    meta_lr: float = 1e-3
    lr_halve_every: int = 0
    inner_lr: float = 0.4
    inner_steps: int = 1
    test_inner_steps: int = 10
    # Reptile: outer step size ε, annealed linearly from reptile_eps to reptile_eps_final; Adam inner loop.
    reptile_eps: float = 1.0
    reptile_eps_final: float = 0.0
    reptile_inner: str = "adam"
    # Network
    norm: str = "batch"
    hidden: int = 64
    fce_steps: int = 5
    matching_scale: float = 1.0
    # Validation and test protocol
    val_every: int = 500
    val_episodes: int = 200
    test_n_way: int = 0
    test_k_shot: int = 0
    test_n_query: int = 1
    test_episodes: int = 600
    transductive: bool = True
    seed: int = 0
    checkpoint_every: int = 100
    preset: str = ""
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        errors = []
        if self.method not in METHODS:
            errors.append(f"method={self.method!r} is not one of {METHODS}")
        if self.dataset not in DATASETS:
            errors.append(f"dataset={self.dataset!r} is not one of {DATASETS}")
        if self.norm not in NORMS:
            errors.append(f"norm={self.norm!r} is not one of {NORMS}")
        if self.reptile_inner not in ("sgd", "adam"):
            errors.append(f"reptile_inner={self.reptile_inner!r} is not 'sgd' or 'adam'")
        if self.dataset == "sine" and self.method not in ("maml", "fomaml", "metasgd", "anil", "reptile"):
            errors.append(f"method={self.method!r} classifies; the sine family is regression (use a "
                          f"gradient-based method: {GRADIENT_METHODS})")
        positive = ("n_way", "k_shot", "n_query", "meta_batch", "inner_steps", "test_inner_steps", "hidden",
                    "fce_steps", "val_every", "test_n_query", "checkpoint_every")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("steps", "lr_halve_every", "test_n_way", "test_k_shot"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                errors.append(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("val_episodes", "test_episodes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                errors.append(f"{name} must be an integer >= 2 (a confidence interval needs two), got {value!r}")
        for name in ("meta_lr", "inner_lr", "reptile_eps", "matching_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                errors.append(f"{name} must be a positive number, got {value!r}")
        if not isinstance(self.reptile_eps_final, (int, float)) or not 0 <= self.reptile_eps_final:
            errors.append(f"reptile_eps_final must be a number >= 0, got {self.reptile_eps_final!r}")
        if not isinstance(self.transductive, bool):
            errors.append(f"transductive must be True or False, got {self.transductive!r}")
        if self.dataset == "omniglot" and self.n_way >= 2 and self.method in GRADIENT_METHODS \
                and self.test_n_way not in (0, self.n_way):
            errors.append(f"test_n_way={self.test_n_way} differs from n_way={self.n_way}: a {self.method} "
                          f"network has a {self.n_way}-way head; train a {self.test_n_way}-way model instead")
        if self.dataset == "omniglot" and (self.n_way < 2 or self.eval_n_way < 2):
            errors.append("n_way and test_n_way must be at least 2 on Omniglot")
        if self.dataset == "omniglot":
            per_class = max(self.k_shot + self.n_query, self.eval_k_shot + self.test_n_query)
            if per_class > 20:
                errors.append(f"shots + queries per class = {per_class}, but Omniglot has 20 drawings of each "
                              f"character; use k_shot + n_query <= 20 and test_k_shot + test_n_query <= 20")
        if errors:
            raise ValueError("invalid training configuration: " + "; ".join(errors))

    @property
    def eval_n_way(self) -> int:
        """Ways of the test (and validation) episodes."""
        return self.test_n_way or self.n_way

    @property
    def eval_k_shot(self) -> int:
        """Shots of the test (and validation) episodes."""
        return self.test_k_shot or self.k_shot

    def replace(self, **changes: object) -> Config:
        """A copy with ``changes``; unknown names raise with the list of known ones."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown configuration value(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> Config:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown configuration value(s) {unknown} (written by a newer mlcore?); "
                             f"known: {sorted(known)}")
        return cls(**values)


_FINN = ("Finn et al. 2017, App. A.1 and the commands in main.py of github.com/cbfinn/maml: 40,000 "
         "iterations (the code's Omniglot commands), Adam 1e-3, query = K examples per class, 10 inner steps (the code's "
         "test_num_updates) and 600 tasks at test")
_NICHOL_FO = "first-order MAML as Nichol et al. 2018 ran it (Finn's code with --stop_grad)"
_SNELL = ("Snell et al. 2017, Section 3.1 (60-way training episodes, 5 queries per class, training "
          "shot = test shot, Adam 1e-3 halved every 2000 episodes, 1000 test episodes) and the authors' "
          "code (15 test queries per class); 10,000 episodes on the train split instead of early stopping "
          "and retraining on train+val")
_VINYALS = ("Vinyals et al. 2016 (no released code): episodes shaped like the test task, 15 queries per "
            "class, Adam 1e-3, cosine attention; softmax over 20 × cosine (the paper: 1 × cosine), the scale chosen "
            "on validation accuracy in 2,000-step pilots, results/matching_scale/pilot.json")
_REPTILE = ("Nichol et al. 2018, authors' code github.com/openai/supervised-reptile, README command for "
            "transductive 1-shot 5-way Omniglot: Adam inner loop at 1e-3, 3 inner steps on 15 shots per class, "
            "meta-batch 10, outer step 1 annealed to 0 over 100,000 iterations, 5 inner steps at test")


def _maml(method: str, n_way: int, k_shot: int, source: str, *, test_steps: int = 10,
          **more: object) -> dict[str, object]:
    if n_way == 5:
        loop = dict(meta_batch=32, inner_lr=0.4, inner_steps=1)
    else:  # 20-way
        loop = dict(meta_batch=16, inner_lr=0.1, inner_steps=5)
    return dict(method=method, n_way=n_way, k_shot=k_shot, n_query=k_shot, steps=40_000, meta_lr=1e-3,
                test_inner_steps=test_steps, test_n_query=k_shot, test_episodes=600,
                val_every=500, val_episodes=200,
                source=source, **loop, **more)


def _protonet(k_shot: int, **more: object) -> dict[str, object]:
    return dict(method="protonet", n_way=60, k_shot=k_shot, n_query=5, meta_batch=1, steps=10_000,
                meta_lr=1e-3, lr_halve_every=2000, test_n_way=5, test_n_query=15, test_episodes=1000,
                val_every=500, val_episodes=200, source=_SNELL, **more)


def _matching(method: str, k_shot: int) -> dict[str, object]:
    return dict(method=method, n_way=5, k_shot=k_shot, n_query=15, meta_batch=1, steps=20_000, meta_lr=1e-3,
                lr_halve_every=0, test_n_query=15, test_episodes=1000, val_every=500, val_episodes=200,
                matching_scale=20.0, source=_VINYALS)


_PRESETS: dict[str, dict[str, object]] = {
    "maml-omniglot-5w1s": _maml("maml", 5, 1, _FINN),
    "maml-omniglot-5w5s": _maml("maml", 5, 5, _FINN),
    "maml-omniglot-20w1s": _maml("maml", 20, 1, _FINN),
    "maml-omniglot-20w5s": _maml("maml", 20, 5, _FINN),
    "maml-omniglot-5w1s-gn": _maml("maml", 5, 1, _FINN + "; GroupNorm instead of batch statistics "
                                   "(not transductive)", norm="group", transductive=False),
    "fomaml-omniglot-5w1s": _maml("fomaml", 5, 1, _NICHOL_FO + "; " + _FINN),
    "fomaml-omniglot-5w5s": _maml("fomaml", 5, 5, _NICHOL_FO + "; " + _FINN),
    "anil-omniglot-5w1s": _maml("anil", 5, 1, "Raghu et al. 2020 (ANIL): MAML's Omniglot protocol with the "
                                "inner loop on the head only; " + _FINN),
    "metasgd-omniglot-5w1s": _maml("metasgd", 5, 1, "Li et al. 2017 (Meta-SGD): learned per-parameter inner "
                                   "rates, initialised at MAML's alpha, one step at test as in training; "
                                   "otherwise " + _FINN, test_steps=1),
    "reptile-omniglot-5w1s": dict(method="reptile", n_way=5, k_shot=15, n_query=1, meta_batch=10,
                                  steps=100_000, inner_lr=1e-3, inner_steps=3, reptile_eps=1.0,
                                  reptile_eps_final=0.0, reptile_inner="adam", test_k_shot=1,
                                  test_inner_steps=5, test_n_query=1, test_episodes=600, val_every=2000,
                                  val_episodes=200, source=_REPTILE),
    "protonet-omniglot-1shot": _protonet(1),
    "protonet-omniglot-5shot": _protonet(5),
    "protonet-omniglot-1shot-gn": _protonet(1, norm="group", transductive=False),
    "matching-omniglot-5w1s": _matching("matching", 1),
    "matching-omniglot-5w5s": _matching("matching", 5),
    "matching-fce-omniglot-5w1s": _matching("matching-fce", 1),
    "matching-fce-omniglot-5w5s": _matching("matching-fce", 5),
    "maml-sine-10shot": dict(method="maml", dataset="sine", k_shot=10, n_query=10, meta_batch=25, steps=70_000,
                             meta_lr=1e-3, inner_lr=0.01, inner_steps=1, test_inner_steps=10, test_n_query=100,
                             test_episodes=600, val_every=1000, val_episodes=100, n_way=1,
                             source="Finn et al. 2017, Section 5.1 and the defaults of the authors' code "
                                    "(github.com/cbfinn/maml): K = 10, meta-batch 25, alpha 0.01, "
                                    "70,000 iterations"),
}
PRESETS: dict[str, Config] = {name: Config(preset=name, **values) for name, values in _PRESETS.items()}


def get_preset(name: str) -> Config:
    """The preset ``name`` (see :data:`PRESETS`); an unknown name raises with the list of known ones."""
    if name not in PRESETS:
        close = [p for p in PRESETS if name.split("-")[0] in p]
        raise ValueError(f"no preset {name!r}; presets: {sorted(PRESETS)}"
                         + (f" (did you mean one of {close}?)" if close else ""))
    return PRESETS[name]


def preset_table() -> str:
    """A plain-text table of every preset's main values and its source."""
    head = ("preset", "way", "shot", "query", "batch", "steps", "lr", "inner", "test")
    rows = [head]
    for name, c in PRESETS.items():
        inner = f"{c.inner_steps}x{c.inner_lr:g}" if c.method in GRADIENT_METHODS else "-"
        test = (f"{c.eval_n_way}w{c.eval_k_shot}s q{c.test_n_query} x{c.test_episodes}"
                + (f" K{c.test_inner_steps}" if c.method in GRADIENT_METHODS else "")
                + ("" if c.transductive else " non-trans."))
        rows.append((name, str(c.n_way), str(c.k_shot), str(c.n_query), str(c.meta_batch), str(c.steps),
                     f"{c.meta_lr:g}" + (f"/2@{c.lr_halve_every}" if c.lr_halve_every else ""), inner, test))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)


def preset_markdown() -> str:
    """The README's preset table (Markdown), generated from :data:`PRESETS` (a test keeps them equal)."""
    lines = ["| preset | method | train episodes | meta-batch | steps | outer | inner (train / test) | test protocol |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, c in PRESETS.items():
        if c.dataset == "sine":
            episodes = f"sine, {c.k_shot} shots, {c.n_query} queries"
            test = f"{c.eval_k_shot} shots, {c.test_n_query} points, {c.test_episodes} tasks"
        else:
            episodes = f"{c.n_way}-way {c.k_shot}-shot, {c.n_query} q/class"
            test = (f"{c.eval_n_way}-way {c.eval_k_shot}-shot, {c.test_n_query} q/class, {c.test_episodes} episodes, "
                    + ("transductive" if c.transductive else "non-transductive"))
        outer = f"Adam {c.meta_lr:g}" + (f", halved every {c.lr_halve_every}" if c.lr_halve_every else "")
        if c.method == "reptile":
            outer = f"ε {c.reptile_eps:g} → {c.reptile_eps_final:g}"
        inner = (f"{c.inner_steps} × {c.inner_lr:g} / {c.test_inner_steps}"
                 + (f" ({c.reptile_inner})" if c.method == "reptile" else "")) if c.method in GRADIENT_METHODS else "—"
        norm = "" if c.norm == "batch" or c.dataset == "sine" else f" ({c.norm} norm)"
        if c.method.startswith("matching"):
            norm += f" (cosine × {c.matching_scale:g})"
        lines.append(f"| `{name}` | {c.method}{norm} | {episodes} | {c.meta_batch} | {c.steps:,} | {outer} | {inner} "
                     f"| {test} |")
    return "\n".join(lines)
