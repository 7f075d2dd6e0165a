"""Bad input, one table: every case of the reliability issue, each through the CLI (or the Python API where no
command reaches it on a machine without a GPU: TensorRT engines, through the stand-in ``tensorrt`` module).

Every row asserts: the exit code (or the exception type); that stderr ends with exactly one ``error:`` line and
holds nothing else but progress lines (no traceback, no warning, no usage box); that the line matches the row's
pattern, which names the thing (file, tensor with both shapes, token id, …); that the line carries a fix; and that
nothing was written — the test's folder (inputs, previous outputs, the working directory of the command) is
byte-identical afterwards, with no lock file, staging folder or half-made run folder left, and special files
(a FIFO, /dev/null) are still special files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from gamexport.engines.trt import EngineMismatchError, ProfileError, TrtRunner
from gamexport.errors import GraphError

GAMEXPORT = [sys.executable, "-m", "gamexport.cli.main"]
# Progress lines: the build's stages and their indented details, the parity command's steps.
PROGRESS = re.compile(r"^(\[\d/\d\] |      |parity: (onnxruntime|tensorrt)\S* \S+$|genai: )")
ENOSPC_HOOK = """
import errno, os
_under = os.environ.get("GAMEXPORT_TEST_ENOSPC_UNDER")
if _under:
    _fsync = os.fsync
    def fsync(fd):
        try:
            where = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            where = ""
        if where.startswith(_under):
            raise OSError(errno.ENOSPC, "No space left on device")
        return _fsync(fd)
    os.fsync = fsync
"""


@dataclass
class Ctx:
    """What a row's setup may use: the test's folder and the shared tiny model."""

    tmp: Path
    cfg: Any
    weights: dict
    ckpt_src: Path
    build_src: Path
    monkeypatch: Any

    def ckpt(self, name: str = "ck") -> Path:
        dst = self.tmp / name
        shutil.copytree(self.ckpt_src, dst)
        return dst

    def build(self, name: str = "build", prepacked: bool = True) -> Path:
        """A copy of the tiny build; ``prepacked=False``: without the prepacked step graph (as ``--no-prepacked``
        writes it), so that ``generate`` opens step.onnx."""
        from build_copies import refresh_manifest

        from gamexport.layout import PREPACKED_FILES

        dst = self.tmp / name
        shutil.copytree(self.build_src, dst)
        if not prepacked:
            for file in PREPACKED_FILES:
                (dst / file).unlink()
            refresh_manifest(dst)
        return dst

    def build_for(self, name: str) -> Path:
        """A copy of the tiny build whose file ``name`` a row changes: without the prepacked step graph when that
        is step.onnx, which ``generate`` would otherwise not open."""
        return self.build(prepacked=name != "step.onnx")

    def save_weights(self, weights: dict, name: str = "ck") -> Path:
        from safetensors.numpy import save_file

        folder = self.ckpt(name)
        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(folder / "model.safetensors"))
        return folder

    def edit_config(self, changes: dict, name: str = "ck") -> Path:
        folder = self.ckpt(name)
        data = json.loads((folder / "config.json").read_text())
        data.update(changes)
        (folder / "config.json").write_text(json.dumps(data))
        return folder

    def reference_pt(self, name: str = "gam.pt") -> Path:
        import torch

        from gamexport.model import build_model

        path = self.tmp / name
        torch.save(build_model(self.cfg, self.weights).state_dict(), path)
        return path


# ---- setups: each makes one bad input and returns the values the row's argv names ------------------------------
def _weights(ctx, **edits) -> dict:
    weights = {k: v.copy() for k, v in ctx.weights.items()}
    for name, value in edits.items():
        name = name.replace("__", ".")
        if value is None:
            del weights[name]
        else:
            weights[name] = value
    return weights


def _nan_weights(ctx, name, index, value):
    weights = _weights(ctx)
    weights[name].reshape(-1)[index] = value
    return ctx.save_weights(weights)


def _mutate(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "empty":
        data = bytearray()
    elif how == "truncate":
        data = data[: len(data) // 2]
    elif how == "corrupt":  # overwrite the start, where the structure is
        data[8:40] = bytes(b ^ 0x5A for b in data[8:40])
    path.write_bytes(bytes(data))


def ck_file(how: str):
    def setup(ctx):
        folder = ctx.ckpt()
        _mutate(folder / "model.safetensors", how)
        return {"src": folder}
    return setup


def pt_file(how: str):
    def setup(ctx):
        path = ctx.reference_pt()
        _mutate(path, how)
        return {"src": path}
    return setup


def evil_pickle(ctx):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    path = ctx.tmp / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    return {"src": path}


def tokenizer_file(how: str):
    def setup(ctx):
        folder = ctx.ckpt()
        shutil.copy(Path(__file__).resolve().parents[1] / "gamexport" / "demo" / "tokenizer.json", folder)
        _mutate(folder / "tokenizer.json", how)
        return {"src": folder}
    return setup


def tokenizer_changed(ctx):
    """A build folder whose manifest lists a tokenizer.json, which was then edited (still valid JSON)."""
    from gamexport.fsutil import sha256_file

    folder = ctx.build()
    shutil.copy(Path(__file__).resolve().parents[1] / "gamexport" / "demo" / "tokenizer.json", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = {"size": (folder / "tokenizer.json").stat().st_size,
                                           "sha256": sha256_file(folder / "tokenizer.json")}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with open(folder / "tokenizer.json", "a") as f:
        f.write("\n")
    return {"build": folder}


def tokenizer_too_big(ctx):
    folder = ctx.ckpt()
    shutil.copy(Path(__file__).resolve().parents[1] / "gamexport" / "demo" / "tokenizer.json", folder)
    return {"src": folder}


def onnx_file(how: str | None):
    def setup(ctx):
        path = ctx.tmp / "graphs" / "model.onnx"
        path.parent.mkdir()
        if how is not None:
            shutil.copy(ctx.build_src / "model.onnx", path)
            _mutate(path, how)
        return {"onnx": path}
    return setup


def build_file(name: str, how: str):
    def setup(ctx):
        folder = ctx.build_for(name)
        path = folder / name
        if how == "delete":
            path.unlink()
        elif how == "append":
            with open(path, "ab") as f:
                f.write(b" ")
        else:
            _mutate(path, how)
        return {"build": folder}
    return setup


def stray_file(ctx):
    folder = ctx.build()
    (folder / "stray.bin").write_bytes(b"x")
    return {"build": folder}


def external_data(location: str, graph: str = "step.onnx"):
    """A forged build folder whose manifest agrees with a ``graph`` that reads a tensor from ``location``."""
    def setup(ctx):
        import onnx

        from gamexport.fsutil import sha256_file

        folder = ctx.build_for(graph)
        model = onnx.load(str(folder / graph), load_external_data=False)
        tensor = next(t for t in model.graph.initializer if t.name == "ln_f.bias")
        tensor.ClearField("raw_data")
        del tensor.float_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", "0"), ("length", "128")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        (folder / graph).write_bytes(model.SerializeToString())
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][graph] = {"size": (folder / graph).stat().st_size, "sha256": sha256_file(folder / graph)}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return {"build": folder}
    return setup


def a_file(ctx):
    path = ctx.tmp / "a-file"
    path.write_text("keep me")
    return {"src": ctx.ckpt(), "out": path}


def read_only_folder(ctx):
    """A folder this process cannot write into: mode 555, or (root ignores modes) a path in /sys."""
    folder = ctx.tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o555)  # the ctx fixture makes it writable again for pytest's clean-up
    src = ctx.ckpt()
    try:
        (folder / "probe").mkdir()
    except OSError:
        return {"src": src, "out": folder / "out"}
    (folder / "probe").rmdir()
    try:
        os.mkdir("/sys/gamexport-probe")
    except OSError:
        return {"src": src, "out": Path("/sys/gamexport-test/out")}
    os.rmdir("/sys/gamexport-probe")
    pytest.skip("no folder here refuses writes to this user")


def full_disk(ctx):
    """The previous good build in ``out``; every fsync under the test's folder fails with ENOSPC."""
    out = ctx.build("out")
    hooks = ctx.tmp / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(ENOSPC_HOOK)
    env = {"PYTHONPATH": str(hooks), "GAMEXPORT_TEST_ENOSPC_UNDER": str(ctx.tmp)}
    return {"src": ctx.ckpt(), "out": out, "env": env}


