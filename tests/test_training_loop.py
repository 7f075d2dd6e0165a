"""The training loop on the tiny preset: outputs, checkpoints, exact resume, errors, and the CLI command."""

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from gamexport.checkpoint import load_checkpoint
from gamexport.errors import GamexportError
from gamexport.model import build_model
from gamexport.tokenizer import Tokenizer
from gamexport.training import data
from gamexport.training.checkpoints import (STATE_NAME, TrainingError, TrainingInterrupted, list_checkpoints,
                                            load_trainer_state)
from gamexport.training.loop import lr_at, train


def write_stories(path, n: int, seed: int = 0, rare_word_in_tail: str | None = None):
    """A small synthetic TinyStories-like file; the last story may repeat a word seen nowhere else."""
    rng = random.Random(seed)
    names, animals, places = ["Lily", "Tom", "Mia", "Ben"], ["cat", "dog", "bird", "frog"], ["park", "sea", "hill"]
    parts = []
    for i in range(n):
        name, animal, place = rng.choice(names), rng.choice(animals), rng.choice(places)
        story = (f"Once upon a time, {name} had a little {animal}. They went to the {place} every day.\n"
                 f"{name} said, \"I love my {animal}!\" The {animal} was very happy.")
        if i == n - 1 and rare_word_in_tail:
            story += (" " + rare_word_in_tail) * 30
        parts.append(story + "\n<|endoftext|>\n")
    path.write_text("".join(parts), encoding="utf-8")
    return path


