"""The one reusable training loop of mlcore: progress bar, metric history, resumable checkpoints.

The loop knows nothing about meta-learning. The caller writes one meta-update as a closure,

    def step_fn(step: int) -> dict[str, float]:
        tasks = sampler.sample(meta_batch, k_shot, n_query, generator=g)
        loss = meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=0.01, inner_steps=1)
        opt.zero_grad(); loss.backward(); opt.step()
        return {"loss": loss.item()}

    history = meta_train(step_fn, n_steps=10_000, state={"params": params, "opt": opt, "tasks": g},
                         checkpoint="runs/sine.pt")
    plt.plot(history.steps, history["loss"])

and :func:`meta_train` calls it for steps 0 … n_steps−1, records what it returns, shows a tqdm bar with
the latest metrics, and every ``checkpoint_every`` steps writes ``state``, the step and the history to
``checkpoint`` (atomically: a crash mid-write leaves the previous checkpoint intact). Calling it again
with the same checkpoint resumes after the last saved step, with everything in ``state`` restored, so
that a resumed run reproduces the uninterrupted run exactly.

What ``state`` may hold (name → object), and how each is saved and restored:

==========================================  ==========================================================
object                                      restored by
==========================================  ==========================================================
``Tensor``                                  copying the values into the SAME tensor (in place)
``torch.Generator``                         ``get_state`` / ``set_state``
optimiser, scheduler, ``nn.Module``…        ``state_dict`` / ``load_state_dict``
dict / list of any of these                 entry by entry (same keys / length)
==========================================  ==========================================================

Everything is restored in place, because the caller (and an optimiser) hold references to these
objects: a new object would be invisible to them. So a plain number cannot be state: keep a counter or
a best-so-far score in a tensor (``torch.tensor(0.0)``, updated in place), and fixed settings (a config)
in ``metadata``, which the checkpoint stores and a resume compares. The global torch RNG states (CPU,
and CUDA when initialised) are saved and restored too, so code that draws from them (dropout,
``torch.randn`` without a generator) also resumes exactly.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

__all__ = ["History", "meta_train", "save_checkpoint", "load_checkpoint", "CheckpointMismatchError", "atomic_write"]

FORMAT = "mlcore.train/1"
StepFn = Callable[[int], Mapping[str, Any]]


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the ``state`` it is restored into (other keys, shapes or kinds)."""


class History:
    """Metrics of a training run: ``history["loss"]`` is a list aligned with ``history.steps``.

    ``wall_time[i]`` is the training time in seconds at the end of ``steps[i]``, summed over resumed
    sessions. A metric that a step did not return is recorded as nan there (e.g. a validation accuracy
    computed every 100 steps); :meth:`series` drops those gaps.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.wall_time: list[float] = []
        self.metrics: dict[str, list[float]] = {}

    def append(self, step: int, metrics: Mapping[str, float], wall_time: float) -> None:
        for name in metrics:
            self.metrics.setdefault(name, [math.nan] * len(self.steps))
        for name, values in self.metrics.items():
            values.append(metrics.get(name, math.nan))
        self.steps.append(step)
        self.wall_time.append(wall_time)

    def __getitem__(self, name: str) -> list[float]:
        if name not in self.metrics:
            raise KeyError(f"no metric {name!r} in the history; it has {sorted(self.metrics)}")
        return self.metrics[name]

    def __contains__(self, name: object) -> bool:
        return name in self.metrics

    def __len__(self) -> int:
        return len(self.steps)

    def keys(self) -> list[str]:
        return list(self.metrics)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``name`` where it was recorded (nan gaps removed), ready to plot."""
        pairs = [(s, v) for s, v in zip(self.steps, self[name], strict=True) if not math.isnan(v)]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "wall_time": list(self.wall_time),
                "metrics": {k: list(v) for k, v in self.metrics.items()}}

    @classmethod
    def from_state_dict(cls, saved: Mapping[str, Any]) -> History:
        history = cls()
        history.steps, history.wall_time = list(saved["steps"]), list(saved["wall_time"])
        history.metrics = {k: list(v) for k, v in saved["metrics"].items()}
        return history

    def __repr__(self) -> str:
        return f"History({len(self)} steps, metrics {self.keys()}, {self.wall_time[-1] if self else 0:.1f} s)"


