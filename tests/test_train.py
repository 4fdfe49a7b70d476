"""mlcore.train: a resumed run equals the uninterrupted run; checkpoints are atomic and checked."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mlcore.maml import meta_loss
from mlcore.models import MLP
from mlcore.tasks import SineTasks
from mlcore.train import CheckpointMismatchError, History, load_checkpoint, meta_train, save_checkpoint


class Crash(RuntimeError):
    pass


def make_run(init_seed: int = 0, crash_at: int | None = None):
    """A small MAML sine run: (step_fn, state, params). Every random draw is inside ``state``."""
    torch.manual_seed(init_seed)
    model = MLP(1, (8,), 1)
    params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    g = torch.Generator().manual_seed(123 + init_seed)
    sampler = SineTasks()
    tasks_seen = torch.tensor(0)                   # a counter: a tensor, restored in place

    def step_fn(step: int) -> dict[str, float]:
        if step == crash_at:
            raise Crash(f"simulated crash at step {step}")
        tasks = sampler.sample(4, 5, 5, generator=g)
        loss = meta_loss(model, params, tasks, loss_fn=F.mse_loss, inner_lr=0.01, inner_steps=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tasks_seen.add_(4)
        noise = torch.randn(()).item()  # the global RNG: restored by resume as well
        metrics = {"loss": loss.item(), "noise": noise}
        if step % 3 == 0:
            metrics["every3"] = float(step)  # a metric not returned at every step
        return metrics

    state = {"params": params, "opt": opt, "generator": g, "counters": {"tasks_seen": tasks_seen}}
    return step_fn, state, params


def test_resume_equals_uninterrupted(tmp_path):
    torch.manual_seed(7)
    step_fn, _, params = make_run()
    straight = meta_train(step_fn, n_steps=10, progress=False)

    ckpt = tmp_path / "run.pt"
    torch.manual_seed(7)
    step_fn, state, _ = make_run(crash_at=7)
    with pytest.raises(Crash):
        meta_train(step_fn, n_steps=10, state=state, checkpoint=ckpt, checkpoint_every=3, progress=False)
    assert load_checkpoint(ckpt, make_run()[1])[0] == 6  # saved after steps 3 and 6; step 7 crashed

    torch.manual_seed(999)  # a fresh process: other global RNG, other initial weights, other generator
    step_fn, state, resumed_params = make_run(init_seed=5)
    tensors_before = {n: id(p) for n, p in resumed_params.items()}
    resumed = meta_train(step_fn, n_steps=10, state=state, checkpoint=ckpt, checkpoint_every=3, progress=False)

    assert {n: id(p) for n, p in resumed_params.items()} == tensors_before  # restored in place
    for name, p in params.items():
        assert torch.equal(p, resumed_params[name]), name
    assert resumed.steps == straight.steps == list(range(10))
    assert resumed.keys() == straight.keys()
    for key in straight.keys():
        assert resumed[key] == pytest.approx(straight[key], nan_ok=True, rel=0, abs=0), key
    assert state["counters"]["tasks_seen"] == 40
    assert resumed.series("every3") == ([0, 3, 6, 9], [0.0, 3.0, 6.0, 9.0])
    assert all(b >= a for a, b in zip(resumed.wall_time, resumed.wall_time[1:]))


def test_finished_run_returns_its_history(tmp_path):
    ckpt = tmp_path / "run.pt"
    step_fn, state, _ = make_run()
    first = meta_train(step_fn, n_steps=4, state=state, checkpoint=ckpt, progress=False)
    step_fn, state, _ = make_run(crash_at=0)  # would crash if any step ran again
    again = meta_train(step_fn, n_steps=4, state=state, checkpoint=ckpt, progress=False)
    assert again["loss"] == first["loss"]
    with pytest.raises(ValueError, match="past n_steps=3"):
        meta_train(step_fn, n_steps=3, state=state, checkpoint=ckpt, progress=False)


def test_atomic_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = tmp_path / "run.pt"
    step_fn, state, _ = make_run()
    meta_train(step_fn, n_steps=2, state=state, checkpoint=ckpt, progress=False)
    good = ckpt.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(ckpt, state, 99, History())
    assert ckpt.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.pt"]  # no temporary file left behind
    monkeypatch.undo()
    assert load_checkpoint(ckpt, make_run()[1])[0] == 2


def test_mismatched_checkpoint_raises(tmp_path):
    ckpt = tmp_path / "run.pt"
    step_fn, state, _ = make_run()
    meta_train(step_fn, n_steps=1, state=state, checkpoint=ckpt, progress=False)

    _, state, _ = make_run()
    del state["opt"]
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint \[\].*only in the checkpoint \['opt'\]"):
        meta_train(step_fn, n_steps=2, state=state, checkpoint=ckpt, progress=False)

    _, state, _ = make_run()
    state["params"]["body.0.weight"] = torch.zeros(16, 1, requires_grad=True)
    with pytest.raises(CheckpointMismatchError, match=r"state\['params'\]\['body.0.weight'\].*\(8, 1\).*\(16, 1\)"):
        meta_train(step_fn, n_steps=2, state=state, checkpoint=ckpt, progress=False)

    _, state, _ = make_run()
    state["generator"] = {"not": torch.zeros(1)}   # a dict where the checkpoint holds a generator
    with pytest.raises(CheckpointMismatchError, match="generator"):
        meta_train(step_fn, n_steps=2, state=state, checkpoint=ckpt, progress=False)

    # resume=False ignores (and overwrites) the checkpoint
    _, state, _ = make_run()
    del state["opt"]
    meta_train(step_fn, n_steps=1, state=state, checkpoint=ckpt, resume=False, progress=False)


def test_progress_bar_shows_metrics_and_can_be_off(capsys):
    step_fn, state, _ = make_run()
    meta_train(step_fn, n_steps=3, state=state, progress=False)
    assert capsys.readouterr().err == ""
    meta_train(step_fn, n_steps=3, state=state, progress=True, desc="sine")
    err = capsys.readouterr().err
    assert "sine" in err and "loss=" in err and "3/3" in err


def test_bad_arguments_fail_loudly():
    with pytest.raises(TypeError, match="dict of metrics"):
        meta_train(lambda step: 1.0, n_steps=1, progress=False)
    with pytest.raises(TypeError, match="metric 'x' at step 0 is a str"):
        meta_train(lambda step: {"x": "high"}, n_steps=1, progress=False)
    with pytest.raises(TypeError, match="cannot checkpoint a object"):
        meta_train(lambda step: {}, n_steps=1, state={"thing": object()}, progress=False)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer"):
        meta_train(lambda step: {}, n_steps=1, checkpoint_every=0, progress=False)


def test_history_plots_easily():
    h = meta_train(lambda step: {"loss": torch.tensor(1.0 / (step + 1), dtype=torch.float64)}, n_steps=4,
                   progress=False)
    assert h.steps == [0, 1, 2, 3] and h["loss"] == [1.0, 0.5, 1 / 3, 0.25] and len(h) == 4
    assert "loss" in h and "acc" not in h
    with pytest.raises(KeyError, match="no metric 'acc'"):
        h["acc"]
    assert not any(math.isnan(t) for t in h.wall_time)


def test_atomic_write_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    from mlcore.train import atomic_write
    target = tmp_path / "file.bin"
    atomic_write(target, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path):
    from mlcore.train import atomic_write
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_bytes(b"keep me")
    link = tmp_path / "checkpoint.pt"
    link.symlink_to(elsewhere)
    atomic_write(link, lambda f: f.write(b"new"))
    assert elsewhere.read_bytes() == b"keep me" and not link.is_symlink() and link.read_bytes() == b"new"


def test_a_failed_resume_changes_nothing(tmp_path):
    """The checkpoint fits the model but not the optimiser: the weights must stay as they were."""
    path = tmp_path / "run.pt"
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(path, {"model": model, "opt": opt, "w": torch.zeros(2)}, 5, History())
    fresh = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    w = torch.ones(2)
    other_opt = torch.optim.Adam([*fresh.parameters(), torch.zeros(1, requires_grad=True)])  # 3 params, not 2
    with pytest.raises(CheckpointMismatchError, match="left as it was"):
        load_checkpoint(path, {"model": fresh, "opt": other_opt, "w": w})
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    assert torch.equal(w, torch.ones(2))


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None])
def test_an_unreadable_checkpoint_is_named_with_the_way_out(tmp_path, content):
    path = tmp_path / "run.pt"
    if content is None:  # a truncated real checkpoint
        save_checkpoint(path, {"w": torch.zeros(1000)}, 1, History())
        path.write_bytes(path.read_bytes()[:500])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointMismatchError, match=r"run\.pt cannot be read.*Delete it"):
        load_checkpoint(path, {"w": torch.zeros(1000)})


@pytest.mark.parametrize("value", [(1, 10**20), 3, 0.5, "name", None, [torch.zeros(1), 2]])
def test_plain_values_and_tuples_are_refused_before_training(tmp_path, value):
    """A resume restores in place; a number (or a tuple) cannot be, so it is refused before step 0."""
    with pytest.raises(TypeError, match=r"cannot be checkpointed.*tensor updated in place.*metadata="):
        meta_train(lambda step: {}, n_steps=1, state={"counts": value}, checkpoint=tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_metadata_is_stored_and_a_resume_with_other_metadata_is_refused(tmp_path):
    ckpt = tmp_path / "run.pt"
    w = torch.zeros(2)

    def step_fn(step):
        w.add_(1.0)
        return {}
    meta_train(step_fn, n_steps=2, state={"w": w}, checkpoint=ckpt, progress=False, metadata={"lr": 0.1, "k": 1})
    assert torch.load(ckpt, weights_only=True)["metadata"] == {"lr": 0.1, "k": 1}
    with pytest.raises(CheckpointMismatchError, match=r"other settings \(lr: 0.1 there, 0.2 here\)"):
        meta_train(step_fn, n_steps=4, state={"w": w}, checkpoint=ckpt, progress=False, metadata={"lr": 0.2, "k": 1})
    assert torch.equal(w, torch.full((2,), 2.0))                      # nothing restored, nothing trained
    meta_train(step_fn, n_steps=4, state={"w": w}, checkpoint=ckpt, progress=False, metadata={"lr": 0.1, "k": 1})
    assert torch.equal(w, torch.full((2,), 4.0))                      # the same settings resume


def test_checkpoint_path_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    meta_train(lambda step: {}, n_steps=1, state={"w": torch.zeros(1)}, checkpoint="~/runs/x.pt", progress=False)
    assert (tmp_path / "runs" / "x.pt").exists() and not (tmp_path / "~").exists()