def metrics(out):
    """metrics.jsonl without the wall-clock column (the one thing two identical runs may disagree on)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]


def test_learning_rate_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 1e-3, 10, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10]))              # rising during warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))             # falling after it
    assert lrs[99] < 1e-6 and lr_at(100, 1e-3, 10, 100) == 0.0


@pytest.mark.slow
def test_a_tiny_run_writes_a_loadable_resumable_run(tmp_path):
    text = write_stories(tmp_path / "stories.txt", 60, rare_word_in_tail="zyzzyva")
    out = tmp_path / "run"
    summary = train(str(text), "tiny", out, max_steps=12, eval_every=4, checkpoint_every=4, seed=3,
                    progress=False)

    # OUT is a SOURCE: the latest weights, config and tokenizer sit directly in it.
    ckpt = load_checkpoint(out)
    tok = Tokenizer.from_file(out)
    assert ckpt.config.vocab_size == tok.vocab_size == summary["tokenizer"]["vocab_size"]
    assert ckpt.config.d_model == 40 and ckpt.config.n_layers == 2 and ckpt.config.n_slots == 76
    assert "architecture" not in json.loads((out / "config.json").read_text())   # GAM checkpoints stay as they were
    meta = ckpt.meta
    assert meta["trained"] is True and meta["step"] == 12 and meta["seed"] == 3 and meta["preset"] == "tiny"
    assert meta["dataset"]["name"] == "stories" and "3 of 60" in meta["dataset"]["held_out"]
    assert meta["val_ppl"] == pytest.approx(math.exp(meta["val_loss"])) == pytest.approx(summary["val_ppl"])
    # The tokenizer never saw the validation split: a word repeated 30 times only there is not one token.
    assert tok.token_to_id("Ġzyzzyva") is None and len(tok.encode(" zyzzyva")) > 1

    # The last two checkpoints are kept, each complete, with state readable by torch.load(weights_only=True).
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps == [8, 12]
    folder = out / "checkpoints" / "step-000012"
    assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", "model.safetensors", STATE_NAME,
                                                               "tokenizer.json", "heldout.txt"])
    state = load_trainer_state(folder)
    assert state["step"] == 12 and isinstance(state["rng"]["torch"], torch.Tensor)
    assert len(state["optimizer"]["state"]) == len(list(build_model(ckpt.config).parameters()))
    assert not list((out / "checkpoints").glob(".tmp*"))

    # One metrics line per step; validation on every 4th.
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert set(rows[0]) == {"step", "epoch", "train_loss", "val_loss", "val_ppl", "lr"}
    assert [r["step"] for r in rows if r["val_ppl"] is not None] == [4, 8, 12]
    assert rows[11]["val_ppl"] < rows[3]["val_ppl"]                    # it learned something
    for name in ("loss.png", "perplexity.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["steps"] == 12

    # Validation perplexity is over the whole held-out split: recompute it independently.
    corpus = data.load_corpus(str(text))
    stream = np.concatenate([np.append(tok.encode(doc), tok.eos_id) for doc in corpus.valid])
    # heldout.txt (for `gamexport build`'s parity on real text) encodes to exactly that stream.
    assert meta["heldout_text"] == "heldout.txt"
    assert tok.encode((out / "heldout.txt").read_text(encoding="utf-8")) == stream.tolist()
    model = build_model(ckpt.config, ckpt.weights)
    T = summary["training"]["seq_len"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(stream), T + 1):
            chunk = torch.from_numpy(stream[start:start + T + 1].astype(np.int64))[None]
            if chunk.shape[1] < 2:
                continue
            logits, _ = model(chunk[:, :-1])
            nll += F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
    assert count == len(stream) - math.ceil(len(stream) / (T + 1))
    assert nll / count == pytest.approx(meta["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path):
    text = write_stories(tmp_path / "stories.txt", 20)
    kwargs = dict(dataset=str(text), preset="tiny", max_steps=16, eval_every=3, checkpoint_every=6, seed=7,
                  progress=False)
    straight = train(out=tmp_path / "straight", **kwargs)
    assert straight["training"]["steps_per_epoch"] <= 5               # the resumed part crosses epochs

    def ctrl_c_at_step_9(record):
        if record["step"] == 9:
            raise KeyboardInterrupt
    with pytest.raises(TrainingInterrupted, match="last checkpoint is step 6"):
        train(out=tmp_path / "stopped", on_step=ctrl_c_at_step_9, **kwargs)
    assert len(metrics(tmp_path / "stopped")) == 9                     # steps 7-9 logged, then lost on resume

    resumed = train(out=tmp_path / "stopped", resume=True, progress=False)   # everything else from run.json
    assert resumed["resumed_from"] == 6
    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "straight")
    # Same weights, bit for bit. (Not the file bytes: safetensors writes its metadata in hash-map order.)
    wa = load_file(str(tmp_path / "straight" / "model.safetensors"))
    wb = load_file(str(tmp_path / "stopped" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].tobytes() == wb[k].tobytes() for k in wa)
    a = load_trainer_state(tmp_path / "straight" / "checkpoints" / "step-000016")
    b = load_trainer_state(tmp_path / "stopped" / "checkpoints" / "step-000016")
    for i, sa in a["optimizer"]["state"].items():
        assert torch.equal(sa["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and (a["epoch"], a["batch_index"]) == (
        b["epoch"], b["batch_index"])


def test_runs_refuse_what_would_break_them(tmp_path):
    text = write_stories(tmp_path / "stories.txt", 20)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="no training run to resume"):
        train(str(text), "tiny", out, resume=True, progress=False)
    train(str(text), "tiny", out, max_steps=2, progress=False)
    with pytest.raises(TrainingError, match="already holds a training run"):
        train(str(text), "tiny", out, max_steps=2, progress=False)
    with pytest.raises(TrainingError, match="--seed 0") as info:
        train(out=out, resume=True, seed=1, progress=False)
    assert "\n" not in str(info.value)
    text.write_text(text.read_text() + "One more story.\n<|endoftext|>\n")
    with pytest.raises(TrainingError, match="changed"):
        train(out=out, resume=True, progress=False)
    with pytest.raises(GamexportError, match="unknown training preset"):
        train(str(text), "huge", tmp_path / "other", progress=False)
    with pytest.raises(TrainingError, match="fewer than one sequence"):
        (tmp_path / "short.txt").write_text("Hi.\n<|endoftext|>\nYo.\n<|endoftext|>\n")
        train(str(tmp_path / "short.txt"), "tiny", tmp_path / "short", progress=False)
    assert not (tmp_path / "short").exists()   # created (its tokenizer written), then removed: no half-made run


def _stop_at(step: int):
    def on_step(record):
        if record["step"] == step:
            raise KeyboardInterrupt
    return on_step


@pytest.mark.slow
def test_an_interrupted_fresh_run_leaves_nothing_but_its_checkpoints(tmp_path):
    """Ctrl-C before the first checkpoint: the run folder it created goes (an empty folder it was given is left
    empty); after a checkpoint the run stays, for --resume."""
    text = write_stories(tmp_path / "stories.txt", 20)
    kwargs = dict(dataset=str(text), preset="tiny", max_steps=8, checkpoint_every=4, eval_every=4, progress=False)
    with pytest.raises(TrainingInterrupted, match="No checkpoint was written yet"):
        train(out=tmp_path / "new", on_step=_stop_at(2), **kwargs)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingInterrupted):
        train(out=tmp_path / "empty", on_step=_stop_at(2), **kwargs)
    assert list((tmp_path / "empty").iterdir()) == []
    with pytest.raises(TrainingInterrupted, match="The last checkpoint is step 4"):
        train(out=tmp_path / "kept", on_step=_stop_at(6), **kwargs)
    assert [step for step, _ in list_checkpoints(tmp_path / "kept")] == [4]
    assert train(out=tmp_path / "kept", resume=True, progress=False)["steps"] == 8


@pytest.mark.slow
def test_sigterm_during_a_fresh_run_removes_its_folder(tmp_path):
    """SIGTERM (as from a scheduler) is handled like Ctrl-C: exit 128 + 15, the folder the run created is gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    text = write_stories(tmp_path / "stories.txt", 60)
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "gamexport.cli.main", "train", "-d", str(text), "-p", "tiny",
                             "-o", str(out), "--max-steps", "100000", "--checkpoint-every", "100000", "-j", "1",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "GAMEXPORT_DEBUG": ""})
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists():   # written just before the first step
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and err.splitlines()[-1].startswith("interrupted: training interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stories.txt"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["transformer", "mamba"])
def test_a_baseline_trains_resumes_exactly_and_is_refused_by_the_gam_tools(tmp_path, kind):
    from gamexport.config import GAMConfig
    from gamexport.errors import CheckpointError
    from gamexport.training.baselines import lm_from_config

    text = write_stories(tmp_path / "stories.txt", 20)
    straight = tmp_path / "straight"
    summary = train(str(text), "tiny", straight, max_steps=6, eval_every=3, checkpoint_every=3, seed=2,
                    model=kind, threads=1, progress=False)

    # config.json names the architecture; summary and run.json record the kind; its size is GAM's, ±5 %.
    config = json.loads((straight / "config.json").read_text())
    assert config["architecture"] == kind and config["step"] == 6 and config["model"] == kind
    assert summary["model"] == kind and summary["config"]["architecture"] == kind
    assert json.loads((straight / "run.json").read_text())["model"] == kind
    gam = GAMConfig.from_dict({k: v for k, v in summary["config"].items()
                               if k in ("vocab_size", "n_layers", "max_positions")}).replace(d_model=40, n_slots=76)
    assert summary["params"] == pytest.approx(gam.n_params(), rel=0.05)
    model = lm_from_config(config)
    assert type(model).__name__ == {"transformer": "TransformerLM", "mamba": "MambaLM"}[kind]
    assert summary["params"] == model.num_parameters()
    # The tied head is stored once, as GAM's; the saved weights load into the model the config describes.
    saved = load_file(str(straight / "model.safetensors"))
    assert "head.weight" not in saved and "token_embedding.weight" in saved
    model.load_state_dict({**{k: torch.from_numpy(v) for k, v in saved.items()},
                           "head.weight": torch.from_numpy(saved["token_embedding.weight"])})
    rows = metrics(straight)
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] and rows[5]["val_loss"] < rows[2]["val_loss"]

    # Resume from step 3 (the step-6 checkpoint lost, as in a crash while writing it): bit for bit the same.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000006")
    again = train(out=resumed, resume=True, progress=False)
    assert again["resumed_from"] == 3 and again["model"] == kind
    assert metrics(resumed) == rows
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(wa[k].tobytes() == wb[k].tobytes() for k in wa)
    with pytest.raises(TrainingError, match=f"--model {kind!r}"):
        train(out=resumed, resume=True, model="gam", progress=False)

    # gamexport build / generate read checkpoints through load_checkpoint: one line, naming the way out.
    with pytest.raises(CheckpointError, match=f"is a {kind} baseline checkpoint") as info:
        load_checkpoint(straight)
    assert "\n" not in str(info.value) and "torch_export" in str(info.value)
    from typer.testing import CliRunner

    from gamexport.cli.main import app

    result = CliRunner().invoke(app, ["generate", str(straight), "--prompt", "Once", "--max-new-tokens", "2"],
                                env={"GAMEXPORT_DEBUG": ""})
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {info.value}"]