def full_disk_report(ctx):
    values = full_disk(ctx)
    (ctx.tmp / "report.json").write_text('{"previous": true}\n')
    return {**values, "build": values["out"]}


def plain(ctx):
    return {}


def config_not_json(ctx):
    folder = ctx.ckpt()
    (folder / "config.json").write_text('{"vocab')
    return {"src": folder}


def with_build(ctx):
    return {"build": ctx.build()}


def with_ckpt(ctx):
    return {"src": ctx.ckpt()}


# ---- setups for class 1, data loss: destinations that are, hold or lie inside what a command reads -----------
STORY = "Once upon a time a cat sat on a mat. It was happy.\n<|endoftext|>\n"


def foreign_folder(ctx, name: str = "stuff") -> Path:
    folder = ctx.tmp / name
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes, not gamexport's")
    return folder


def run_folder(ctx, name: str = "run") -> Path:
    """A training run folder (its run.json marks it) holding the latest model, as `gamexport train` leaves."""
    folder = ctx.ckpt(name)
    (folder / "run.json").write_text(json.dumps({"kind": "gamexport-run", "dataset": "x", "preset": "tiny",
                                                 "seed": 0, "gamexport_version": "0"}))
    return folder


def stories(ctx, n: int = 40) -> Path:
    path = ctx.tmp / "stories.txt"
    path.write_text(STORY * n)
    return path


def in_folder(setup, where: str):
    """The row's command runs with its working directory at the setup's ``where`` value."""
    def wrapped(ctx):
        values = setup(ctx)
        return {**values, "cwd": values[where]}
    return wrapped


def with_src_and(extra: Callable[[Ctx], dict]):
    def setup(ctx):
        return {"src": ctx.ckpt(), **extra(ctx)}
    return setup


def a_fifo(ctx):
    path = ctx.tmp / "report.fifo"
    os.mkfifo(path)
    return {"build": ctx.build(), "report": path}


def dev_null(ctx):
    """--report /dev/null: as root the old build made it a regular JSON file. It must stay a character device."""
    return {"build": ctx.build(), "watch": [Path("/dev/null")]}


def symlink_to_build(ctx):
    link = ctx.tmp / "link"
    link.symlink_to(ctx.build(), target_is_directory=True)
    return {"src": ctx.ckpt(), "out": link}


def foreign_failed_folder(ctx):
    foreign_folder(ctx, "out.failed")
    return {"src": ctx.ckpt(), "out": ctx.build("out")}


def short_stories(ctx):
    """Text that trains a tokenizer but holds fewer tokens than one sequence: train fails after creating --out."""
    path = ctx.tmp / "short.txt"
    path.write_text("Hi.\n<|endoftext|>\nYo.\n<|endoftext|>\n")
    return {"data": path}


# ---- engines through the stand-in tensorrt (no GPU here) ---------------------------------------------------------
def _engines(ctx, mutate: Callable[[dict], None] | None = None, env_change: dict | None = None):
    """Stand-in TensorRT installed, tiny engines built (prefill profile batch 1..2 × sequence 1..16)."""
    from fakes.trt import ENV, install_fake_trt, make_fake_trt

    from gamexport.engines import trt as trt_mod

    fake = make_fake_trt(10, [])
    env = install_fake_trt(ctx.monkeypatch, fake, dict(ENV, tensorrt_version=fake.__version__))
    folder = ctx.tmp / "engines"
    folder.mkdir()
    for name in ("model.onnx", "step.onnx"):
        shutil.copy(ctx.build_src / name, folder)
    trt_mod.build_engines(folder, ctx.cfg, profiles={"prefill": {"opt": "1x16", "max": "2x16"}})
    paths = trt_mod.engine_paths(folder)
    if mutate is not None:
        mutate(paths)
    if env_change:
        env.update(env_change)
    return folder, paths


def engine(change: Callable[[dict], None] | None = None, env_change: dict | None = None,
           call: Callable | None = None):
    def setup(ctx):
        from gamexport.engines.trt import TrtRunner

        folder, paths = _engines(ctx, change, env_change)
        if call is None:
            return {"call": lambda: TrtRunner.from_folder(folder)}
        runner = TrtRunner.from_folder(folder)
        return {"call": lambda: call(runner, paths)}
    return setup


def _plan(how: str):
    def change(paths):
        _mutate(paths["prefill"], how) if how != "delete" else paths["prefill"].unlink()
    return change


def _forged_plan(paths):
    """Garbage plan bytes with a sidecar updated to match them: TensorRT itself refuses to load it."""
    from gamexport.engines.trt import sidecar_path

    paths["prefill"].write_bytes(b"not a TensorRT plan")
    side = sidecar_path(paths["prefill"])
    meta = json.loads(side.read_text())
    meta["engine"]["sha256"] = hashlib.sha256(b"not a TensorRT plan").hexdigest()
    side.write_text(json.dumps(meta))


def _sidecar(how: str):
    def change(paths):
        from gamexport.engines.trt import sidecar_path

        side = sidecar_path(paths["prefill"])
        side.unlink() if how == "delete" else _mutate(side, how)
    return change


# ---- the table ------------------------------------------------------------------------------------------------
def row(case_id, argv, setup, expect, pattern, *, xfail: str | None = None, no_gpu: bool = False):
    marks = [pytest.mark.xfail(strict=True, reason=xfail)] if xfail else []
    if no_gpu:  # the message for a machine without a GPU (evaluated when the row runs)
        marks.append(pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="this machine has a GPU"))
    return pytest.param(argv, setup, expect, pattern, id=case_id, marks=marks)


BUILD = ["build", "{src}", "--out", "{tmp}/out", "--no-latency", "-j", "1"]
OPTS = ["build", "{src}", "--no-latency", "-j", "1"]  # option rows: a source that loads without torch
API = None  # argv of a Python API row: the setup returns the call

