"""Training and evaluating one method at a preset's scale: what ``python -m mlcore.train`` runs.

:func:`build` turns a :class:`~mlcore.presets.Config` into a :class:`Method`: the network, its
optimiser and schedule, ``step(tasks, step)`` (one meta-update, metrics back) and
``predict(tasks, inner_steps)`` (scores for the queries, for :func:`mlcore.evaluate.evaluate`). Each
method's update is a call into its own module (``maml.meta_loss``, ``protonet.train_step``, …); this
file only wires them to data, an optimiser and the resumable loop :func:`mlcore.train.meta_train`.

A run lives in one folder (``--out``):

===================  ===============================================================================
``config.json``      the full configuration; a later ``train`` into the same folder must agree with it
                     (only ``steps`` may grow: that continues the run)
``checkpoint.pt``    the resumable state (weights, optimiser, schedule, episode generator, best so far,
                     history), written atomically every ``checkpoint_every`` steps
``best.pt``          the best-on-validation weights with their config, step and validation score: the
                     small file to ship and to evaluate
``sessions.jsonl``   one line per training session: when, steps from/to, wall time, device, torch,
                     threads, the command line
``record.json``      written by ``python -m mlcore.evaluate``: the results record (see mlcore.results)
===================  ===============================================================================

Validation draws ``val_episodes`` episodes from the **val** split with the test protocol, from the
same seed every time (so successive scores are comparable), every ``val_every`` steps and after the
last step. Accuracy for classification; for the sine family the query MSE (lower is better).
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import anil, compiled, family, maml, matching, metasgd, protonet, reptile
from .episodes import EpisodeSampler
from .evaluate import Accuracy, evaluate
from .models import MLP, BatchStatNorm2d, Conv4, PerStepBatchNorm2d
from .presets import GRADIENT_METHODS, Config
from .tasks import SineTasks, TaskBatch
from .train import History, atomic_write, meta_train

__all__ = ["Method", "build", "train", "load_model", "evaluate_model", "one_query_at_a_time", "mixes_examples",
           "device_name", "MODEL_FORMAT", "RunFolderError"]

MODEL_FORMAT = "mlcore.model/1"
VAL_SEED_OFFSET = 10_000   # validation episodes: seed + this, the same episodes at every validation
TEST_SEED = 0              # test episodes: the same for every run and method (evaluate's seed=)


class RunFolderError(ValueError):
    """A run folder holds a different run (another configuration) or is not a run folder."""


# ----------------------------------------------------------------------------------------- data
@lru_cache(maxsize=4)
def _omniglot(split: str) -> tuple[Tensor, Tensor]:
    from .data.omniglot import load_omniglot
    return load_omniglot(split=split, progress=False)


def episodes(split: str, *, n_way: int, k_shot: int, n_query: int, seed: int,
             device: torch.device) -> EpisodeSampler:
    """An Omniglot episode sampler on the Vinyals ``split`` with its own generator seeded ``seed``."""
    images, labels = _omniglot(split)
    return EpisodeSampler(images, labels, n_way=n_way, k_shot=k_shot, n_query=n_query, device=device,
                          generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- methods
@dataclass
class Method:
    """One method, built from a Config: the networks, the optimiser, one update and a predictor.

    ``step(tasks, step) -> metrics`` is one meta-update; ``predict(tasks, inner_steps) -> scores``
    (meta_batch, n_query_total, n_way) (or regression outputs) with the weights as they are now.
    ``modules`` (name → module) and ``tensors`` (name → dict of tensors) are what a checkpoint saves.
    """

    config: Config
    modules: dict[str, nn.Module]
    tensors: dict[str, dict[str, Tensor]]
    optimizer: torch.optim.Optimizer | None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    step: Callable[[TaskBatch, int], dict[str, float]]
    predict: Callable[[TaskBatch, int], Tensor]

    def weights(self) -> dict[str, Any]:
        """The trained weights (no optimiser state): what ``best.pt`` holds."""
        out: dict[str, Any] = {name: m.state_dict() for name, m in self.modules.items()}
        out.update({name: {k: t.detach().cpu().clone() for k, t in d.items()} for name, d in self.tensors.items()})
        return out

    def load_weights(self, saved: dict[str, Any]) -> None:
        """Load :meth:`weights` output; every module and tensor set must be present and of the same shapes."""
        expected = set(self.modules) | set(self.tensors)
        if set(saved) != expected:
            raise RunFolderError(f"saved weights hold {sorted(saved)}, this {self.config.method} model needs "
                                 f"{sorted(expected)}")
        for name, module in self.modules.items():
            module.load_state_dict(saved[name])
        with torch.no_grad():
            for name, d in self.tensors.items():
                if set(saved[name]) != set(d):
                    raise RunFolderError(f"saved {name} holds {sorted(saved[name])}, expected {sorted(d)}")
                for k, t in d.items():
                    if saved[name][k].shape != t.shape:
                        raise RunFolderError(f"saved {name}[{k!r}] has shape {tuple(saved[name][k].shape)}, "
                                             f"the model {tuple(t.shape)}")
                    t.copy_(saved[name][k])


COMPILED_METHODS = ("maml", "fomaml", "metasgd", "anil")   # whose update can use mlcore.compiled


def build(config: Config, device: torch.device | str = "cpu", *, compile: bool | str = False) -> Method:
    """The networks (initialised from ``config.seed``), optimiser, schedule, update and predictor.

    ``compile`` (MAML, FOMAML, Meta-SGD, ANIL): each update takes the compiled meta-gradient of
    :mod:`mlcore.compiled` (``True`` or a torch.compile mode); the same gradient, compiled on the first step.
    """
    device = torch.device(device)
    c = config
    mode = compiled.resolve_mode(compile)
    if mode is not None and c.method not in COMPILED_METHODS:
        raise ValueError(f"compile applies to the MAML family {COMPILED_METHODS}, whose meta-gradient it compiles; "
                         f"{c.method} has none: train it without compile")
    torch.manual_seed(c.seed)                                  # network initialisation only
    regression = c.dataset == "sine"
    loss_fn = F.mse_loss if regression else F.cross_entropy
    if regression:
        model = MLP(1, (40, 40), 1).to(device)
    elif c.method in GRADIENT_METHODS:
        model = Conv4(1, c.n_way, hidden=c.hidden, norm=c.norm).to(device)
    else:
        model = Conv4(1, None, hidden=c.hidden, norm=c.norm).to(device)
        if device.type == "cpu":
            # Measured on a 2-core CPU: a 60-way episode's forward+backward 0.66 s -> 0.52 s with
            # channels-last weights (oneDNN's preferred layout); the values agree to float32 rounding.
            model = model.to(memory_format=torch.channels_last)
    modules: dict[str, nn.Module] = {"model": model}
    tensors: dict[str, dict[str, Tensor]] = {}
    learnable = list(model.parameters())
    if c.method == "matching-fce":
        modules["fce"] = matching.FullContextEmbedding(model.embedding_dim, c.fce_steps).to(device)
        learnable += list(modules["fce"].parameters())
    params = dict(model.named_parameters())
    if c.method == "metasgd":
        tensors["inner_lrs"] = metasgd.init_inner_lrs(params, c.inner_lr)
        learnable += list(tensors["inner_lrs"].values())
    optimizer = None if c.method == "reptile" else torch.optim.Adam(learnable, lr=c.meta_lr)
    scheduler = None
    if optimizer is not None and c.lr_halve_every:
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=c.lr_halve_every, gamma=0.5)

    def outer_step(result: family.Step) -> dict[str, float]:
        if scheduler is not None:
            scheduler.step()
        return {"loss": result.loss} if result.accuracy is None else {"loss": result.loss, "acc": result.accuracy}

    inner = dict(loss_fn=loss_fn, inner_lr=c.inner_lr, inner_steps=c.inner_steps)
    if c.method in ("maml", "fomaml"):
        def step(tasks: TaskBatch, i: int) -> dict[str, float]:
            return outer_step(maml.train_step(model, params, optimizer, tasks, **inner,
                                              first_order=c.method == "fomaml", compile=compile))

        def predict(tasks: TaskBatch, steps: int) -> Tensor:
            return maml.predict(model, params, tasks, loss_fn=loss_fn, inner_lr=c.inner_lr, inner_steps=steps)
    elif c.method == "anil":
        def step(tasks: TaskBatch, i: int) -> dict[str, float]:
            return outer_step(anil.train_step(model, params, optimizer, tasks, head="head", **inner, compile=compile))

        def predict(tasks: TaskBatch, steps: int) -> Tensor:
            return anil.predict(model, params, tasks, head="head", loss_fn=loss_fn, inner_lr=c.inner_lr,
                                inner_steps=steps)
    elif c.method == "metasgd":
        lrs = tensors["inner_lrs"]

        def step(tasks: TaskBatch, i: int) -> dict[str, float]:
            return outer_step(metasgd.train_step(model, params, optimizer, tasks, loss_fn=loss_fn, inner_lr=lrs,
                                                 inner_steps=c.inner_steps, compile=compile))

        def predict(tasks: TaskBatch, steps: int) -> Tensor:
            return metasgd.predict(model, params, tasks, loss_fn=loss_fn, inner_lr=lrs, inner_steps=steps)
    elif c.method == "reptile":
        adam = dict(optimizer=c.reptile_inner, adam_betas=(0.0, 0.999))

        def step(tasks: TaskBatch, i: int) -> dict[str, float]:
            # Nichol et al.: the outer step size falls linearly from eps to eps_final over the run.
            eps = c.reptile_eps + (c.reptile_eps_final - c.reptile_eps) * i / max(c.steps, 1)
            new = reptile.reptile_step(model, params, tasks, **inner, outer_lr=eps, **adam)
            with torch.no_grad():  # the meta-update itself: θ ← θ + ε (mean θ' − θ)
                for name, p in params.items():
                    p.copy_(new[name])
            return {"eps": eps}

        def predict(tasks: TaskBatch, steps: int) -> Tensor:
            return reptile.predict(model, params, tasks, loss_fn=loss_fn, inner_lr=c.inner_lr, inner_steps=steps,
                                   **adam)
    elif c.method == "protonet":
        def step(tasks: TaskBatch, i: int) -> dict[str, float]:
            return outer_step(protonet.train_step(model, optimizer, tasks))

        def predict(tasks: TaskBatch, steps: int) -> Tensor:
            with torch.no_grad():
                return protonet.predict(model, tasks)
    else:  # matching, matching-fce
        fce = modules.get("fce")

        def step(tasks: TaskBatch, i: int) -> dict[str, float]:
            return outer_step(matching.train_step(model, optimizer, tasks, fce=fce, scale=c.matching_scale))

        def predict(tasks: TaskBatch, steps: int) -> Tensor:
            with torch.no_grad():
                return matching.predict(model, tasks, fce=fce, scale=c.matching_scale)
    return Method(c, modules, tensors, optimizer, scheduler, step, predict)


def one_query_at_a_time(predict: Callable[[TaskBatch], Tensor], chunk: int = 512) -> Callable[[TaskBatch], Tensor]:
    """Non-transductive prediction: every query is classified in an episode of its own.

    An episode with Q queries becomes Q episodes holding the same support set and one query each, so
    batch statistics (``Conv4(norm="batch")``) never mix two queries: a prediction depends on the
    support set and that query only, as in deployment (Nichol et al. 2018's non-transductive setting).
    What the statistics are then computed over depends on the method: Prototypical and Matching
    Networks embed support and query together (support set + one query); MAML-style methods adapt on
    the support set and classify the query in a batch of one. ``chunk`` bounds how many one-query
    episodes run at once.
    """
    def wrapped(tasks: TaskBatch) -> Tensor:
        b, q = tasks.y_query.shape
        xs = tasks.x_support.repeat_interleave(q, dim=0)                 # (B·q, n_support, ...)
        ys = tasks.y_support.repeat_interleave(q, dim=0)                 # (B·q, n_support)
        xq = tasks.x_query.reshape(b * q, 1, *tasks.x_query.shape[2:])   # (B·q, 1, ...)
        yq = tasks.y_query.reshape(b * q, 1)
        outs = [predict(TaskBatch(xs[i:i + chunk], ys[i:i + chunk], xq[i:i + chunk], yq[i:i + chunk]))
                for i in range(0, b * q, chunk)]
        out = torch.cat(outs)                                            # (B·Q, 1, n_way)
        return out.reshape(b, q, *out.shape[2:])
    return wrapped


#: Layers whose output for one example depends on the other examples of its batch.
BATCH_STATISTICS = (nn.modules.batchnorm._BatchNorm, BatchStatNorm2d, PerStepBatchNorm2d)


def mixes_examples(method: Method) -> bool:
    """Whether any network of ``method`` holds a layer that computes statistics over the batch.

    Without one (``Conv4(norm="group")`` or ``norm="none"``) a query's prediction depends
    on the support set and that query alone, in any batch: the transductive and non-transductive
    protocols give the same predictions, and :func:`evaluate_model` scores the non-transductive
    protocol in one batch instead of one forward pass per query (a 20-way episode with 15 queries per
    class would otherwise embed its support set 300 times). A ``BatchNorm`` in eval mode counts as
    mixing too: the per-query path is always right, only slower.
    """
    return any(isinstance(layer, BATCH_STATISTICS)
               for module in method.modules.values() for layer in module.modules())


# ----------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class Protocol:
    """How a model is scored: split, ways, shots, queries per class, episodes, inner steps, transduction."""

    split: str
    n_way: int
    k_shot: int
    n_query: int
    episodes: int
    inner_steps: int
    transductive: bool
    seed: int

    @classmethod
    def of(cls, config: Config, split: str = "test", **overrides: Any) -> Protocol:
        values = dict(split=split, n_way=config.eval_n_way, k_shot=config.eval_k_shot, n_query=config.test_n_query,
                      episodes=config.test_episodes, inner_steps=config.test_inner_steps,
                      transductive=config.transductive, seed=TEST_SEED)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if config.method not in GRADIENT_METHODS:
            values["inner_steps"] = 0                    # metric methods do not adapt
        if config.dataset == "sine":
            values.update(n_way=0, transductive=True)    # regression: no ways; an MLP has no batch statistics
        return cls(**values)

    def describe(self) -> str:
        if self.n_way == 0:
            return (f"sine {self.k_shot}-shot, {self.n_query} query points, {self.episodes} tasks, "
                    f"{self.inner_steps} inner steps")
        steps = f", {self.inner_steps} inner steps" if self.inner_steps else ""
        return (f"{self.n_way}-way {self.k_shot}-shot, {self.n_query} queries/class, {self.episodes} episodes"
                f"{steps}, {'transductive' if self.transductive else 'non-transductive'} ({self.split})")


def evaluate_model(method: Method, protocol: Protocol, *, device: torch.device | str = "cpu",
                   progress: bool = False, meta_batch: int = 20) -> dict[str, Any]:
    """Score ``method``'s current weights with ``protocol``: mean ± 95% CI over episodes, time per episode."""
    c = method.config
    device = torch.device(device)
    started = time.perf_counter()
    if c.dataset == "sine":
        sine = SineTasks()
        tasks, _, _ = sine.fixed_eval_set(protocol.episodes, protocol.k_shot, protocol.n_query,
                                          seed=protocol.seed + (1 if protocol.split == "test" else 2), device=device)
        errors = []
        for i in range(0, protocol.episodes, meta_batch):
            part = tasks[i:i + meta_batch]
            out = method.predict(part, protocol.inner_steps)
            errors.append((out - part.y_query).square().mean(dim=(1, 2)).detach().cpu().double())
        per_task = torch.cat(errors)
        n = per_task.numel()
        mean, ci = per_task.mean().item(), 1.96 * per_task.std(correction=1).item() / math.sqrt(n)
        return {"metric": "mse", "mean": mean, "ci95": ci, "n_episodes": n,
                "seconds_per_episode": (time.perf_counter() - started) / n}
    sampler = episodes(protocol.split, n_way=protocol.n_way, k_shot=protocol.k_shot, n_query=protocol.n_query,
                       seed=protocol.seed, device=device)

    def predict(tasks: TaskBatch) -> Tensor:
        return method.predict(tasks, protocol.inner_steps)

    # Non-transductive: one query per episode, unless no layer mixes examples (then the same predictions).
    per_query = not protocol.transductive and mixes_examples(method)
    scorer = one_query_at_a_time(predict) if per_query else predict
    acc: Accuracy = evaluate(scorer, sampler, n_episodes=protocol.episodes, meta_batch=meta_batch,
                             seed=protocol.seed, progress=progress)
    return {"metric": "accuracy", "mean": acc.mean, "ci95": acc.ci95, "n_episodes": acc.n_episodes,
            "seconds_per_episode": (time.perf_counter() - started) / acc.n_episodes}


def _validate(method: Method, device: torch.device) -> tuple[str, float, float]:
    """(metric name, value, score to maximise) on the fixed validation episodes."""
    c = method.config
    protocol = Protocol.of(c, "val", episodes=c.val_episodes, seed=c.seed + VAL_SEED_OFFSET)
    result = evaluate_model(method, protocol, device=device)
    if result["metric"] == "mse":
        return "val_mse", result["mean"], -result["mean"]
    return "val_acc", result["mean"], result["mean"]


# ----------------------------------------------------------------------------------------- training
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{path} cannot be read as JSON ({err}); is this an mlcore run folder?") from err


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (a crash leaves the old file)."""
    text = json.dumps(obj, indent=1, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def check_run_folder(out: Path, config: Config) -> None:
    """Refuse to mix two runs in one folder: the saved config must equal ``config`` except for ``steps``."""
    saved_path = out / "config.json"
    if not saved_path.exists():
        if (out / "checkpoint.pt").exists():
            raise RunFolderError(f"{out} holds checkpoint.pt but no config.json; it was not written by "
                                 f"mlcore.train. Use another --out folder.")
        return
    saved = Config.from_dict(_read_json(saved_path)["config"])
    diff = {k: (v, getattr(config, k)) for k, v in saved.to_dict().items()
            if k not in ("steps", "source") and getattr(config, k) != v}
    if diff:
        lines = ", ".join(f"{k}: {old!r} in the folder, {new!r} now" for k, (old, new) in sorted(diff.items()))
        raise RunFolderError(f"{out} already holds a run with other settings ({lines}). Continue it with the "
                             f"same settings (only --steps may change), or train into another --out folder.")


class TimeLimitReached(Exception):
    """Raised inside the loop when ``time_limit`` has passed, right after a checkpoint (nothing lost)."""


def train(config: Config, out: str | os.PathLike, *, device: torch.device | str = "cpu", progress: bool = True,
          command: list[str] | None = None, time_limit: float | None = None, compile: bool | str = False) -> History:
    """Train ``config`` into the run folder ``out``, resuming from its checkpoint if there is one.

    Returns the run's History (every step's metrics; ``val_acc``/``val_mse`` where validated).
    Interrupting (Ctrl-C) loses at most ``checkpoint_every`` steps; run the same command again to
    continue. ``time_limit`` (seconds of this session) stops cleanly at the first checkpoint after it
    has passed, so a session of fixed length (a shared machine, a GPU lease) loses no work; the
    History then ends there. Each session appends a line to ``sessions.jsonl``. ``compile``: the
    meta-updates take the compiled meta-gradient (:func:`build`); recorded in the session's line (compiled
    and eager float32 gradients differ by rounding, so a run resumed the other way is not bit-identical).
    """
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                   or not time_limit > 0):
        raise ValueError(f"time_limit must be a positive number of seconds or None, got {time_limit!r}")
    out = Path(out)
    device = torch.device(device)
    check_run_folder(out, config)
    write_json(out / "config.json", {"format": "mlcore.run/1", "config": config.to_dict()})
    method = build(config, device, compile=compile)
    c = config
    if c.dataset == "sine":
        sine = SineTasks()
        generator = torch.Generator().manual_seed(c.seed)

        def sample() -> TaskBatch:
            return sine.sample(c.meta_batch, c.k_shot, c.n_query, generator=generator, device=device)
    else:
        sampler = episodes("train", n_way=c.n_way, k_shot=c.k_shot, n_query=c.n_query, seed=c.seed, device=device)
        generator = sampler.generator

        def sample() -> TaskBatch:
            return sampler.sample(c.meta_batch)
    best = torch.tensor([-math.inf, -1.0], dtype=torch.float64)   # (best score, its step)
    state: dict[str, Any] = {"modules": method.modules, "tensors": method.tensors, "episodes": generator,
                             "best": best}
    if method.optimizer is not None:
        state["optimizer"] = method.optimizer
    if method.scheduler is not None:
        state["scheduler"] = method.scheduler

    def step_fn(i: int) -> dict[str, float]:
        if deadline is not None and i > 0 and i % c.checkpoint_every == 0 and time.perf_counter() > deadline:
            raise TimeLimitReached  # step i is not started: the checkpoint of step i holds everything
        metrics = method.step(sample(), i)
        if (i + 1) % c.val_every == 0 or i + 1 == c.steps:
            name, value, score = _validate(method, device)
            metrics[name] = value
            if score > best[0]:
                best[0], best[1] = score, i + 1
                save_model(out / "best.pt", method, step=i + 1, metric=name, value=value)
        return metrics

    checkpoint = out / "checkpoint.pt"
    first = _checkpoint_step(checkpoint)
    started, wall0 = datetime.now(timezone.utc), time.perf_counter()
    deadline = None if time_limit is None else wall0 + time_limit
    history = None
    try:
        history = meta_train(step_fn, n_steps=c.steps, state=state, checkpoint=checkpoint,
                             checkpoint_every=c.checkpoint_every, progress=progress,
                             desc=c.preset or c.method, log_every=10)
    except TimeLimitReached:
        history = read_history(out)
    finally:
        last = _checkpoint_step(checkpoint)
        if last != first or history is not None:
            _append_session(out / "sessions.jsonl", {
                "started": started.isoformat(timespec="seconds"),
                "ended": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "steps_from": first, "steps_to": last, "session_seconds": round(time.perf_counter() - wall0, 1),
                "device": device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "compile": compiled.resolve_mode(compile) or False,
                "python": platform.python_version(), "command": command or sys.argv})
    return history


def _checkpoint_step(path: Path) -> int:
    if not path.exists():
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True)["step"])


def _append_session(path: Path, entry: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def save_model(path: Path, method: Method, *, step: int, metric: str, value: float) -> None:
    """Save the current weights with their config and validation score (``best.pt``), atomically."""
    payload = {"format": MODEL_FORMAT, "config": method.config.to_dict(), "step": step, "val_metric": metric,
               "val_value": value, "weights": method.weights()}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[Method, dict[str, Any]]:
    """(Method with the saved weights, the file's metadata) from a ``best.pt``, or a run folder holding one."""
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a run folder written by 'mlcore train' (it holds "
                                f"best.pt once the first validation has run) or a best.pt file")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise RunFolderError(f"{path} cannot be read as a saved model ({type(err).__name__}: {err})") from err
    if not isinstance(saved, dict) or saved.get("format") != MODEL_FORMAT:
        what = "a training checkpoint (checkpoint.pt); evaluate best.pt" if isinstance(saved, dict) and \
            saved.get("format", "").startswith("mlcore.train") else "not an mlcore saved model"
        raise RunFolderError(f"{path} is {what} (expected format {MODEL_FORMAT!r})")
    method = build(Config.from_dict(saved["config"]), device)
    method.load_weights(saved["weights"])
    meta = {k: v for k, v in saved.items() if k != "weights"}
    return method, meta


def evaluate_run(path: str | os.PathLike, *, device: torch.device | str = "cpu", split: str = "test",
                 record: bool = True, progress: bool = False, command: list[str] | None = None,
                 **overrides: Any) -> tuple[Method, dict[str, Any], Protocol, dict[str, Any]]:
    """Evaluate a run folder's ``best.pt`` (or a given saved model) and, with ``record``, update the
    run's results record. ``overrides``: ``n_way``, ``k_shot``, ``n_query``, ``episodes``,
    ``inner_steps``, ``transductive``, ``seed`` (``None`` keeps the preset's value).

    Returns (method, saved metadata, protocol, result). Raises :class:`RunFolderError` or
    ``ValueError`` (naming what is wrong) before anything is evaluated.
    """
    from .results import update_record
    device = torch.device(device)
    path = Path(path)
    method, meta = load_model(path, device)
    protocol = Protocol.of(method.config, split, **overrides)
    # The same checks as a preset's test protocol (shots + queries per class, ways of the head).
    Config(**{**method.config.to_dict(), "test_n_way": protocol.n_way, "test_k_shot": protocol.k_shot,
              "test_n_query": protocol.n_query, "test_episodes": protocol.episodes})
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = evaluate_model(method, protocol, device=device, progress=progress)
    if record:
        run = path if path.is_dir() else path.parent
        evaluation = {"protocol": dict(vars(protocol)), **result, "device": device_name(device),
                      "torch": torch.__version__, "date": started, "command": command or sys.argv}
        history = read_history(run) if (run / "checkpoint.pt").exists() else None
        update_record(run, evaluation, checkpoint=run / "best.pt" if path.is_dir() else path,
                      checkpoint_meta=meta, history=history)
    return method, meta, protocol, result


def read_history(out: str | os.PathLike) -> History:
    """The History saved in a run folder's checkpoint."""
    checkpoint = Path(out) / "checkpoint.pt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return History.from_state_dict(saved["history"])


__all__ += ["Protocol", "episodes", "read_history", "write_json", "check_run_folder", "save_model",
            "TimeLimitReached", "evaluate_run"]
