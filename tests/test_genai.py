"""onnxruntime-genai bundles (issue 14, items 2 and 3): the writer, and greedy generation through the real client.

The graphs carry the ecosystem's state convention natively (issue 14, item 1), so every build writes its bundles;
they are tested against ``og.Model`` + ``og.Generator``, and gamexport's own greedy decode runs on the same build's
graphs through its ONNX Runtime runner: the comparison crosses the client.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gamexport.bundles.genai import (CONFIG_FILE, DECODER_FILE, TOKENIZER_CONFIG, convention_problem,
                                     read_build, write_bundle)
from gamexport.config import past_state_name, present_state_name
from gamexport.genai_client import INSTALL, available
from gamexport.layout import TOKENIZER, genai_dir, graph_file
from gamexport.targets import CPU_PRECISIONS
from gamexport.sampling import SamplingConfig

from build_copies import legacy_graph, refresh_manifest

ROOT = Path(__file__).resolve().parents[1]
needs_genai = pytest.mark.skipif(not available(), reason=f"onnxruntime-genai is not installed: {INSTALL}")
GREEDY = SamplingConfig(temperature=0.0)
PRECISIONS = CPU_PRECISIONS  # every precision a bundle is written for: what ONNX Runtime's CPU provider runs


def _build(out: Path, **kwargs) -> Path:
    from gamexport.pipeline import BuildOptions, build

    build(BuildOptions(out=out, threads=1, latency=False, **kwargs))
    return out


@pytest.fixture(scope="module")
def tiny_plain(tmp_path_factory, tiny_cfg, tiny_weights) -> Path:
    """A tiny build (no tokenizer), every precision a bundle is written for: the build writes the bundles."""
    from gamexport.checkpoint import save_checkpoint

    src = tmp_path_factory.mktemp("genai_ckpt")
    save_checkpoint(src, tiny_cfg, tiny_weights, meta={"trained": False})
    return _build(tmp_path_factory.mktemp("genai") / "tiny", source=str(src), precisions=PRECISIONS)


def _bundled(plain: Path, folder: Path) -> Path:
    """A copy of a build (its bundles included) that tests may rewrite."""
    shutil.copytree(plain, folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bundled(tiny_plain, tmp_path_factory) -> Path:
    return _bundled(tiny_plain, tmp_path_factory.mktemp("genai") / "tiny-bundled")


@pytest.fixture(scope="module")
def demo_plain(tmp_path_factory) -> Path:
    """The embedded demo model (trained, with a tokenizer), fp32."""
    return _build(tmp_path_factory.mktemp("genai") / "demo")


@pytest.fixture(scope="module")
def demo_bundled(demo_plain, tmp_path_factory) -> Path:
    return _bundled(demo_plain, tmp_path_factory.mktemp("genai") / "demo-bundled")


def heldout_prompts(n: int, length: int) -> list[str]:
    """``n`` prompts from the demo's held-out text (never trained on), each exactly ``length`` tokens."""
    from gamexport.tokenizer import Tokenizer

    tok = Tokenizer.from_file(ROOT / "gamexport" / "demo" / TOKENIZER)
    lines = [line.strip() for line in (ROOT / "gamexport" / "demo" / "heldout.txt").read_text().splitlines()]
    prompts = []
    for line in lines[5:]:  # not the first story, which doc examples quote
        ids = tok.encode(line)
        if len(ids) >= length:
            prompts.append(tok.decode(ids[:length]))
            if len(prompts) == n:
                return prompts
    raise AssertionError("held-out text too short")


# ---- the writer (no onnxruntime-genai needed) -----------------------------------------------------------------
def test_packed_state_graph_refused_in_one_line(tiny_plain, tiny_cfg, tmp_path):
    """A format-1 graph (one packed conv_state) is refused before anything is written."""
    from gamexport.errors import GamexportError

    folder = tmp_path / "old"
    shutil.copytree(tiny_plain, folder)
    for bundle in folder.glob("genai*"):
        shutil.rmtree(bundle)
    path = folder / "step.onnx"
    onnx_model = legacy_graph(__import__("onnx").load(str(path)), tiny_cfg.n_layers)
    __import__("onnx").save(onnx_model, str(path))
    refresh_manifest(folder)
    problem = convention_problem(path, tiny_cfg)
    assert problem is not None and past_state_name(0) in problem and "\n" not in problem
    before = sorted(p.name for p in folder.iterdir())
    with pytest.raises(GamexportError) as err:
        write_bundle(folder)
    assert "\n" not in err.value.line() and ("conv_state" in err.value.line())
    assert sorted(p.name for p in folder.iterdir()) == before  # no genai/, no staging folder left