TABLE = [
    # checkpoints: missing, empty, truncated, corrupt; .safetensors and .pt
    row("ckpt-missing", ["build", "{tmp}/nope.safetensors", "--out", "{tmp}/out"], plain, 2,
        r"nope\.safetensors does not exist\. Pass a checkpoint"),
    row("ckpt-empty", BUILD, ck_file("empty"), 2, r"cannot read \S*model\.safetensors: .*header too small"),
    row("ckpt-truncated", BUILD, ck_file("truncate"), 2, r"cannot read \S*model\.safetensors: .*truncated"),
    row("ckpt-corrupt", BUILD, ck_file("corrupt"), 2, r"cannot read \S*model\.safetensors: Error while deserial"),
    row("pt-empty", BUILD, pt_file("empty"), 2, r"cannot read \S*gam\.pt: EOFError"),
    row("pt-truncated", BUILD, pt_file("truncate"), 2, r"cannot read \S*gam\.pt: .* truncated or not a torch"),
    row("pt-corrupt", BUILD, pt_file("corrupt"), 2, r"cannot read \S*gam\.pt: .* truncated or not a torch"),
    # tensors: missing, extra, wrongly shaped (both shapes), NaN / Inf (named)
    row("tensor-missing", BUILD, lambda c: {"src": c.save_weights(_weights(c, blocks__1__memory_bank=None))}, 2,
        r"missing 1 tensor\(s\): blocks\.1\.memory_bank"),
    row("tensor-extra", BUILD, lambda c: {"src": c.save_weights(_weights(c, blocks__0__extra=np.zeros(1,
                                                                                                  np.float32)))},
        2, r"1 unexpected tensor\(s\): blocks\.0\.extra"),
    row("tensor-shape", BUILD, lambda c: {"src": c.save_weights(_weights(c, blocks__0__gate__bias=np.zeros(
        5, np.float32)))}, 2, r"tensor blocks\.0\.gate\.bias has shape \(5,\), expected \(64,\)"),
    row("tensor-nan", BUILD, lambda c: {"src": _nan_weights(c, "blocks.1.ffn.0.bias", 3, np.nan)}, 2,
        r"tensor blocks\.1\.ffn\.0\.bias holds NaN"),
    row("tensor-inf", BUILD, lambda c: {"src": _nan_weights(c, "ln_f.weight", 0, np.inf)}, 2,
        r"tensor ln_f\.weight holds NaN or Inf"),
    # config.json: disagrees with the weights, unreadable, invalid
    row("config-disagrees", BUILD, lambda c: {"src": c.edit_config({"n_slots": 99})}, 2,
        r"config\.json and the weights disagree \(n_slots: config 99 vs weights 16\)"),
    row("config-not-json", BUILD, config_not_json, 2, r"cannot read \S*config\.json: .*Fix or delete config\.json"),
    row("config-baseline-architecture", BUILD, lambda c: {"src": c.edit_config({"architecture": "transformer"})},
        2, r"is a transformer baseline checkpoint \(config\.json says architecture 'transformer'\)"),
    row("config-bad-value", BUILD, lambda c: {"src": c.edit_config({"d_model": "big"})}, 2,
        r"config field d_model must be a positive integer, got 'big'"),
    # untrusted pickles run no code
    row("pt-pickle-runs-code", BUILD, evil_pickle, 2, r"evil\.pt asks to run code .*; refused"),
    # tokenizers
    row("tokenizer-missing", ["generate", "{build}", "--prompt", "hello"], with_build, 2,
        r"has no tokenizer\.json, so --prompt cannot be encoded"),
    row("tokenizer-empty", ["generate", "{src}", "--prompt", "hello"], tokenizer_file("empty"), 2,
        r"cannot read tokenizer \S*tokenizer\.json: EOF while parsing"),
    row("tokenizer-truncated-build", BUILD, tokenizer_file("truncate"), 2, r"cannot read tokenizer \S*tokenizer\.json"),
    row("tokenizer-changed-in-build", ["generate", "{build}", "--ids", "1,2"], tokenizer_changed, 2,
        r"tokenizer\.json does not match its manifest entry"),
    row("tokenizer-bigger-than-vocab", BUILD, tokenizer_too_big, 2, r"tokenizer\.json .*97"),
    # ONNX files: missing, empty, truncated, corrupt; external data outside the folder
    row("onnx-missing", ["inspect", "{tmp}/graphs/gone.onnx"], onnx_file(None), 2, r"gone\.onnx does not exist"),
    row("onnx-empty", ["inspect", "{onnx}"], onnx_file("empty"), 2, r"model\.onnx"),
    row("onnx-truncated", ["inspect", "{onnx}"], onnx_file("truncate"), 2,
        r"cannot read ONNX file \S*model\.onnx: DecodeError\. The file is truncated or corrupt"),
    row("onnx-corrupt", ["inspect", "{onnx}"], onnx_file("corrupt"), 2, r"cannot read ONNX file \S*model\.onnx"),
    row("onnx-external-data-parent", ["generate", "{build}", "--ids", "1,2"], external_data("../../etc/passwd"),
        2, r"step\.onnx: tensor 'ln_f\.bias' reads external data from '\.\./\.\./etc/passwd', outside"),
    row("onnx-external-data-absolute", ["generate", "{build}", "--ids", "1,2"], external_data("/etc/passwd"), 2,
        r"reads external data from '/etc/passwd', outside"),
    row("onnx-external-data-prepacked", ["generate", "{build}", "--ids", "1,2"],
        external_data("../../etc/passwd", "step.prepacked.onnx"), 2,
        r"step\.prepacked\.onnx: tensor 'ln_f\.bias' reads external data from '\.\./\.\./etc/passwd', outside"),
    # build folders against their manifest: runners check before loading, verify checks every file
    row("build-file-corrupt", ["generate", "{build}", "--ids", "1,2"], build_file("step.onnx", "corrupt"), 2,
        r"step\.onnx does not match its manifest entry"),
    row("build-file-missing", ["generate", "{build}", "--ids", "1,2"], build_file("step.onnx", "delete"), 2,
        r"step\.onnx is missing"),
    row("build-prepacked-corrupt", ["generate", "{build}", "--ids", "1,2"],
        build_file("step.prepacked.data", "corrupt"), 2, r"step\.prepacked\.data does not match its manifest entry"),
    row("build-manifest-corrupt", ["generate", "{build}", "--ids", "1,2"], build_file("manifest.json", "truncate"),
        2, r"cannot read \S*manifest\.json"),
    row("verify-changed-file", ["verify", "{build}"], build_file("parity/feeds.json", "append"), 2,
        r"feeds\.json does not match its manifest entry"),
    row("verify-stray-file", ["verify", "{build}"], stray_file, 2, r"stray\.bin is not listed in the manifest"),
    row("verify-not-a-build", ["verify", "{src}"], with_ckpt, 2, r"has no manifest\.json"),
    # token ids and positions
    row("token-id-too-big", ["generate", "{build}", "--ids", "5,97"], with_build, 2,
        r"token id 97 is outside the vocabulary \[0, 97\)"),
    row("token-id-negative", ["generate", "{build}", "--ids=-1,2"], with_build, 2,
        r"token id -1 is outside the vocabulary"),
    row("token-ids-not-integers", ["generate", "{build}", "--ids", "1,x"], with_build, 2,
        r"--ids must be comma-separated integers"),
    row("positions-past-limit", ["generate", "{build}", "--ids", ",".join(["1"] * 65)], with_build, 2,
        r"positions 0\.\.64 exceed the model's 64 learned positions"),
    row("prefill-length-past-limit", [*BUILD, "--prefill-len", "65"], with_ckpt, 2,
        r"prefill length 65 is outside 1\.\.64"),
    # engines (Python API, stand-in TensorRT): missing, empty, truncated, corrupt, foreign, outside the profile
    row("engine-missing", API, engine(_plan("delete")), GraphError, r"model\.fp32\.plan does not exist"),
    row("engine-empty", API, engine(_plan("empty")), EngineMismatchError,
        r"model\.fp32\.plan does not match its sidecar model\.fp32\.plan\.json"),
    row("engine-truncated", API, engine(_plan("truncate")), EngineMismatchError,
        r"model\.fp32\.plan does not match its sidecar"),
    row("engine-corrupt", API, engine(_forged_plan), EngineMismatchError,
        r"TensorRT could not load model\.fp32\.plan: .*Serialization"),
    row("engine-sidecar-missing", API, engine(_sidecar("delete")), GraphError,
        r"model\.fp32\.plan has no sidecar model\.fp32\.plan\.json"),
    row("engine-sidecar-corrupt", API, engine(_sidecar("truncate")), GraphError,
        r"cannot read \S*model\.fp32\.plan\.json"),
    row("engine-other-tensorrt", API, engine(env_change={"tensorrt_version": "10.0.1.6"}), EngineMismatchError,
        r"model\.fp32\.plan was built by TensorRT 10\.9\.0\.34, but this machine has TensorRT 10\.0\.1\.6"),
    row("engine-other-gpu", API, engine(env_change={"gpu_name": "NVIDIA L4", "compute_capability": "8.9"}),
        EngineMismatchError, r"built for NVIDIA H100 80GB HBM3 \(compute capability 9\.0\), but this GPU is NVIDIA L4"),
    row("engine-swapped", API, engine(call=lambda _r, p: TrtRunner(p["step"], p["prefill"])), GraphError,
        r"step\.fp32\.plan is a step engine, not a prefill engine"),
    row("engine-batch-outside-profile", API, engine(call=lambda r, _p: r.prefill(np.zeros((3, 4), np.int64))),
        ProfileError, r"batch 3 × sequence 4 is outside the optimization profile of model\.fp32\.plan "
                        r"\(batch 1\.\.2, sequence 1\.\.16\)"),
    row("engine-sequence-outside-profile", API, engine(call=lambda r, _p: r.prefill(np.zeros((1, 20), np.int64))),
        ProfileError, r"batch 1 × sequence 20 is outside .*rebuild the engine with a profile max of at least 2x20"),
    # output paths: a file, not writable, a full disk
    row("out-is-a-file", [*OPTS, "--out", "{out}"], a_file, 2, r"output path \S*a-file is a file, not a folder"),
    row("out-not-writable", [*OPTS, "--out", "{out}"], read_only_folder, 2,
        r"cannot write beside \S*out: (Permission denied|Operation not permitted)"),
    row("out-full-disk", [*OPTS, "--out", "{out}"], full_disk, 2,
        r"cannot write \S*: No space left on device\. Free disk space"),
    row("report-full-disk", ["parity", "{build}", "--precision", "fp32", "-j", "1", "--report", "{tmp}/report.json"],
        full_disk_report, 2, r"cannot write \S*report\.json: No space left on device"),
    # unknown options and values
    row("unknown-option", ["build", "--frobnicate"], plain, 2, r"--frobnicate"),
    row("unknown-command", ["frobnicate"], plain, 2, r"frobnicate"),
    row("option-out-of-range", ["build", "--threads", "0"], plain, 2, r"--threads"),
    row("unknown-preset", ["build", "--preset", "huge"], plain, 2,
        r"unknown preset 'huge'\. Choose one of: paper, small, tiny"),
    row("unknown-engine", [*OPTS, "--engines", "tvm"], with_ckpt, 2, r"unknown engine 'tvm'"),
    row("unknown-precision", [*OPTS, "--precision", "fp8"], with_ckpt, 2, r"unknown precision 'fp8'"),
    row("unknown-device", [*OPTS, "--device", "tpu"], with_ckpt, 2, r"unknown device 'tpu'\. Choose from cpu, cuda"),
    row("int4-block-not-a-power-of-two", [*OPTS, "--precision", "int4", "--int4-block", "48"], with_ckpt, 2,
        r"--int4-block: block_size must be a power of two >= 16, not 48"),
    row("int4-head-unknown", [*OPTS, "--precision", "int4", "--int4-head", "int3"], with_ckpt, 2,
        r"--int4-head 'int3' is not one of int4, int8, fp32"),
    row("int4-option-without-int4", [*OPTS, "--int4-block", "64"], with_ckpt, 2, r"int4 was not asked for"),
    row("parity-precision-not-built", ["parity", "{build}", "--precision", "fp8"], with_build, 2,
        r"has no fp8 graphs\. It has: fp32"),
    row("prompt-and-ids", ["generate", "{build}", "--ids", "1", "--prompt", "x"], with_build, 2,
        r"give exactly one of --prompt and --ids"),
    row("tensorrt-on-cpu", [*OPTS, "--engines", "tensorrt"], with_ckpt, 2, r"TensorRT runs on NVIDIA GPUs only"),
    row("cuda-graph-without-tensorrt", [*OPTS, "--cuda-graph"], with_ckpt, 2,
        r"--cuda-graph applies to TensorRT's decode steps.*Add --engines tensorrt --device cuda"),
    row("cuda-without-gpu", [*OPTS, "--device", "cuda"], with_ckpt, 2, r"--device cuda needs an NVIDIA GPU",
        no_gpu=True),
    row("tensorrt-without-gpu", [*OPTS, "--device", "cuda", "--engines", "tensorrt"], with_ckpt, 2,
        r"--device cuda needs an NVIDIA GPU", no_gpu=True),
    # ---- class 1, data loss: every writing command checks all its destinations first (gamexport/destinations.py)
    row("out-is-the-source", ["build", "{src}", "--out", "{src}", "--no-latency", "-j", "1"], with_ckpt, 2,
        r"--out \S*ck is the source \S*ck; writing there would change it\. Pass --out a new path outside"),
    row("out-is-the-training-run", ["build", "{src}", "--out", "{src}", "--no-latency"], lambda c: {"src": run_folder(c)},
        2, r"--out \S*run is the source"),
    row("out-holds-the-source", [*OPTS, "--out", "{tmp}"], with_ckpt, 2, r"--out \S*work holds the source \S*ck"),
    row("out-dot-holds-the-source", [*OPTS, "--out", "."], with_ckpt, 2, r"--out \. holds the source \S*ck"),
    row("out-empty-string", [*OPTS, "--out", ""], with_ckpt, 2, r"--out \. holds the source \S*ck"),
    row("out-foreign-folder", [*OPTS, "--out", "{out}"], with_src_and(lambda c: {"out": foreign_folder(c)}), 2,
        r"--out \S*stuff holds files that are not from a gamexport build folder.*Pass --out a new or empty folder"),
    row("out-training-run", [*OPTS, "--out", "{out}"], with_src_and(lambda c: {"out": run_folder(c)}), 2,
        r"--out \S*run is a gamexport training run folder, not a gamexport build folder"),
    row("out-symlink", [*OPTS, "--out", "{out}"], symlink_to_build, 2, r"--out \S*link is a symbolic link"),
    row("out-failed-folder-foreign", [*OPTS, "--out", "{out}"], foreign_failed_folder, 2,
        r"out\.failed holds files that are not a gamexport build"),
    row("triton-is-out", [*OPTS, "--out", "{out}", "--triton", "{out}"],
        with_src_and(lambda c: {"out": c.build("out")}), 2, r"--triton \S*out is --out \S*out"),
    row("triton-inside-out", [*OPTS, "--out", "{out}", "--triton", "{out}/models"],
        with_src_and(lambda c: {"out": c.build("out")}), 2, r"--triton \S*out/models is inside --out"),
    row("triton-foreign-folder", [*OPTS, "--out", "{out}", "--triton", "{repo}"],
        with_src_and(lambda c: {"out": c.build("out"), "repo": foreign_folder(c)}), 2,
        r"--triton \S*stuff holds files that are not from a Triton model repository"),
    row("triton-is-the-source", [*OPTS, "--triton", "{src}"], with_ckpt, 2, r"--triton \S*ck is the source"),
    row("train-out-build-folder", ["train", "-o", "{build}", "-d", "{data}", "-p", "tiny", "--max-steps", "1"],
        lambda c: {"build": c.build(), "data": stories(c)}, 2,
        r"--out \S*build is a gamexport build folder, not a gamexport training run folder"),
    row("train-out-foreign-folder", ["train", "-o", "{out}", "-d", "{data}", "-p", "tiny", "--max-steps", "1"],
        lambda c: {"out": foreign_folder(c), "data": stories(c)}, 2,
        r"--out \S*stuff holds files that are not from a gamexport training run folder"),
    row("train-out-holds-the-data", ["train", "-o", "{tmp}", "-d", "{data}", "-p", "tiny", "--max-steps", "1"],
        lambda c: {"data": stories(c)}, 2, r"--out \S*work holds --dataset \S*stories\.txt"),
    row("train-resume-a-build", ["train", "-o", "{build}", "--resume"], with_build, 2,
        r"--out \S*build is a gamexport build folder"),
    row("report-dev-null", ["parity", "{build}", "--precision", "fp32", "-j", "1", "--report", "/dev/null"],
        dev_null, 2, r"--report /dev/null is a character device, not a regular file"),
    row("report-fifo", ["parity", "{build}", "--precision", "fp32", "-j", "1", "--report", "{report}"], a_fifo, 2,
        r"--report \S*report\.fifo is a FIFO, not a regular file"),
    row("report-into-the-build-manifest", ["parity", "{build}", "-j", "1", "--report", "{build}/manifest.json"],
        with_build, 2, r"--report \S*manifest\.json is inside the build folder \S*build.*Pass --report a new path outside"),
    row("report-over-a-graph", ["parity", "{build}", "-j", "1", "--report", "{build}/step.onnx"], with_build, 2,
        r"--report \S*step\.onnx is inside the build folder"),
    row("report-default-inside-the-build", ["parity", ".", "-j", "1"], in_folder(with_build, "build"), 2,
        r"--report parity-report\.json is inside the build folder"),
    row("report-is-a-folder", ["parity", "{build}", "-j", "1", "--report", "{tmp}/stuff"],
        lambda c: {"build": c.build(), "stuff": foreign_folder(c)}, 2, r"--report \S*stuff is a folder, not a file"),
    row("bench-out-build-folder", ["bench", "--preset", "tiny", "--quick", "--out", "{build}"], with_build, 2,
        r"--out \S*build is a gamexport build folder, not a gamexport bench folder"),
    row("bench-out-is-the-source", ["bench", "{build}", "--quick", "--out", "{build}"], with_build, 2,
        r"--out \S*build is the source"),
    # ---- class 2, leftovers: a failed train removes the run folder it created (no checkpoint yet)
    row("train-fails-after-creating-out", ["train", "-o", "{tmp}/new-run", "-d", "{data}", "-p", "tiny"],
        short_stories, 2, r"fewer than one sequence"),
]