def test_model_choices(tmp_path):
    from typer.testing import CliRunner

    from gamexport.cli.main import app
    from gamexport.cli.train import MODEL_CHOICES
    from gamexport.training.baselines import MODEL_KINDS

    assert MODEL_CHOICES == MODEL_KINDS                     # the CLI's copy (kept to keep --help light)
    result = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "run"), "--model", "foo"])
    assert result.exit_code == 2
    # typer's usage error (as for every option): its one message, in a box, after the usage line.
    assert "'foo' is not one of 'gam', 'transformer', 'mamba'" in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "run").exists()
    with pytest.raises(TrainingError, match="unknown model 'foo'"):
        train(str(write_stories(tmp_path / "s.txt", 20)), "tiny", tmp_path / "run", model="foo", progress=False)


def test_cli_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from gamexport.cli.train import train as train_command

    app = typer.Typer()
    app.callback()(lambda: None)
    app.command("train")(train_command)
    text = write_stories(tmp_path / "stories.txt", 20)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--dataset", str(text), "--preset", "tiny", "--out", str(out),
                                      "--max-steps", "3", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "trained 3 steps" in result.output and "perplexity" in result.output
    assert load_checkpoint(out).meta["step"] == 3
    again = CliRunner().invoke(app, ["train", "--dataset", str(text), "--out", str(out)])
    assert again.exit_code == 2
    assert again.output.strip().splitlines() == [f"error: {out} already holds a training run. "
                                                 "Pass --resume to continue it, or choose another --out"]
    with pytest.raises(GamexportError):                                # --debug lets the error through
        CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--seed", "9", "--debug"],
                           catch_exceptions=False)