def test_position_ids_must_be_per_token(tiny_plain, tmp_path):
    """A graph with per-layer states but position_ids [B, 1] is still refused: onnxruntime-genai feeds [B, T]."""
    import onnx

    cfg, _ = read_build(tiny_plain)
    path = tmp_path / "step.onnx"
    shutil.copyfile(tiny_plain / "step.onnx", path)
    assert convention_problem(path, cfg) is None
    model = onnx.load(str(path))
    dim = next(v for v in model.graph.input if v.name == "position_ids").type.tensor_type.shape.dim[1]
    dim.dim_value = 1
    onnx.save(model, str(path))
    assert "position_ids" in convention_problem(path, cfg)


def test_bundle_layout_without_tokenizer(tiny_bundled, tiny_cfg):
    for precision in PRECISIONS:
        bundle = tiny_bundled / genai_dir(precision)
        assert sorted(p.name for p in bundle.iterdir()) == sorted([DECODER_FILE, CONFIG_FILE])  # runs on ids
        assert (bundle / DECODER_FILE).read_bytes() == (tiny_bundled / graph_file("step", precision)).read_bytes()
        config = json.loads((bundle / CONFIG_FILE).read_text())
        model, decoder = config["model"], config["model"]["decoder"]
        assert model["type"] == "lfm2" and model["vocab_size"] == tiny_cfg.vocab_size
        assert model["context_length"] == tiny_cfg.max_positions == config["search"]["max_length"]
        assert model["eos_token_id"] == model["pad_token_id"] == 0  # no tokenizer: og still stops at an end id, 0
        assert decoder["layer_types"] == ["conv"] * tiny_cfg.n_layers == ["conv"] * decoder["num_hidden_layers"]
        for i in range(tiny_cfg.n_layers):
            assert decoder["inputs"]["past_conv_names"] % i == past_state_name(i)
            assert decoder["outputs"]["present_conv_names"] % i == present_state_name(i)
        assert config["search"]["do_sample"] is False
    assert not list(tiny_bundled.glob(".genai*staging*"))