# ---- issue 16 classes 3, 4 (option values), 5: bounded work, option values, non-finite outputs -----------------
# Every size and count has a bound (gamexport/limits.py) checked before work starts; data sources must be regular
# files; NaN/Inf logits are refused, never sampled.
def _outside(ctx, name: str) -> Path:
    """A path beside the test's folder: a FIFO inside it would block the snapshot that reads every file."""
    return ctx.tmp.parent / name


def fifo_data(ctx):
    path = _outside(ctx, "fifo.txt")
    os.mkfifo(path)
    return {"data": path}


def fifo_folder(ctx):
    folder = _outside(ctx, "fifo-folder")
    folder.mkdir()
    os.mkfifo(folder / "train.txt")
    (folder / "valid.txt").write_text("some text\n")
    return {"data": folder}


def huge_weights(ctx):
    """Finite weights near float32's limit (3e38): the final LayerNorm's output, and so the logits, overflow."""
    return {"src": ctx.save_weights(_weights(ctx, ln_f__weight=np.full_like(ctx.weights["ln_f.weight"], 3e38)))}


def debug_env(value: str):
    return lambda ctx: {"env": {"GAMEXPORT_DEBUG": value}}


def trt_profile(spec: dict):
    def setup(ctx):
        from gamexport.engines.trt import make_profile

        return {"call": lambda: make_profile(ctx.cfg, "prefill", spec)}
    return setup