# ----------------------------------------------------------------------------- capture and restore
def _capture(obj: Any, where: str, snapshot: bool = True, deep: bool = False) -> Any:
    """A picklable snapshot of ``obj`` (see the module docstring for what is accepted).

    ``snapshot=False`` only checks that ``obj`` can be checkpointed, without copying anything.
    ``deep=True`` also copies the tensors of ``state_dict()``s (which share storage with a module's
    parameters): a snapshot that later in-place restores cannot change, used to roll back.
    """
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone() if snapshot else None  # clone: save this tensor, not its whole storage
    if isinstance(obj, torch.Generator):
        return {"__generator__": obj.get_state() if snapshot else None}
    if isinstance(obj, Mapping):
        return {k: _capture(v, f"{where}[{k!r}]", snapshot, deep) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_capture(v, f"{where}[{i}]", snapshot, deep) for i, v in enumerate(obj)]
    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
        if not snapshot:
            return {"__state_dict__": None}
        return {"__state_dict__": copy.deepcopy(obj.state_dict()) if deep else obj.state_dict()}
    if obj is None or isinstance(obj, (bool, int, float, str, tuple)):
        kind = type(obj).__name__
        raise TypeError(f"state{where}: {'an' if kind[0] in 'aeiou' else 'a'} {kind} cannot be checkpointed, because a resume could "
                        f"not restore it in place (your code holds its own reference). Keep a counter or score "
                        f"in a tensor updated in place (torch.tensor(0.0)), a sequence in a list, and fixed "
                        f"settings in metadata=... (stored in the checkpoint and compared on resume)")
    raise TypeError(f"state{where}: cannot checkpoint a {type(obj).__name__}; state may hold tensors, "
                    f"torch.Generators, objects with state_dict()/load_state_dict() (optimisers, modules), "
                    f"and dicts/lists of these")


