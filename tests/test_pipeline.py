"""The training pipeline: presets, `python -m mlcore.train` / `mlcore.evaluate`, run folders, records.

Omniglot is replaced by a small synthetic data set (30 classes of 20 images, each class a noisy
template) so that every method trains for a few steps in well under a second; the real data is
used by the slow test at the end, which re-evaluates a committed checkpoint.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mlcore import cli, experiment, results
from mlcore.presets import METHODS, PRESETS, Config, get_preset, preset_markdown

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def synthetic_omniglot(monkeypatch):
    """Every split: 30 classes × 20 images (28×28), a per-class template plus noise."""
    def fake(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed({"train": 0, "val": 1, "test": 2}[split])
        templates = (torch.rand(30, 1, 1, 28, 28, generator=g) > 0.7).float()
        images = (templates + 0.3 * torch.rand(30, 20, 1, 28, 28, generator=g)).clamp(0, 1)
        return images.reshape(600, 1, 28, 28), torch.arange(30).repeat_interleave(20)
    monkeypatch.setattr(experiment, "_omniglot", fake)


TINY = ["--steps", "4", "--val-every", "2", "--val-episodes", "2", "--checkpoint-every", "1", "--hidden", "8",
        "--no-progress", "--device", "cpu"]


def tiny_args(preset: str, out: Path, *extra: str) -> list[str]:
    c = get_preset(preset)
    shape = [] if c.dataset == "sine" else ["--n-way", "5" if c.method != "protonet" else "6"]
    return [preset, "--out", str(out), *TINY, *shape, *extra]


# ----------------------------------------------------------------------------------------- presets
PAPER_VALUES = {  # checked against the papers / authors' code (see mlcore.presets' docstring)
    "maml-omniglot-5w1s": dict(n_way=5, k_shot=1, n_query=1, meta_batch=32, inner_lr=0.4, inner_steps=1,
                               steps=40_000, meta_lr=1e-3, test_inner_steps=10, test_n_query=1,
                               test_episodes=600),
    "maml-omniglot-20w1s": dict(n_way=20, k_shot=1, n_query=1, meta_batch=16, inner_lr=0.1, inner_steps=5,
                                steps=40_000, test_inner_steps=10),
    "fomaml-omniglot-5w1s": dict(method="fomaml", meta_batch=32, inner_lr=0.4, n_query=1),
    "protonet-omniglot-1shot": dict(n_way=60, k_shot=1, n_query=5, meta_batch=1, meta_lr=1e-3, lr_halve_every=2000,
                                    test_n_way=5, test_n_query=15, test_episodes=1000),
    "protonet-omniglot-5shot": dict(n_way=60, k_shot=5, n_query=5, test_n_query=15, test_episodes=1000),
    "reptile-omniglot-5w1s": dict(meta_batch=10, k_shot=15, inner_steps=3, inner_lr=1e-3, reptile_eps=1.0,
                                  reptile_eps_final=0.0, steps=100_000, test_k_shot=1, test_inner_steps=5),
    "maml-sine-10shot": dict(dataset="sine", k_shot=10, meta_batch=25, inner_lr=0.01, steps=70_000),
}


@pytest.mark.parametrize("name", sorted(PAPER_VALUES))
def test_preset_values_are_the_papers(name):
    preset = get_preset(name)
    for key, value in PAPER_VALUES[name].items():
        assert getattr(preset, key) == value, (name, key)
    assert preset.preset == name and preset.source


def test_readme_table_is_the_presets():
    """The README's preset table is generated from PRESETS: it may not drift from the code."""
    readme = (ROOT / "README.md").read_text()
    assert preset_markdown() in readme, "README preset table differs: paste mlcore.presets.preset_markdown()"
    for name in PRESETS:
        assert f"`{name}`" in readme


def test_every_method_has_a_preset():
    assert {p.method for p in PRESETS.values()} == set(METHODS)