GEN = ["generate", "{build}", "--ids", "1,2"]
TRAIN = ["train", "--out", "{tmp}/run", "--no-progress"]
BOUNDS = [
    row("threads-too-many", [*GEN, "-j", "10000"], with_build, 2, r"'--threads' / '-j'.* less than or equal to \d+"),
    row("threads-int32-overflow", [*OPTS, "-j", "2147483648"], with_ckpt, 2, r"'--threads' / '-j'"),
    row("train-threads-too-many", [*TRAIN, "-j", "10000"], plain, 2, r"'--threads' / '-j'"),
    row("bench-threads-too-many", ["bench", "-o", "{tmp}/b", "-j", "10000"], plain, 2, r"'--threads' / '-j'"),
    row("max-new-tokens-huge", [*GEN, "--max-new-tokens", str(10**12)], with_build, 2, r"'--max-new-tokens'"),
    row("top-k-huge", [*GEN, "--top-k", str(2**64)], with_build, 2, r"'--top-k'"),
    row("temperature-subnormal", [*GEN, "--temperature", "1e-320"], with_build, 2,
        r"temperature 1e-320 is outside 0 or 0\.001\.\.100"),
    row("temperature-huge", [*GEN, "--temperature", "1e6"], with_build, 2, r"'--temperature'"),
    row("temperature-nan", [*GEN, "--temperature", "nan"], with_build, 2, r"'--temperature'"),
    row("seed-negative-generate", [*GEN, "--seed", "-1"], with_build, 2, r"'--seed'.* greater than or equal to 0"),
    row("seed-too-big-generate", [*GEN, "--seed", str(2**32)], with_build, 2, r"'--seed'.* less than or equal to"),
    row("seed-negative-train", [*TRAIN, "--seed", "-1"], plain, 2, r"'--seed'.* greater than or equal to 0"),
    row("max-steps-huge", [*TRAIN, "--max-steps", str(2**70)], plain, 2, r"'--max-steps'.* less than or equal to"),
    row("eval-every-huge", [*TRAIN, "--eval-every", str(2**70)], plain, 2, r"'--eval-every'"),
    row("checkpoint-every-huge", [*TRAIN, "--checkpoint-every", str(2**70)], plain, 2, r"'--checkpoint-every'"),
    row("vocab-size-huge", [*TRAIN, "--vocab-size", str(10**9)], plain, 2, r"'--vocab-size'.* 1048576"),
    row("dropout-above-one", [*TRAIN, "--dropout", "2"], plain, 2, r"'--dropout'"),
    row("bench-max-t-huge", ["bench", "-o", "{tmp}/b", "--max-t", str(2**70)], plain, 2, r"'--max-t'.* 16384"),
    row("bench-min-t-huge", ["bench", "-o", "{tmp}/b", "--min-t", str(2**70)], plain, 2, r"'--min-t'"),
    row("prefill-len-huge", [*BUILD, "--prefill-len", str(2**70)], with_ckpt, 2,
        rf"prefill length {2**70} is outside 1\.\.64"),
    row("trt-profile-batch-huge", API, trt_profile({"max": "100000x64"}), ProfileError,
        r"profile max batch 100000 exceeds 1024"),
    row("train-data-device", [*TRAIN, "-d", "/dev/zero"], plain, 2, r"/dev/zero is a device, not a regular"),
    row("train-data-fifo", [*TRAIN, "-d", "{data}"], fifo_data, 2, r"fifo\.txt is a FIFO, not a regular"),
    row("train-data-folder-fifo", [*TRAIN, "-d", "{data}"], fifo_folder, 2, r"train\.txt is a FIFO"),
    row("ids-overflow", ["generate", "{build}", "--ids", "99999999999999999999"], with_build, 2,
        r"token id 99999999999999999999 is outside the vocabulary \[0, 97\)"),
    row("prompt-not-utf8", ["generate", "{build}", "--prompt", "a\udcffb"], with_build, 2,
        r"--prompt is not valid UTF-8 \(byte 0xff at character 1\)"),
    row("debug-env-false", ["build", "{tmp}/nope.safetensors", "--out", "{tmp}/out"], debug_env("false"), 2,
        r"nope\.safetensors does not exist"),
    row("debug-env-typo", ["build", "{tmp}/nope.safetensors", "--out", "{tmp}/out"], debug_env("ture"), 2,
        r"nope\.safetensors does not exist"),
    row("nonfinite-logits-generate", ["generate", "{src}", "--ids", "1,2"], huge_weights, 2,
        r"eager fp32 prefill produced (NaN|infinite) logits at batch row 0, position 0\. The weights or config"),
    row("nonfinite-logits-build", BUILD, huge_weights, 2, r"eager fp32 prefill produced (NaN|infinite) logits"),
]
TABLE += BOUNDS
# ---- files: one validating reader per format (JSON, safetensors, .pt), graph metadata, the last-resort line ----
UNEXPECTED_HOOK = """
import hashlib, os
if os.environ.get("GAMEXPORT_TEST_PLANT_BUG"):
    def sha256(*args, **kwargs):
        raise RuntimeError("planted bug\\nsecond line")
    hashlib.sha256 = sha256
"""