def _restore(live: Any, saved: Any, where: str) -> None:
    """Restore ``saved`` into ``live``, in place."""
    def mismatch(what: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"state{where}: {what}. Was the checkpoint written by a run with a "
                                       f"different configuration? Use another checkpoint path or resume=False.")

    if isinstance(live, Tensor):
        if not isinstance(saved, Tensor):
            raise mismatch(f"the checkpoint holds a {type(saved).__name__}, the state a tensor")
        if saved.shape != live.shape or saved.dtype != live.dtype:
            raise mismatch(f"the checkpoint's tensor is {tuple(saved.shape)} {saved.dtype}, the state's "
                           f"{tuple(live.shape)} {live.dtype}")
        # Checkpoint restore, not part of any differentiable computation: the values are overwritten
        # in place, under no_grad, so that optimisers keep pointing at the same tensor objects.
        with torch.no_grad():
            live.copy_(saved)
    elif isinstance(live, torch.Generator):
        if not (isinstance(saved, dict) and "__generator__" in saved):
            raise mismatch("the state holds a torch.Generator, the checkpoint does not")
        live.set_state(saved["__generator__"])
    elif isinstance(live, Mapping):
        if not isinstance(saved, Mapping) or "__generator__" in saved or "__state_dict__" in saved:
            raise mismatch("the state holds a dict, the checkpoint does not")
        missing, unexpected = sorted(set(live) - set(saved), key=str), sorted(set(saved) - set(live), key=str)
        if missing or unexpected:
            raise mismatch(f"keys differ: missing from the checkpoint {missing}, only in the checkpoint {unexpected}")
        for key in live:
            _restore(live[key], saved[key], f"{where}[{key!r}]")
    elif isinstance(live, list):
        if not isinstance(saved, list) or len(saved) != len(live):
            raise mismatch(f"the state holds a list of {len(live)}, the checkpoint "
                           f"{'a list of ' + str(len(saved)) if isinstance(saved, list) else type(saved).__name__}")
        for i, (v, s) in enumerate(zip(live, saved, strict=True)):
            _restore(v, s, f"{where}[{i}]")
    else:  # an object with load_state_dict (_capture accepted nothing else)
        if not (isinstance(saved, dict) and "__state_dict__" in saved):
            raise mismatch(f"the state holds a {type(live).__name__}, the checkpoint does not")
        live.load_state_dict(saved["__state_dict__"])


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, mode: int = 0o644) -> Path:
    """Write a file so that readers see either the old file or the whole new one, never a part.

    ``write(f)`` fills a fresh temporary file (opened ``"wb"``) created with a random name in the
    target folder (``tempfile.mkstemp``: no predictable name, no symlink followed); it is flushed and
    fsynced, given ``mode``, renamed over ``path`` (``os.replace`` is atomic), and the folder is
    fsynced so the rename survives a power cut. On any error the temporary file is removed and
    ``path`` is untouched. Shared by checkpoints, saved models, results records and the Omniglot cache.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)                       # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename durable (not possible on every OS / file system)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return path
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
    return path


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], step: int, history: History, *,
                    metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``state`` (after ``step`` steps), ``history`` and ``metadata`` (fixed settings: numbers,
    strings, lists and dicts of them) to ``path`` atomically (:func:`atomic_write`)."""
    path = Path(path).expanduser()
    payload = {"format": FORMAT, "step": step, "state": _capture(dict(state), ""),
               "history": history.state_dict(), "rng": _rng_states()}
    if metadata is not None:
        payload["metadata"] = dict(metadata)
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike, state: dict[str, Any], *,
                    metadata: Mapping[str, Any] | None = None) -> tuple[int, History]:
    """Restore ``state`` in place from ``path``; return (number of steps done, history).

    With ``metadata``, a checkpoint saved with other metadata (another configuration) is refused; one
    saved without any is accepted.

    All or nothing: if any entry does not fit (other keys, shapes, an optimiser of another kind), the
    entries restored so far are put back as they were before raising, so a failed resume never leaves
    freshly trained weights half-overwritten. A file that cannot be read (truncated, empty, not a
    checkpoint) raises :class:`CheckpointMismatchError` naming it.
    """
    path = Path(path).expanduser()
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle error, empty file: the same advice
        raise CheckpointMismatchError(
            f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); it is truncated, "
            f"empty or not a checkpoint. Delete it to start the run afresh, pass another checkpoint path, "
            f"or resume=False (which overwrites it).") from err
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise CheckpointMismatchError(f"{path} is not an mlcore.train checkpoint (format {FORMAT!r}); pass "
                                      f"another checkpoint path, or resume=False to overwrite it")
    for key in ("step", "state", "history", "rng"):
        if key not in saved:
            raise CheckpointMismatchError(f"checkpoint {path} has no {key!r} entry; it is damaged. Delete it "
                                          f"to start afresh or pass another path")
    if metadata is not None and saved.get("metadata") is not None and saved["metadata"] != dict(metadata):
        theirs, ours = saved["metadata"], dict(metadata)
        differ = sorted(k for k in set(theirs) | set(ours) if theirs.get(k, "∅") != ours.get(k, "∅"))
        what = "; ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ[:5])
        raise CheckpointMismatchError(f"checkpoint {path} was written with other settings ({what}). Use another "
                                      f"checkpoint path or resume=False.")
    keys, saved_keys = set(state), set(saved["state"])
    if keys != saved_keys:
        raise CheckpointMismatchError(
            f"checkpoint {path} holds state {sorted(saved_keys)} but the state passed has {sorted(keys)}: "
            f"missing from the checkpoint {sorted(keys - saved_keys)}, only in the checkpoint "
            f"{sorted(saved_keys - keys)}. Use another checkpoint path or resume=False.")
    before, rng_before = _capture(state, "", deep=True), _rng_states()   # to roll back a restore that fails midway
    try:
        _restore(state, saved["state"], "")
        _set_rng_states(saved["rng"])
        history = History.from_state_dict(saved["history"])
    except Exception as err:
        _restore(state, before, "")
        _set_rng_states(rng_before)
        if isinstance(err, CheckpointMismatchError):
            raise CheckpointMismatchError(f"{err} (checkpoint {path}; the state was left as it was)") from err
        raise CheckpointMismatchError(f"checkpoint {path} does not fit the state ({type(err).__name__}: {err}); "
                                      f"the state was left as it was. Use another checkpoint path or "
                                      f"resume=False.") from err
    return saved["step"], history