DEMO = Path(__file__).resolve().parents[1] / "gamexport" / "demo"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO / "model.safetensors").is_file(), reason="no bundled demo model")
def test_bundled_demo_model_matches_its_card():
    ckpt = load_checkpoint(DEMO)
    tok = Tokenizer.from_file(DEMO)
    assert (DEMO / "model.safetensors").stat().st_size <= 8 * 2**20
    assert ckpt.meta["trained"] is True and ckpt.meta["dataset"]["name"] == "tinystories"
    assert ckpt.config.vocab_size == tok.vocab_size and tok.eos_id == 1
    assert f"{ckpt.meta['val_ppl']:.2f}" in (DEMO / "MODEL_CARD.md").read_text(encoding="utf-8")
    # Its recorded validation perplexity is reproduced from heldout.txt by the evaluation code.
    from gamexport.training.evaluation import evaluate

    stream = np.asarray(tok.encode((DEMO / "heldout.txt").read_text(encoding="utf-8")), dtype=np.int32)
    model = build_model(ckpt.config, ckpt.weights)
    val_loss, val_ppl = evaluate(model, stream, ckpt.meta["training"]["seq_len"], 8, torch.device("cpu"))
    assert val_loss == pytest.approx(ckpt.meta["val_loss"], rel=1e-5)


@pytest.mark.slow
def test_train_then_build_then_generate(tmp_path):
    """The whole user path on the tiny preset: train a few steps, build the run folder, generate from the build."""
    import os
    import subprocess
    import sys

    text = write_stories(tmp_path / "stories.txt", 30)
    out, build_dir = tmp_path / "run", tmp_path / "build"
    cli = [sys.executable, "-m", "gamexport.cli.main"]
    env = {**os.environ, "GAMEXPORT_DEBUG": ""}
    trained = subprocess.run([*cli, "train", "--dataset", str(text), "--preset", "tiny", "--out", str(out),
                              "--max-steps", "4", "--threads", "1", "--no-progress"], capture_output=True, text=True,
                             env=env, timeout=300)
    assert trained.returncode == 0, trained.stderr
    built = subprocess.run([*cli, "build", str(out), "--out", str(build_dir), "--no-latency", "-j", "1",
                            "--precision", "fp32,int8"], capture_output=True, text=True, env=env, timeout=300)
    assert built.returncode == 0, built.stderr
    report = json.loads((build_dir / "report.json").read_text())
    assert report["passed"] and report["source"]["trained"]
    assert any(r["input"] == "text" for r in report["parity"])            # real held-out text was used
    assert (build_dir / "tokenizer.json").is_file()
    generated = subprocess.run([*cli, "generate", str(build_dir), "--prompt", "Once upon a time",
                                "--max-new-tokens", "8"], capture_output=True, text=True, env=env, timeout=300)
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.startswith("Once upon a time") and len(generated.stdout) > len("Once upon a time")


@pytest.mark.slow
def test_a_corrupted_last_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    text = write_stories(tmp_path / "stories.txt", 20)
    kwargs = dict(dataset=str(text), preset="tiny", max_steps=8, eval_every=4, checkpoint_every=2, seed=3,
                  progress=False)
    train(out=tmp_path / "straight", **kwargs)

    def ctrl_c_at_step_7(record):
        if record["step"] == 7:
            raise KeyboardInterrupt
    with pytest.raises(TrainingInterrupted):
        train(out=tmp_path / "stopped", on_step=ctrl_c_at_step_7, **kwargs)
    latest = tmp_path / "stopped" / "checkpoints" / "step-000006" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:64])                       # a torn write of the newest checkpoint
    resumed = train(out=tmp_path / "stopped", resume=True, progress=False)
    assert resumed["resumed_from"] == 4
    assert "warning: checkpoint step-000006 is damaged" in capsys.readouterr().err
    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "straight")   # still exact from step 4