def planted_bug(ctx):
    """An exception no check anticipates (hashlib.sha256 raises, through a sitecustomize on PYTHONPATH)."""
    hooks = ctx.tmp / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(UNEXPECTED_HOOK)
    return {"build": ctx.build(), "env": {"PYTHONPATH": str(hooks), "GAMEXPORT_TEST_PLANT_BUG": "1"}}


def safetensors_dtype(dtype: str):
    def setup(ctx):
        import torch
        from safetensors.torch import save_file

        folder = ctx.ckpt()
        tensors = {k: torch.from_numpy(v) for k, v in ctx.weights.items() if k != "head.weight"}
        tensors["ln_f.weight"] = tensors["ln_f.weight"].to(getattr(torch, dtype))
        save_file(tensors, str(folder / "model.safetensors"))
        return {"src": folder}
    return setup


def pt_tensor(make: Callable):
    """A reference .pt state_dict whose ln_f.weight is replaced by ``make(tensor)``."""
    def setup(ctx):
        import torch

        from gamexport.model import build_model

        state = build_model(ctx.cfg, ctx.weights).state_dict()
        state["ln_f.weight"] = make(state["ln_f.weight"])
        path = ctx.tmp / "gam.pt"
        torch.save(state, path)
        return {"src": path}
    return setup


def _quantized(t):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)


def config_text(text: str):
    def setup(ctx):
        folder = ctx.ckpt()
        (folder / "config.json").write_text(text)
        return {"src": folder}
    return setup


def rewrite(name: str, edit: Callable[[str], str]):
    """A build folder whose ``name`` was rewritten by ``edit`` (text → text) and whose manifest was updated to
    match: the file passes the manifest check and must be refused by its reader."""
    def setup(ctx):
        from gamexport.fsutil import sha256_file

        folder = ctx.build()
        path = folder / name
        path.write_text(edit(path.read_text()))
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return {"build": folder}
    return setup


def manifest_text(edit: Callable[[dict], Any]):
    def setup(ctx):
        folder = ctx.build()
        data = json.loads((folder / "manifest.json").read_text())
        out = edit(data)
        (folder / "manifest.json").write_text(out if isinstance(out, str) else json.dumps(out))
        return {"build": folder}
    return setup


def _bad_base64(text: str) -> str:
    data = json.loads(text)
    data[0]["input_ids"]["array"] = "not*base64!"
    return json.dumps(data)


def _drop_key(text: str) -> str:
    data = json.loads(text)
    del data[0]["input_ids"]
    return json.dumps(data)


def _float_ids(text: str) -> str:
    from gamexport.polyjson import decode_array, encode_array

    data = json.loads(text)
    data[0]["input_ids"] = encode_array(decode_array(data[0]["input_ids"]).astype(np.float32))
    return json.dumps(data)


def graph_metadata(graph: str, raw: str | None = None, **changes):
    """A build folder whose ``graph`` ONNX file's gamexport config metadata was edited (manifest updated)."""
    def setup(ctx):
        import onnx

        from gamexport.fsutil import sha256_file
        from gamexport.graph.builder import META_CONFIG

        folder = ctx.build_for(graph)
        path = folder / graph
        model = onnx.load(str(path), load_external_data=False)
        prop = next(p for p in model.metadata_props if p.key == META_CONFIG)
        prop.value = raw if raw is not None else json.dumps({**json.loads(prop.value), **changes})
        path.write_bytes(model.SerializeToString())
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][graph] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return {"build": folder, "onnx": path}
    return setup


def odd_out(name: str):
    """An existing file as --out, its name holding a newline or a byte that is not UTF-8."""
    def setup(ctx):
        path = ctx.tmp / name
        path.write_text("keep me")
        return {"src": ctx.ckpt(), "out": path}
    return setup