# ----------------------------------------------------------------------------- the loop
def meta_train(step_fn: StepFn, *, n_steps: int, state: dict[str, Any] | None = None,
               checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 100, resume: bool = True,
               progress: bool = True, desc: str | None = None, log_every: int = 1,
               metadata: Mapping[str, Any] | None = None) -> History:
    """Call ``step_fn(step)`` for step = 0 … n_steps−1 (or from a checkpoint's step on); return the History.

    Args:
        step_fn: one meta-update; returns metrics ``{name: number}`` (0-dim tensors are accepted).
        n_steps: total steps of the run (a resumed run continues up to the same total).
        state: what a checkpoint saves and a resume restores (see the module docstring); pass every
            object the step changes or draws from: parameters, optimisers, generators.
        checkpoint: file to save to and, if it exists and ``resume``, to resume from.
        checkpoint_every: save after every this many steps (and always after the last step).
        resume: ``False`` starts at step 0 even if ``checkpoint`` exists (and overwrites it).
        progress: show a tqdm bar (on stderr) with the latest metrics. In a notebook that nbval checks,
            pass ``False`` (the bar's timings change from run to run).
        log_every: refresh the bar's metrics every this many steps (every step's metrics are recorded).
        metadata: fixed settings (a config as a dict of plain values) stored in every checkpoint; a
            resume from a checkpoint stored with other metadata raises :class:`CheckpointMismatchError`.

    A run stopped by an exception can be resumed from its last checkpoint; steps after it are redone.
    A resume restores everything in ``state`` as it was saved, including an optimiser's learning rate:
    to change a hyper-parameter of a resumed run, set it after this call returns, or start a new run.
    """
    for name, value in (("n_steps", n_steps), ("checkpoint_every", checkpoint_every), ("log_every", log_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "n_steps" else 1):
            raise ValueError(f"{name} must be a {'non-negative' if name == 'n_steps' else 'positive'} integer, "
                             f"got {value!r}")
    state = {} if state is None else state
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict name -> object, got {type(state).__name__}")
    _capture(state, "", snapshot=False)  # fail now, not at the first checkpoint, if something cannot be saved
    if checkpoint is not None:
        checkpoint = Path(checkpoint).expanduser()   # "~/runs/x.pt" means the home folder, not ./~
    start, history = 0, History()
    if checkpoint is not None and resume and Path(checkpoint).exists():
        start, history = load_checkpoint(checkpoint, state, metadata=metadata)
        if start > n_steps:
            raise ValueError(f"checkpoint {checkpoint} is already at step {start}, past n_steps={n_steps}; "
                             f"pass n_steps >= {start} (or resume=False to start over)")
    elapsed = history.wall_time[-1] if history else 0.0
    bar = tqdm(total=n_steps, initial=start, desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for step in range(start, n_steps):
            began = time.perf_counter()
            metrics = _as_floats(step_fn(step), step)
            elapsed += time.perf_counter() - began
            history.append(step, metrics, elapsed)
            bar.update(1)
            if progress and (step + 1 - start) % log_every == 0:
                bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == n_steps):
                save_checkpoint(checkpoint, state, step + 1, history, metadata=metadata)
    finally:
        bar.close()
    return history


def _as_floats(metrics: Any, step: int) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"step_fn must return a dict of metrics {{name: number}}, got {type(metrics).__name__} "
                        f"at step {step}; return {{}} to record nothing")
    out = {}
    for name, value in metrics.items():
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"metric {name!r} at step {step} is a tensor of shape {tuple(value.shape)}; "
                                 f"return a number (e.g. loss.item())")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"metric {name!r} at step {step} is a {type(value).__name__}; metrics are numbers")
        out[str(name)] = float(value)
    return out


if __name__ == "__main__":  # python -m mlcore.train PRESET …  (see mlcore.cli)
    import sys

    from mlcore.cli import train_main
    sys.exit(train_main())