def test_bundle_with_tokenizer(demo_bundled):
    from gamexport.tokenizer import Tokenizer

    bundle = demo_bundled / genai_dir()
    tok = Tokenizer.from_file(demo_bundled)
    assert (bundle / TOKENIZER).read_bytes() == (demo_bundled / TOKENIZER).read_bytes()
    config = json.loads((bundle / CONFIG_FILE).read_text())["model"]
    assert config["eos_token_id"] == tok.eos_id == config["bos_token_id"] == config["pad_token_id"]
    tok_config = json.loads((bundle / TOKENIZER_CONFIG).read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok_config["eos_token"] == "<|endoftext|>" == tok.id_to_token(tok.eos_id)


def test_rewrite_replaces_the_bundle(tiny_bundled):
    """Writing again swaps the folder: a stray file in the old bundle is gone, the files are the same."""
    bundle = tiny_bundled / genai_dir()
    (bundle / "stray.txt").write_text("old")
    write_bundle(tiny_bundled)
    assert sorted(p.name for p in bundle.iterdir()) == sorted([DECODER_FILE, CONFIG_FILE])


# ---- through the real client ----------------------------------------------------------------------------------
def _gamexport_greedy(folder: Path, precision: str, prompts, max_new_tokens: int, stop_ids=()) -> list[list[int]]:
    from gamexport.engines.ort import OrtRunner

    with OrtRunner.from_folder(folder, 1, precision=precision, step_only=True) as runner:
        return [runner.generate(p, max_new_tokens, GREEDY, stop_ids=stop_ids) for p in prompts]


@needs_genai
@pytest.mark.parametrize("precision", PRECISIONS)
def test_og_greedy_equals_gamexport_greedy_on_ids(tiny_plain, tiny_bundled, precision):
    """og.Generator greedy on the bundle, batch 2 with equal-length prompts and batch 1, token for token equal to
    gamexport's greedy decode of the build's graphs, up to the model's last position."""
    from gamexport.genai_client import GenaiModel

    rng = np.random.default_rng(5)
    prompts = rng.integers(0, 97, size=(2, 7)).tolist()
    want = _gamexport_greedy(tiny_plain, precision, prompts, 40)
    model = GenaiModel(tiny_bundled / genai_dir(precision))
    assert model.generate_batch(prompts, 40) == want
    assert [model.generate(p, 40) for p in prompts] == want
    assert len(want[0]) == 40
    # at the end of the positions: the sequence stops when it holds P tokens (gamexport samples one more token from
    # the logits of position P-1, which it never feeds)
    long = rng.integers(0, 97, size=(1, 60)).tolist()
    assert model.generate(long[0], 10) == _gamexport_greedy(tiny_plain, precision, long, 10)[0][:4]


@needs_genai
def test_og_greedy_on_heldout_text(demo_plain, demo_bundled):
    """The demo model on held-out prompts: og's tokenizer encodes as gamexport's does, og.Generator greedy (batch 2,
    equal lengths) equals gamexport's greedy decode token for token, to eos (included) or 240 new tokens; in one
    batch a row stops at eos while the other runs on."""
    import onnxruntime_genai as og

    from gamexport.tokenizer import Tokenizer

    tok = Tokenizer.from_file(demo_plain)
    bundle = demo_bundled / genai_dir()
    model = og.Model(str(bundle))
    og_tok = og.Tokenizer(model)
    texts = heldout_prompts(8, 12)
    texts = [texts[0], texts[1], texts[5], texts[6]]  # rows 1, 2 and 3 reach eos, each at another step
    prompts = [tok.encode(t) for t in texts]
    assert [list(map(int, og_tok.encode(t))) for t in texts] == prompts
    want = _gamexport_greedy(demo_plain, "fp32", prompts, 240, stop_ids=[tok.eos_id])
    ends = [row[-1] == tok.eos_id for row in want]
    assert ends == [False, True, True, True] and len({len(row) for row in want}) == 4  # the eos path is exercised
    from gamexport.genai_client import GenaiModel

    client = GenaiModel(bundle)
    got = client.generate_batch(prompts[:2], 240) + client.generate_batch(prompts[2:], 240)
    assert got == want
    assert len({tuple(row) for row in got}) == 4  # distinct rows: the batch's rows are not mixed up
    assert og_tok.decode(np.array(got[0])) == tok.decode(got[0], skip_special_tokens=True)


def _doc_snippet() -> str:
    """The Python snippet of docs/serving.md's onnxruntime-genai section."""
    text = (ROOT / "docs" / "serving.md").read_text()
    section = text.split("## Use it from onnxruntime-genai", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@needs_genai
def test_doc_python_snippet_runs_and_matches(demo_plain, demo_bundled):
    """The documented Python (no gamexport import) generates, against the test bundle, the greedy text of
    ``gamexport generate DIR --temperature 0`` for the same prompt."""
    from gamexport.generation import run_generation
    from gamexport.engines.ort import OrtRunner
    from gamexport.tokenizer import Tokenizer

    code = _doc_snippet()
    assert "gamexport" not in code.replace("gamexport-build/genai", "")
    assert "gamexport-build/genai" in code
    prompt = re.search(r'prompt = "(.*?)"', code).group(1)
    code = code.replace("gamexport-build/genai", str(demo_bundled / genai_dir()))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    max_new = int(re.search(r"max_length=len\(ids\) \+ (\d+)", code).group(1))
    with OrtRunner.from_folder(demo_plain, 1, step_only=True) as runner:
        want = run_generation(runner, Tokenizer.from_file(demo_plain), prompt, None, max_new, GREEDY)
    assert done.stdout.strip() == want.strip()


@needs_genai
def test_cli_generate_runtime_genai(demo_plain, demo_bundled):
    """``gamexport generate DIR --runtime genai`` prints the text ``--runtime onnxruntime`` prints (greedy)."""
    def gen(folder, *extra):
        done = subprocess.run([sys.executable, "-m", "gamexport.cli.main", "generate", str(folder), "--prompt",
                               "Once upon a time", "--temperature", "0", "--max-new-tokens", "30", *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr

    text, label = gen(demo_bundled, "--runtime", "genai")
    assert "onnxruntime-genai" in label
    assert text == gen(demo_plain)[0]


def test_cli_runtime_genai_without_bundle(tiny_plain, tmp_path):
    """A build folder without a bundle (removed from a copy) is one line with the reason and a non-zero exit."""
    folder = tmp_path / "no-bundle"
    shutil.copytree(tiny_plain, folder)
    for bundle in folder.glob("genai*"):
        shutil.rmtree(bundle)
    refresh_manifest(folder)
    done = subprocess.run([sys.executable, "-m", "gamexport.cli.main", "generate", str(folder), "--ids", "1,2",
                           "--runtime", "genai"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "genai" in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_missing_client_says_install(tiny_bundled, blocker):
    """Without onnxruntime_genai importable: one line naming the install command."""
    code = blocker({"onnxruntime_genai"}) + (
        "from gamexport.genai_client import GenaiModel\nfrom gamexport.errors import GamexportError\n"
        f"try:\n    GenaiModel({str(tiny_bundled / 'genai')!r})\nexcept GamexportError as e:\n    print(e.line())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "pip install" in done.stdout and "onnxruntime-genai" in done.stdout, done.stdout + done.stderr


# ---- the build's bundle stage ---------------------------------------------------------------------------------
def test_build_writes_a_bundle_for_every_runnable_precision(tiny_plain, tmp_path, tiny_cfg, tiny_weights):
    """The graphs carry the convention: the build passes, writes genai/ and genai-<precision>/ into the folder and
    its manifest, and its bundle stage names them in one line."""
    from gamexport.checkpoint import save_checkpoint
    from gamexport.pipeline import BuildOptions, build

    src = tmp_path / "ckpt"
    save_checkpoint(src, tiny_cfg, tiny_weights, meta={"trained": False})
    lines: list[str] = []
    result = build(BuildOptions(source=str(src), out=tmp_path / "out", threads=1, latency=False,
                                precisions=PRECISIONS, progress=lines.append))
    assert result.passed
    said = [line for line in lines if "genai" in line and ("bundle" in line or "genai/" in line)]
    assert "onnxruntime-genai bundles" in said[0], lines   # the stage's header, then the bundles written
    assert not any("no bundle written" in line for line in lines), lines
    assert any("genai/, genai-fp16/" in line for line in said), lines
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for name in ("genai", "genai-fp16", "genai-int8", "genai-int8-dyn", "genai-int4"):
        assert (tmp_path / "out" / name / DECODER_FILE).is_file() and f"{name}/{DECODER_FILE}" in manifest["files"]
    if available():   # every bundle went through og.Generator: gated, except int8-dyn's per-call scales
        entries = {e["precision"]: e for e in result.report["genai"]}
        assert set(entries) == set(PRECISIONS) and all(e["passed"] for e in entries.values())
        assert {p for p, e in entries.items() if not e["gated"]} == {"int8-dyn"}


@needs_genai
def test_a_bundle_that_disagrees_with_gamexport_fails_the_build(tmp_path, tiny_cfg, tiny_weights, monkeypatch):
    """The og.Generator rows are gates: a bundle whose greedy tokens differ (planted: the agreement reports a
    mismatch) fails the build like a parity row, and the failed folder's report names the bundle."""
    import gamexport.genai_client
    from gamexport.checkpoint import save_checkpoint
    from gamexport.errors import ParityError
    from gamexport.pipeline import BuildOptions, build

    honest = gamexport.genai_client.greedy_agreement

    def differs(*args, **kwargs):
        result = honest(*args, **kwargs)
        return {**result, "rows_equal": result["prompts"] - 1, "first_mismatch": {"row": 1, "new_token": 0},
                "passed": False}

    monkeypatch.setattr(gamexport.genai_client, "greedy_agreement", differs)
    src = tmp_path / "ckpt"
    save_checkpoint(src, tiny_cfg, tiny_weights, meta={"trained": False})
    with pytest.raises(ParityError, match="1 of .* gated parity checks failed"):
        build(BuildOptions(source=str(src), out=tmp_path / "out", threads=1, latency=False))
    report = json.loads((tmp_path / "out.failed" / "report.json").read_text())
    assert [e["bundle"] for e in report["genai"] if not e["passed"]] == ["genai"]
    assert not (tmp_path / "out").exists()


def test_bundle_stage_writes_every_runnable_precision_into_the_manifest(tiny_plain, tiny_cfg, tmp_path):
    """Graphs with the convention: the stage writes genai/, genai-fp16/, genai-int8/, genai-int8-dyn/ and
    genai-int4/ into the staging folder, and the manifest written after it lists their files."""
    from types import SimpleNamespace

    from gamexport.manifest import write_manifest
    from gamexport.pipeline import BuildOptions
    from gamexport.pipeline.stages import Build, bundle

    staging = tmp_path / "staging"
    shutil.copytree(tiny_plain, staging)
    for old in staging.glob("genai*"):   # the build's own bundles: the stage writes them again
        shutil.rmtree(old)
    ckpt = SimpleNamespace(config=tiny_cfg, source="test", sha256="0" * 64)
    lines: list[str] = []
    b = Build(BuildOptions(out=tmp_path / "out", progress=lines.append), tmp_path / "out", None, 1, ckpt=ckpt,
              precisions=PRECISIONS, staging=staging)
    bundle(b)
    assert b.bundles == ["genai", "genai-fp16", "genai-int8", "genai-int8-dyn", "genai-int4"]
    assert any("genai/, genai-fp16/, genai-int8/, genai-int8-dyn/, genai-int4/" in line for line in lines), lines
    files = write_manifest(staging, ckpt)["files"]
    for name in b.bundles:
        assert f"{name}/{DECODER_FILE}" in files and f"{name}/{CONFIG_FILE}" in files


def _genai_build(staging: Path, plain: Path, cfg, precisions, text_ids=None, lines=None):
    """A ``Build`` at its parity stage over a staging folder, its baseline runner on the same graphs."""
    from types import SimpleNamespace

    from gamexport.engines.ort import OrtRunner
    from gamexport.parity.references import split_calibration
    from gamexport.pipeline import BuildOptions
    from gamexport.pipeline.stages import Build, bundle

    ckpt = SimpleNamespace(config=cfg, source="test", sha256="0" * 64)
    lines = [] if lines is None else lines
    b = Build(BuildOptions(out=staging.parent / "out", progress=lines.append), staging.parent / "out", None, 1,
              ckpt=ckpt, precisions=precisions, staging=staging, text_ids=text_ids)
    b.eval_ids = split_calibration(text_ids, cfg)[1]
    bundle(b)
    b.runners = [OrtRunner.from_folder(plain, 1, step_only=True)]
    return b


@needs_genai
@pytest.mark.parametrize("model", ["tiny", "demo"])
def test_build_genai_parity_entry(model, tiny_plain, demo_plain, tmp_path):
    """The build's og.Generator check: every row equal on held-out text (demo) or random ids (tiny), batch 2, and
    the entry fits report.json's schema."""
    import jsonschema

    from gamexport.parity.references import held_out_ids
    from gamexport.pipeline.genai import genai_parity
    from gamexport.sources import resolve_source

    plain = tiny_plain if model == "tiny" else demo_plain
    staging = tmp_path / "staging"
    shutil.copytree(plain, staging)
    cfg, _ = read_build(staging)
    text = held_out_ids(resolve_source(None, None)) if model == "demo" else None
    lines: list[str] = []
    b = _genai_build(staging, plain, cfg, ("fp32",), text, lines)
    try:
        (entry,) = genai_parity(b)
    finally:
        b.close_runners()
    assert entry["gated"] and entry["precision"] == "fp32" and entry["passed"] and entry["rows_equal"] == entry["prompts"] == 4 and entry["batch"] == 2
    assert entry["input"] == ("held-out text" if model == "demo" else "random ids")
    assert entry["tokens_compared"] >= 4 * 8 and entry["first_mismatch"] is None
    assert any("og.Generator greedy equals" in line for line in lines), lines
    schema = json.loads((ROOT / "gamexport" / "report.schema.json").read_text())
    jsonschema.validate([entry], {**schema["properties"]["genai"], "$defs": schema["$defs"]})
    from gamexport.report import _genai_lines

    assert "4/4" in "".join(_genai_lines([entry])) and "token-exact" in "".join(_genai_lines([entry]))


@needs_genai
def test_greedy_agreement_names_the_first_mismatch(tiny_plain, tiny_bundled):
    """A reference that differs at row 1, new token 3 is reported there, and the entry does not pass."""
    from gamexport.engines.ort import OrtRunner
    from gamexport.genai_client import GenaiModel, greedy_agreement

    class Shifted:
        def __init__(self, runner):
            self.runner, self.calls = runner, 0

        def generate(self, ids, n, sampling, stop_ids=()):
            out = self.runner.generate(ids, n, sampling, stop_ids=stop_ids)
            self.calls += 1
            if self.calls == 2:
                out[3] = (out[3] + 1) % 97
            return out

    prompts = np.random.default_rng(3).integers(0, 97, size=(4, 8))
    with OrtRunner.from_folder(tiny_plain, 1, step_only=True) as runner:
        entry = greedy_agreement(GenaiModel(tiny_bundled / "genai"), Shifted(runner), prompts, 12)
    assert not entry["passed"] and entry["rows_equal"] == 3 and entry["first_mismatch"] == {"row": 1, "new_token": 3}


def test_build_report_has_the_genai_entry(tmp_path, tiny_cfg, tiny_weights):
    """A build's report.json holds its genai entry — run through og.Generator where onnxruntime-genai is installed,
    else skipped with the install command — and fits the schema; report.md has the section."""
    import jsonschema

    from gamexport.checkpoint import save_checkpoint
    from gamexport.pipeline import BuildOptions, build

    src = tmp_path / "ckpt"
    save_checkpoint(src, tiny_cfg, tiny_weights, meta={"trained": False})
    result = build(BuildOptions(source=str(src), out=tmp_path / "out", threads=1, latency=False))
    entry = result.report["genai"][0]
    assert entry["bundle"] == "genai" and (entry.get("passed") if available() else INSTALL in entry["skipped"])
    schema = json.loads((ROOT / "gamexport" / "report.schema.json").read_text())
    jsonschema.validate(json.loads((tmp_path / "out" / "report.json").read_text()), schema)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## onnxruntime-genai" in markdown and ("token-exact" if available() else "`genai/`: not run") in markdown


@needs_genai
def test_broken_bundle_is_one_line(tiny_bundled, tmp_path):
    """A bundle whose graph is not ONNX: one GraphError line naming the bundle, no traceback text."""
    from gamexport.errors import GraphError
    from gamexport.genai_client import GenaiModel

    broken = tmp_path / "genai"
    shutil.copytree(tiny_bundled / "genai", broken)
    (broken / DECODER_FILE).unlink()
    (broken / DECODER_FILE).write_bytes(b"not onnx")
    with pytest.raises(GraphError) as info:
        GenaiModel(broken)
    assert str(broken) in info.value.line() and "\n" not in info.value.line()


@pytest.mark.parametrize("args, needle", [
    (["--runtime", "tensorrt"], "--runtime 'tensorrt' is not one of onnxruntime, genai"),
    (["--runtime", "genai"], "not a build folder"),
])
def test_cli_runtime_bad_input(args, needle, tmp_path):
    """An unknown --runtime, or genai for a checkpoint (not a build folder): one line, non-zero exit."""
    source = [] if args[1] == "tensorrt" else [str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "gamexport.cli.main", "generate", *source, "--ids", "1,2", *args],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and needle in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_build_genai_entry_without_the_client(tiny_plain, tmp_path, monkeypatch):
    """A bundle but no onnxruntime-genai: the entry and the progress line name the install command."""
    import gamexport.genai_client
    from gamexport.pipeline.genai import genai_parity

    staging = tmp_path / "staging"
    shutil.copytree(tiny_plain, staging)
    cfg, _ = read_build(staging)
    lines: list[str] = []
    b = _genai_build(staging, tiny_plain, cfg, ("fp32",), None, lines)
    monkeypatch.setattr(gamexport.genai_client, "available", lambda: False)
    try:
        entries = genai_parity(b)
    finally:
        b.close_runners()
    assert entries == [{"bundle": "genai", "precision": "fp32",
                        "skipped": f"onnxruntime-genai is not installed: {INSTALL}"}]
    assert any("parity skipped" in line and "pip install" in line for line in lines), lines


@needs_genai
def test_parity_dir_reruns_the_bundles_in_its_verdict(tiny_plain, tmp_path):
    """`gamexport parity DIR` runs the folder's bundles through og.Generator as the build does and counts them in
    the same verdict; a bundle whose graph computes something else fails it (planted: the fp32 bundle's graph with
    the final LayerNorm's bias moved, written as a new file and entered in the manifest, so the folder verifies)."""
    import onnx
    from onnx import numpy_helper

    import zoo
    from gamexport.pipeline.recheck import recheck

    folder = _bundled(tiny_plain, tmp_path / "folder")
    result = recheck(folder, precisions=("fp32",), threads=1)
    entry = next(e for e in result["genai"] if e["bundle"] == "genai")
    assert entry["passed"] and entry["gated"] and result["passed"]
    assert result["parity_counts"]["gated_passed"] == sum(r.get("gated", True) for r in result["parity"]) + 1

    graph = folder / "genai" / DECODER_FILE
    model = onnx.load(str(graph))
    bias = next(t for t in model.graph.initializer if t.name == "ln_f.bias")
    moved = numpy_helper.to_array(bias) + 5.0 * np.random.default_rng(0).standard_normal(bias.dims[0])
    bias.CopyFrom(numpy_helper.from_array(moved.astype(np.float32), "ln_f.bias"))
    graph.unlink()   # a hard link to step.onnx: write a new file, leave the graph parity checks intact
    onnx.save(model, str(graph))
    zoo.rewrite_manifest(folder, [f"genai/{DECODER_FILE}"])
    proc = subprocess.run([sys.executable, "-m", "gamexport.cli.main", "parity", str(folder), "--precision", "fp32",
                           "--report", str(tmp_path / "report.json"), "-j", "1"], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "gated parity checks failed (first: onnxruntime-genai fp32 genai/ greedy" in proc.stderr
    assert any(line.startswith("FAIL  onnxruntime-genai fp32") for line in proc.stdout.splitlines()), proc.stdout


def test_og_prompts_never_end_in_the_end_id(tiny_cfg):
    """The og check's prompts (the build's and the re-check's): rows of held-out text cut to the prompt length,
    without those ending in the bundle's end id (og reads a trailing pad id as padding in a batch; the end id
    elsewhere in a prompt is kept: og agreed there); fewer than two left: seeded random ids, which never hold it."""
    from gamexport.pipeline.genai import prompt_ids

    text = np.arange(2, 2 + 5 * 16, dtype=np.int64).reshape(5, 16) % tiny_cfg.vocab_size
    text[1, -1] = text[3, 4] = 1                  # row 1 ends in the end id 1; row 3 holds it inside
    ids, source = prompt_ids(tiny_cfg, text, end_ids={1})
    assert source == "held-out text" and [list(r) for r in ids] == [list(text[i]) for i in (0, 2, 3, 4)]
    ids, source = prompt_ids(tiny_cfg, text[1:3].copy() * 0 + 1, end_ids={1})   # none left: random ids instead
    assert source == "random ids" and ids.shape == (4, 16) and not (ids == 1).any()
    ids, source = prompt_ids(tiny_cfg, text)                  # no end id: the first rows, as they are
    assert source == "held-out text" and (ids == text[:4]).all()