PARITY = ["parity", "{build}", "--precision", "fp32", "-j", "1", "--report", "{tmp}/report.json"]
FILES_TABLE = [
    # weights: dtypes outside float32/16/bfloat16/64, tensors that are not dense data, values that are not tensors
    row("safetensors-float8", BUILD, safetensors_dtype("float8_e4m3fn"), 2,
        r"tensor ln_f\.weight is stored as F8_E4M3; weights must be float32, float16, bfloat16 or float64"),
    row("safetensors-int32", BUILD, safetensors_dtype("int32"), 2, r"tensor ln_f\.weight is stored as I32"),
    row("pt-int32", BUILD, pt_tensor(lambda t: t.int()), 2, r"gam\.pt: tensor ln_f\.weight is stored as int32"),
    row("pt-bool", BUILD, pt_tensor(lambda t: t > 0), 2, r"tensor ln_f\.weight is stored as bool"),
    row("pt-complex", BUILD, pt_tensor(lambda t: t.to(__import__("torch").complex64)), 2,
        r"tensor ln_f\.weight is stored as complex64"),
    row("pt-sparse", BUILD, pt_tensor(lambda t: t.to_sparse()), 2, r"tensor ln_f\.weight is sparse"),
    row("pt-meta", BUILD, pt_tensor(lambda t: t.to("meta")), 2, r"tensor ln_f\.weight is meta"),
    row("pt-quantized", BUILD, pt_tensor(_quantized), 2, r"tensor ln_f\.weight is quantized"),
    row("pt-nested-value", BUILD, pt_tensor(lambda t: {"w": t}), 2, r"'ln_f\.weight' is a dict, not a tensor"),
    # config.json: values of the wrong type or absurd size, JSON the parser cannot take
    row("config-dropout-string", BUILD, lambda c: {"src": c.edit_config({"dropout": "x"})}, 2,
        r"config field dropout must be a number in \[0\.0, 1\.0\), got 'x'"),
    row("config-ln-eps-null", BUILD, lambda c: {"src": c.edit_config({"ln_eps": None})}, 2,
        r"config field ln_eps must be a number in \(0\.0, 0\.1\], got None"),
    row("config-vocab-absurd", BUILD, lambda c: {"src": c.edit_config({"vocab_size": 2**40})}, 2,
        r"config field vocab_size must be at most 16,777,216, got 1099511627776"),
    row("config-5000-digits", BUILD, config_text('{"vocab_size": ' + "9" * 5000 + "}"), 2,
        r"cannot read \S*config\.json: it holds a number 5,000 characters long"),
    row("config-deep-nesting", BUILD, config_text('{"x": ' + "[" * 10000 + "]" * 10000 + "}"), 2,
        r"cannot read \S*config\.json: it is nested more than 64 levels deep\. Fix or delete config\.json"),
    row("config-nan", BUILD, config_text('{"dropout": NaN}'), 2, r"config\.json: it holds NaN"),
    # manifest.json: missing keys, wrong types, not JSON, deep nesting
    row("manifest-no-files", ["verify", "{build}"], manifest_text(lambda d: {"schema_version": 1}), 2,
        r"manifest\.json: files is missing\. Rebuild the folder"),
    row("manifest-size-not-integer", ["generate", "{build}", "--ids", "1,2"],
        manifest_text(lambda d: {**d, "files": {**d["files"], "step.onnx": {**d["files"]["step.onnx"],
                                                                                   "size": "12"}}}), 2,
        r'manifest\.json: files\["step\.onnx"\]\.size must be an integer'),
    row("manifest-files-a-list", ["verify", "{build}"], manifest_text(lambda d: {**d, "files": []}), 2,
        r"manifest\.json: files must be an object"),
    row("manifest-not-json", ["verify", "{build}"], manifest_text(lambda d: "not json"), 2,
        r"cannot read \S*manifest\.json: it is not JSON"),
    row("manifest-deep-nesting", ["verify", "{build}"], manifest_text(lambda d: "[" * 10000 + "]" * 10000), 2,
        r"manifest\.json: it is nested more than 64 levels deep"),
    # parity references (Polygraphy JSON): bad base64, missing keys
    row("parity-bad-base64", PARITY, rewrite("parity/prefill_inputs.json", _bad_base64), 2,
        r"prefill_inputs\.json: an encoded array is damaged \(bad base64\)"),
    row("parity-missing-key", PARITY, rewrite("parity/prefill_inputs.json", _drop_key), 2,
        r"prefill_inputs\.json: entry 0 has no input_ids"),
    row("parity-ids-not-integers", PARITY, rewrite("parity/prefill_inputs.json", _float_ids), 2,
        r"prefill_inputs\.json: entry 0's input_ids is a 2-d float32 array, expected 2-d integer"),
    row("parity-feeds-names-wrong", PARITY, rewrite("parity/feeds.json", lambda t: '{"prefill": 3}'), 2,
        r"feeds\.json: prefill must be a list, not 3"),
    # graph metadata that disagrees with the graph itself
    row("graph-metadata-vocab", ["generate", "{build}", "--ids", "1,2"], graph_metadata("step.onnx", vocab_size=50),
        2, r"step\.onnx: its gamexport config metadata disagrees with the graph \(vocab_size 50 in the metadata "
           r"but 97 in the graph\)"),
    row("graph-metadata-positions", ["inspect", "{onnx}"], graph_metadata("model.onnx", max_positions=999), 2,
        r"max_positions 999 in the metadata but 64 in the graph"),
    row("graph-metadata-positions-generate", ["generate", "{build}", "--ids", "1,2"],
        graph_metadata("step.onnx", max_positions=999), 2, r"step\.onnx: .*max_positions 999 in the metadata but 64"),
    row("graph-metadata-prepacked", ["generate", "{build}", "--ids", "1,2"],
        graph_metadata("step.prepacked.onnx", vocab_size=50), 2,
        r"step\.prepacked\.onnx: its gamexport config metadata disagrees with the graph \(vocab_size 50"),
    row("graph-metadata-kernel", ["inspect", "{onnx}"], graph_metadata("model.onnx", kernel_size=5), 2,
        r"kernel_size 5 in the metadata but 3 in the graph"),
    row("graph-metadata-not-an-object", ["inspect", "{onnx}"], graph_metadata("model.onnx", raw="[1, 2]"), 2,
        r"model\.onnx's gamexport config metadata: the top level must be an object, not \[1, 2\]"),
    # one line, always: an unexpected exception, a path with a newline
    row("unexpected-exception", ["verify", "{build}"], planted_bug, 2,
        r"^error: unexpected RuntimeError while running gamexport verify: planted bug\\nsecond line\. This is a "
        r"bug in gamexport: rerun with --debug"),
    row("out-path-with-newline", [*OPTS, "--out", "{out}"], odd_out("a\nfile"), 2, r"a\\nfile is a file, not a folder"),
    row("out-path-not-utf8", [*OPTS, "--out", "{out}"], odd_out(os.fsdecode(b"a\xfffile")), 2,
        r"a\\udcfffile is a file, not a folder"),
]
TABLE += FILES_TABLE


# ---- no vacuous pass (issue 12, item 3): a re-check that gated no row exits 2 and says why, never 0 ----------
_NOTHING = ["parity", "{build}", "-j", "1", "--report", "{tmp}/r.json", "--precision"]


def no_saved_feeds(ctx):
    """A build folder whose saved parity references hold no feed at all (manifest rewritten to match): every
    precision runs here (bf16 by its structural run), so only a folder with nothing to compare checks nothing."""
    from gamexport.fsutil import sha256_file
    from gamexport.polyjson import save_feeds, save_run_results

    folder = ctx.build()
    pdir = folder / "parity"
    names = {"feeds.json": None, "prefill_inputs.json": save_feeds, "step_inputs.json": save_feeds,
             "prefill_outputs.json": save_run_results, "step_outputs.json": save_run_results}
    for name, save in names.items():
        if save is None:
            (pdir / name).write_text(json.dumps({"prefill": [], "step": []}))
        else:
            save(pdir / name, *(["eager-fp32"] if save is save_run_results else []), [])
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in names:
        manifest["files"][f"parity/{name}"] = {"size": (pdir / name).stat().st_size,
                                               "sha256": sha256_file(pdir / name)}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return {"build": folder}