@pytest.mark.parametrize("bad, message", [
    (dict(method="mamll"), "method='mamll'"),
    (dict(k_shot=10, n_query=15), "20 drawings"),
    (dict(test_n_way=20), "5-way head"),
    (dict(meta_lr=0.0), "meta_lr must be a positive"),
    (dict(val_episodes=1), "val_episodes must be an integer >= 2"),
    (dict(norm="layer"), "norm='layer'"),
])
def test_config_errors_teach(bad, message):
    with pytest.raises(ValueError, match=message):
        get_preset("maml-omniglot-5w1s").replace(**bad)


def test_unknown_preset_and_value():
    with pytest.raises(ValueError, match="presets: "):
        get_preset("maml-omniglot-5w2s")
    with pytest.raises(ValueError, match="unknown configuration value"):
        get_preset("maml-omniglot-5w1s").replace(inner_rate=0.1)


def test_cli_rejects_bad_override(capsys):
    with pytest.raises(SystemExit):
        cli.train_main(["maml-omniglot-5w1s", "--k-shot", "19", "--n-query", "5"])
    assert "20 drawings" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("preset", ["maml-omniglot-5w1s", "fomaml-omniglot-5w1s", "metasgd-omniglot-5w1s",
                                    "anil-omniglot-5w1s", "reptile-omniglot-5w1s", "protonet-omniglot-1shot",
                                    "matching-omniglot-5w1s", "matching-fce-omniglot-5w1s", "maml-sine-10shot"])