TABLE += [
    # (bf16 on the CPU is no longer a zero-gated case: its structural run gates it, see test_zoo.py.)
    row("parity-nothing-gated-no-saved-feeds", [*_NOTHING, "fp32"], no_saved_feeds, 2,
        r"nothing was checked: fp32: not run\. Check a precision .*or rebuild a folder whose saved parity feeds "
        r"hold none \(gamexport build\)"),
    # (INT8 without held-out text is no longer a zero-gated case: its rows gate the streaming state and the INT8
    # plan emulation, see test_zoo.py.)
]


# ---- the test -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt_src(tmp_path_factory, tiny_cfg, tiny_weights) -> Path:
    from gamexport.checkpoint import save_checkpoint

    folder = tmp_path_factory.mktemp("bad_input_ckpt")
    save_checkpoint(folder, tiny_cfg, tiny_weights, meta={"trained": False})
    return folder


@pytest.fixture
def ctx(tmp_path, tiny_cfg, tiny_weights, ckpt_src, tiny_build, monkeypatch) -> Ctx:
    work = tmp_path / "work"
    work.mkdir()
    yield Ctx(work, tiny_cfg, tiny_weights, ckpt_src, tiny_build, monkeypatch)
    for path in [work, *work.rglob("*")]:  # a read-only folder would stop pytest from cleaning up
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


def _fingerprint(path: Path) -> str:
    """sha256 of a regular file; what anything else is, never followed or read (a FIFO would block, a character
    device never end): 'dir', 'link to TARGET', 'fifo', 'socket', 'char device 1,3', …"""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        return f"link to {os.readlink(path)}"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        dev = path.lstat().st_rdev
        return f"{'char' if stat.S_ISCHR(mode) else 'block'} device {os.major(dev)},{os.minor(dev)}"
    return "fifo" if stat.S_ISFIFO(mode) else "socket"


def snapshot(root: Path, watch: list[Path] = ()) -> dict[str, str]:
    """Every file and folder under ``root``, hidden ones included, and the ``watch`` paths outside it:
    relative path → sha256 (or its type). rglob does not descend into linked folders (tests/test_fuzz_cli.py
    puts links and special files in its folders)."""
    out = {}
    for path in sorted(root.rglob("*")):
        out[path.relative_to(root).as_posix()] = _fingerprint(path)
    for path in watch:
        out[str(path)] = _fingerprint(path)
    return out


def changes(before: dict, after: dict) -> list[str]:
    """What was written (a build's lock file included: it is deleted when the build ends)."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def run_cli(argv: list[str], values: dict, tmp: Path, extra_env: dict | None = None):
    """Run the row's command with ``{tmp}`` and the setup's values filled in, in ``values["cwd"]`` (else tmp)."""
    args = [a.format(tmp=tmp, **{k: v for k, v in values.items() if k != "env"}) for a in argv]
    env = {**os.environ, "GAMEXPORT_DEBUG": "", **values.get("env", {}), **(extra_env or {})}
    return subprocess.run([*GAMEXPORT, *args], capture_output=True, text=True, cwd=values.get("cwd", tmp), env=env,
                          timeout=300)


def check_error_line(stderr: str, pattern: str) -> str:
    lines = stderr.splitlines()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert lines and lines[-1].startswith("error: "), stderr[-3000:]
    others = [line for line in lines[:-1] if not PROGRESS.match(line)]
    assert not others, f"stderr holds more than progress and the error line: {others[:5]}"
    line = lines[-1]
    assert re.search(pattern, line), line
    assert re.search(r"\. \S", line), f"no fix after the problem: {line}"
    return line


def run_forked(forkserver, argv: list[str], values: dict, tmp: Path):
    """The row's command as :func:`run_cli` runs it, in a child of the forkserver (tests/forkrun.py): the same
    arguments, working directory and environment, its own exit code and stderr, without a fresh interpreter's
    imports. Its stdout and stderr pass through files beside ``tmp``, outside what the row snapshots."""
    from forkrun import run_command

    args = [a.format(tmp=tmp, **{k: v for k, v in values.items() if k != "env"}) for a in argv]
    env = {**os.environ, "GAMEXPORT_DEBUG": "", **values.get("env", {})}
    logs = tmp.parent / "logs"
    logs.mkdir()
    result = run_command(forkserver, args, Path(values.get("cwd", tmp)), logs, 300, env)
    assert result.code is not None, f"still running after {result.seconds:.0f} s"
    return subprocess.CompletedProcess(args, result.code, result.stdout, result.stderr)


def check_row(ctx, argv, setup, expect, pattern, run) -> None:
    values = setup(ctx)
    before = snapshot(ctx.tmp, values.get("watch", []))
    if argv is API:
        with pytest.raises(expect) as err:
            values["call"]()
        stderr = "error: " + err.value.line()
    else:
        proc = run(argv, values, ctx.tmp)
        assert "Traceback" not in proc.stdout
        stderr = proc.stderr
    # First what was written (also where the message is still wrong: a refused pickle must run nothing).
    assert changes(before, snapshot(ctx.tmp, values.get("watch", []))) == [], "nothing may be written"
    check_error_line(stderr, pattern)
    if argv is not API:
        assert proc.returncode == expect, stderr[-2000:]


@pytest.mark.parametrize("argv,setup,expect,pattern", TABLE)
def test_bad_input(ctx, forkserver, argv, setup, expect, pattern):
    """Each row's command in a forked child (:func:`run_forked`); a row that sets environment variables (a
    sitecustomize on PYTHONPATH, GAMEXPORT_DEBUG) in a fresh ``python -m gamexport.cli.main``."""
    def run(argv, values, tmp):
        if "env" in values:
            return run_cli(argv, values, tmp)
        return run_forked(forkserver, argv, values, tmp)
    check_row(ctx, argv, setup, expect, pattern, run)


# One row of each command again in a fresh interpreter, as a user starts it: what the forked rows cannot see
# (anything printed while the command's modules are imported, the interpreter's start and exit) is seen here.
FRESH = list({p.values[0][0]: p for p in reversed(TABLE) if p.values[0] is not API and not p.marks}.values())


@pytest.mark.parametrize("argv,setup,expect,pattern", FRESH, ids=[p.id for p in FRESH])
def test_bad_input_in_a_fresh_interpreter(ctx, argv, setup, expect, pattern):
    check_row(ctx, argv, setup, expect, pattern, run_cli)


def test_debug_shows_the_traceback(ctx):
    """The first row again, with --debug and with GAMEXPORT_DEBUG=1: the traceback is shown."""
    argv = TABLE[0].values[0]
    for extra, env in ((["--debug"], None), ([], {"GAMEXPORT_DEBUG": "1"})):
        proc = run_cli([*argv, *extra], {}, ctx.tmp, env)
        assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
        assert "CheckpointError: " in proc.stderr and "find_weights" in proc.stderr