def test_every_method_trains_and_evaluates(preset, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ["--meta-batch", "2"] if get_preset(preset).meta_batch > 2 else []
    if preset.startswith("reptile"):
        extra += ["--k-shot", "3", "--test-inner-steps", "2"]
    assert cli.train_main(tiny_args(preset, out, *extra)) == 0
    for name in ("config.json", "checkpoint.pt", "best.pt", "sessions.jsonl"):
        assert (out / name).exists(), name
    assert cli.evaluate_main([str(out), "--episodes", "4", "--threads", "1"]) == 0
    record = json.loads((out / "record.json").read_text())
    assert record["method"] == get_preset(preset).method and record["training"]["steps"] == 4
    (evaluation,) = record["evaluations"]
    assert evaluation["protocol"]["episodes"] == 4 and evaluation["n_episodes"] == 4
    assert record["checkpoint"]["sha256"] == results.sha256(out / "best.pt")
    metric = "val_mse" if preset.endswith("sine-10shot") else "val_acc"
    assert record["training"]["validation"]["metric"] == metric
    assert record["training"]["validation"]["steps"] == [2, 4]
    printed = capsys.readouterr().out
    assert "test " in printed and "95% CI" in printed


class Interrupt(KeyboardInterrupt):
    pass


def build_that_stops(real_build, *, at: int, action):
    """experiment.build whose Method runs ``action()`` just before step ``at`` (a crash, a signal)."""
    def build(config, device="cpu", **kwargs):
        method = real_build(config, device, **kwargs)
        inner = method.step

        def step(tasks, i):
            if i == at:
                action()
            return inner(tasks, i)
        method.step = step
        return method
    return build


def test_resume_after_interrupt_is_exact(tmp_path, monkeypatch):
    """6 steps straight == interrupted after step 3, then resumed: same weights, history, best."""
    args = ["matching-fce-omniglot-5w1s", *TINY[2:], "--steps", "6", "--n-query", "2"]
    assert cli.train_main([*args, "--out", str(tmp_path / "a")]) == 0

    real_build = experiment.build

    def interrupt():
        raise Interrupt
    monkeypatch.setattr(experiment, "build", build_that_stops(real_build, at=3, action=interrupt))
    assert cli.train_main([*args, "--out", str(tmp_path / "b")]) == 130        # interrupted, exit code
    monkeypatch.setattr(experiment, "build", real_build)
    assert experiment._checkpoint_step(tmp_path / "b" / "checkpoint.pt") == 3
    assert cli.train_main([*args, "--out", str(tmp_path / "b")]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    for module in ("model", "fce"):
        sa, sb = (x["state"]["modules"][module]["__state_dict__"] for x in (a, b))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), module
    assert json.dumps(a["history"]["metrics"]) == json.dumps(b["history"]["metrics"])   # nan-safe
    assert torch.equal(a["state"]["best"], b["state"]["best"])
    sessions = [json.loads(line) for line in (tmp_path / "b" / "sessions.jsonl").read_text().splitlines()]
    assert [(s["steps_from"], s["steps_to"]) for s in sessions] == [(0, 3), (3, 6)]


def test_continue_with_more_steps_and_refuse_other_settings(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.train_main(tiny_args("protonet-omniglot-1shot", out)) == 0
    assert cli.train_main(tiny_args("protonet-omniglot-1shot", out, "--steps", "6")) == 0  # continues
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 6
    assert experiment._checkpoint_step(out / "checkpoint.pt") == 6
    assert cli.train_main(tiny_args("protonet-omniglot-1shot", out, "--steps", "6", "--meta-lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert "meta_lr: 0.001 in the folder, 0.01 now" in err and "only --steps may change" in err
    assert experiment._checkpoint_step(out / "checkpoint.pt") == 6       # nothing touched


def test_evaluate_refuses_what_is_not_a_model(tmp_path, capsys):
    assert cli.evaluate_main([str(tmp_path)]) == 2
    assert "best.pt" in capsys.readouterr().err
    out = tmp_path / "run"
    cli.train_main(tiny_args("protonet-omniglot-1shot", out))
    assert cli.evaluate_main([str(out / "checkpoint.pt")]) == 2
    assert "training checkpoint" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert cli.evaluate_main([str(tmp_path / "junk.pt")]) == 2
    assert "cannot be read" in capsys.readouterr().err


def test_maml_cannot_be_tested_with_other_ways(tmp_path, capsys):
    out = tmp_path / "run"
    cli.train_main(tiny_args("maml-omniglot-5w1s", out, "--meta-batch", "2"))
    assert cli.evaluate_main([str(out), "--n-way", "20", "--episodes", "2"]) == 2
    assert "5-way head" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- records
def test_record_keeps_one_entry_per_protocol(tmp_path):
    out = tmp_path / "run"
    cli.train_main(tiny_args("protonet-omniglot-1shot", out))
    for extra in ([], [], ["--n-way", "4"], ["--no-transductive"]):
        assert cli.evaluate_main([str(out), "--episodes", "3", *extra]) == 0
    record = json.loads((out / "record.json").read_text())
    protocols = [(e["protocol"]["n_way"], e["protocol"]["transductive"]) for e in record["evaluations"]]
    assert sorted(protocols) == [(4, True), (5, False), (5, True)]
    (loaded,) = results.load_records(tmp_path)
    assert loaded["run"] == "run" and loaded["checkpoint"]["file"] == "best.pt"


def test_saved_model_reproduces_its_accuracy(tmp_path):
    out = tmp_path / "run"
    cli.train_main(tiny_args("protonet-omniglot-1shot", out))
    cli.evaluate_main([str(out), "--episodes", "6"])
    (evaluation,) = json.loads((out / "record.json").read_text())["evaluations"]
    method, meta = experiment.load_model(out)
    protocol = experiment.Protocol(**evaluation["protocol"])
    again = experiment.evaluate_model(method, protocol)
    assert again["mean"] == evaluation["mean"] and again["ci95"] == evaluation["ci95"]


def test_summary_pools_seeds_with_t_interval():
    def record(seed, mean):
        return {"preset": "p", "seed": seed, "training": {"steps": 10, "devices": ["cpu"]},
                "evaluations": [{"protocol": {"n_way": 5}, "metric": "accuracy", "mean": mean, "ci95": 0.01}]}
    (s,) = results.summarise([record(0, 0.90), record(1, 0.92), record(2, 0.94)])
    assert s.seeds == (0, 1, 2) and math.isclose(s.mean, 0.92)
    assert math.isclose(s.ci95_seeds, 4.303 * 0.02 / math.sqrt(3), rel_tol=1e-9)
    assert math.isclose(s.ci95_episodes, 0.01)
    (one,) = results.summarise([record(0, 0.9)])
    assert math.isnan(one.ci95_seeds)
    assert results.t_quantile(100) == 1.96
    with pytest.raises(ValueError):
        results.t_quantile(0)


def test_time_to_threshold():
    rec = {"training": {"validation": {"steps": [500, 1000, 1500], "wall_seconds": [10.0, 20.0, 30.0],
                                       "values": [0.95, 0.981, 0.99]}}}
    assert results.time_to(rec, 0.98) == (1000, 20.0)
    assert results.time_to(rec, 0.999) is None


# ----------------------------------------------------------------------------------------- transduction
def test_one_query_at_a_time_is_per_query_prediction():
    """The wrapper equals predicting each query in an episode of its own, and differs from batch stats."""
    from mlcore import protonet
    from mlcore.models import Conv4
    from mlcore.tasks import TaskBatch
    torch.manual_seed(0)
    model = Conv4(1, None, hidden=8)
    g = torch.Generator().manual_seed(0)
    tasks = TaskBatch(torch.rand(2, 3, 1, 28, 28, generator=g), torch.arange(3).repeat(2, 1),
                      torch.rand(2, 6, 1, 28, 28, generator=g), torch.arange(3).repeat_interleave(2).repeat(2, 1))
    with torch.no_grad():
        wrapped = experiment.one_query_at_a_time(lambda t: protonet.predict(model, t), chunk=5)(tasks)
        for b in range(2):
            for q in range(6):
                single = TaskBatch(tasks.x_support[b:b + 1], tasks.y_support[b:b + 1],
                                   tasks.x_query[b:b + 1, q:q + 1], tasks.y_query[b:b + 1, q:q + 1])
                torch.testing.assert_close(wrapped[b, q], protonet.predict(model, single)[0, 0])
        assert not torch.allclose(wrapped, protonet.predict(model, tasks))   # batch statistics matter
        gn = Conv4(1, None, hidden=8, norm="group")
        torch.testing.assert_close(experiment.one_query_at_a_time(lambda t: protonet.predict(gn, t))(tasks),
                                   protonet.predict(gn, tasks))            # GroupNorm: nothing transductive


def test_non_transductive_batches_only_models_without_batch_statistics(tmp_path, monkeypatch):
    """GroupNorm: the non-transductive score is computed in one batch and equals the per-query one;
    batch statistics: every query goes through one_query_at_a_time."""
    out = tmp_path / "gn"
    cli.train_main(tiny_args("protonet-omniglot-1shot-gn", out))
    gn, _ = experiment.load_model(out)
    assert not experiment.mixes_examples(gn)
    protocol = experiment.Protocol.of(gn.config, episodes=4, n_way=5, transductive=False)
    per_query = experiment.one_query_at_a_time(lambda t: gn.predict(t, 0))
    calls = []
    real = experiment.one_query_at_a_time

    def counting(predict, chunk=512):
        calls.append(chunk)
        return real(predict, chunk)
    monkeypatch.setattr(experiment, "one_query_at_a_time", counting)
    batched = experiment.evaluate_model(gn, protocol)
    assert calls == []                                                   # one batch, no per-query pass
    sampler = experiment.episodes("test", n_way=5, k_shot=1, n_query=15, seed=protocol.seed, device="cpu")
    from mlcore.evaluate import evaluate
    slow = evaluate(per_query, sampler, n_episodes=4, meta_batch=20, seed=protocol.seed)
    assert slow.mean == pytest.approx(batched["mean"], abs=1e-12)

    cli.train_main(tiny_args("protonet-omniglot-1shot", tmp_path / "bn"))
    bn, _ = experiment.load_model(tmp_path / "bn")
    assert experiment.mixes_examples(bn)
    experiment.evaluate_model(bn, protocol)
    assert len(calls) == 1                                               # batch norm: per query


# ----------------------------------------------------------------------------------------- committed runs
COMMITTED = sorted((ROOT / "results").glob("runs/*/record.json"))


@pytest.mark.slow
@pytest.mark.parametrize("record_path", COMMITTED, ids=[p.parent.name for p in COMMITTED])
def test_committed_checkpoint_reproduces_its_record(record_path, monkeypatch):
    """A shipped best.pt has the recorded sha256 and reproduces its recorded accuracy on real Omniglot
    (the smallest recorded protocol, so the test stays short)."""
    monkeypatch.undo()                                                     # the real data set
    from mlcore.data.omniglot import omniglot_root
    if not (omniglot_root() / "images_background").is_dir():
        pytest.skip("real Omniglot is not here: set MLCORE_OMNIGLOT (make test does) to run this check")
    record = json.loads(record_path.read_text())
    checkpoint = record_path.parent / record["checkpoint"]["file"]
    assert results.sha256(checkpoint) == record["checkpoint"]["sha256"]
    evaluation = min(record["evaluations"], key=lambda e: e["protocol"]["episodes"] * e["protocol"]["n_query"])
    if evaluation["protocol"]["episodes"] > 200:
        pytest.skip("no short evaluation recorded for this run")
    method, _ = experiment.load_model(checkpoint)
    again = experiment.evaluate_model(method, experiment.Protocol(**evaluation["protocol"]))
    assert math.isclose(again["mean"], evaluation["mean"], abs_tol=1e-9)


def test_time_limit_stops_at_a_checkpoint_and_loses_nothing(tmp_path, capsys):
    args = tiny_args("protonet-omniglot-1shot", tmp_path / "a")
    assert cli.train_main(args) == 0
    limited = tiny_args("protonet-omniglot-1shot", tmp_path / "b")
    assert cli.train_main([*limited, "--time-limit", "1e-9"]) == 0     # stops after step 1
    assert "stopped at the time limit after step 1 of 4" in capsys.readouterr().out
    assert experiment._checkpoint_step(tmp_path / "b" / "checkpoint.pt") == 1
    assert cli.train_main(limited) == 0
    a, b = (experiment.read_history(tmp_path / x) for x in "ab")
    assert json.dumps(a.metrics) == json.dumps(b.metrics)


def test_gpu_script_trains_every_preset_at_toy_size(tmp_path, capsys):
    """scripts/gpu_train.py (the one prepared GPU call) runs end to end at toy size on the CPU."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "scripts" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main([str(tmp_path), "--budget", "120", "--tiny", "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "gpu_train_summary.json").read_text())
    assert [r["preset"] for r in summary["rows"]] == [n for n, _ in module.parse_plan(module.DEFAULT)]
    for row in summary["rows"]:
        record = json.loads((tmp_path / "runs" / f"{row['preset']}-seed0" / "record.json").read_text())
        assert record["training"]["steps"] == row["steps"] == 6
    with pytest.raises(ValueError, match="presets: "):
        module.parse_plan("maml-omniglot-5w3s:1")


def test_sigterm_stops_like_ctrl_c_and_logs_the_session(tmp_path, monkeypatch):
    import os
    import signal
    monkeypatch.setattr(experiment, "build", build_that_stops(
        experiment.build, at=2, action=lambda: os.kill(os.getpid(), signal.SIGTERM)))
    out = tmp_path / "run"
    assert cli.train_main(tiny_args("protonet-omniglot-1shot", out)) == 130
    (session,) = [json.loads(line) for line in (out / "sessions.jsonl").read_text().splitlines()]
    assert session["steps_to"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
