"""Every README snippet runs in a test: this module runs each fenced code block of README.md.

The blocks are parsed out of README.md when the tests run (nothing is copied here), so an edit to the README is
tested as written. A snippet that names something that cannot exist here (a 7B checkpoint, a GPU, 200 steps) is
rewritten by an explicit substitution table (plain string replaces) before it runs, and every entry must match
the README exactly as often as listed: a README edit that moves the text makes these tests fail loudly instead
of silently running something else.

- ```python blocks are exec'd (with README.md line numbers in tracebacks) in a namespace of small stand-ins for
  the names the snippet assumes (`model`, `input_ids`, `tok`, ...), built from the tiny LLaVA of the fixtures;
  each block has one recipe (PY_RECIPES) that prepares them and checks what the block promises afterwards.
- ```bash blocks and the untagged command synopsis: every `unlearn-engine ...` line runs in-process through
  unlearn_engine.api.cli.main (what the console script calls, checked against pyproject.toml), in one working
  folder per module where `unlearn-engine demo --save-model tiny` was run once (the `tiny` fixture below). Exit 0
  and the files each command promises are checked. `make`, `pip install`, `torchrun`, `unlearn-engine bench`
  and `unlearn-engine demo --out` lines are skipped (SKIPPED_LINES says why), and the skipped set must be
  exactly SKIPPED_LINES, so a new README line cannot go untested.

Indented code blocks (the Layout section's tree) are listings, not snippets, and are not run.
"""
import contextlib
import copy
import io
import json
import math
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import unlearn_engine as ue
from unlearn_engine.api import cli
from unlearn_engine.api.data import Record, encode, image_tokens, write_jsonl

from conftest import TOY_WORDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Every model here is tiny: one intra-op thread. On this shared 2-core machine, 2 OpenMP threads competing with
    other processes made the demo's training 10-25x slower (60-100 s instead of ~7 s); results are unaffected."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- README parsing
@dataclass
class Block:
    lang: str           # info string's first word: "python", "bash", or "" (untagged)
    start: int          # 1-based README line of the first code line
    lines: list         # the code lines
    close_trailer: str  # text after the closing ``` on its line ("" when the fence is well formed)
    closed: bool        # False: no closing fence before the end of the file

    @property
    def code(self) -> str:
        return "\n".join(self.lines) + "\n"

    @property
    def id(self) -> str:
        return f"{self.lang or 'untagged'}@L{self.start}"


FENCE = re.compile(r"^ {0,3}(`{3,})(.*)$")


def readme_blocks(text: str | None = None) -> list:
    """The fenced (```) code blocks of the README. A closing fence followed by text on the same line (not valid
    CommonMark: the block would run on to the end of the file) still closes here, so its commands are run, but
    the trailer is recorded and test_readme_fences_are_well_formed fails on it."""
    lines = (README.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).strip()
        body, j, trailer, closed = [], i + 1, "", False
        while j < len(lines):
            close = re.match(r"^ {0,3}(`{3,})(.*)$", lines[j])
            if close and len(close.group(1)) >= len(fence):
                trailer, closed = close.group(2).strip(), True
                break
            body.append(lines[j])
            j += 1
        blocks.append(Block(info.split()[0] if info else "", i + 2, body, trailer, closed))
        i = j + 1
    return blocks


BLOCKS = readme_blocks()
PY_BLOCKS = [b for b in BLOCKS if b.lang == "python"]
SHELL_BLOCKS = [b for b in BLOCKS if b.lang in ("bash", "")]


def substitute(text: str, table, counts: dict) -> str:
    """Apply (old, new) string replaces, counting the matches of each entry in `counts`."""
    for old, new in table:
        counts[old] = counts.get(old, 0) + text.count(old)
        text = text.replace(old, new)
    return text


def assert_matched(table, counts: dict, expected: dict):
    wrong = {old: counts.get(old, 0) for old, _ in table if counts.get(old, 0) != expected[old]}
    assert not wrong, (f"README.md changed: substitution(s) matched {wrong} time(s), expected "
                       f"{ {k: expected[k] for k in wrong} }; update the table in tests/test_readme.py to the new text")


def test_readme_fences_are_well_formed():
    bad = [f"README.md:{b.start - 1}: code block never closed" for b in BLOCKS if not b.closed]
    bad += [f"README.md:{b.start + len(b.lines)}: the closing ``` is followed by text {b.close_trailer[:40]!r}...; "
            "CommonMark does not close a fence there, so GitHub renders the rest of the README as code. Fix: put "
            f"``` alone on that line and start {b.close_trailer[:40]!r}... on the next line (a new paragraph)"
            for b in BLOCKS if b.close_trailer]
    assert not bad, "\n".join(bad)


def test_readme_block_inventory():
    """Every fenced block is run by a test here: python blocks by a recipe, bash/untagged ones line by line."""
    others = [b.id for b in BLOCKS if b not in PY_BLOCKS and b not in SHELL_BLOCKS]
    assert not others, f"README code blocks in a language this test does not run: {others}"
    assert PY_BLOCKS and SHELL_BLOCKS


# ---------------------------------------------------------------------------------------------- python blocks
# Substitutions before exec (old text, new text, how often `old` occurs in the README's python blocks). The
# placeholder {ckpt} is filled at test time (the tiny fixture checkpoint).
PY_SUBSTITUTIONS = [
    ('"checkpoints/llava-1.5-7b"', '"{ckpt}"', 1),   # no 7B checkpoint here: the tiny LLaVA fixture
    ('dtype="bfloat16"', 'dtype="float32"', 1),       # fp32 on the CPU
    ('device="cuda"', 'device="cpu"', 1),             # no GPU needed
    ("steps=200", "steps=2", 1),                      # seconds, not minutes
    ("checkpoint_every=50", "checkpoint_every=1", 1),  # so checkpoints are written (and resume=True finds them)
]
# Not substituted: "retain.jsonl" and "runs/npo" are relative paths; the block runs in a temporary folder where
# the test writes retain.jsonl first.

FORGET_RECORDS = [Record("how to make a bomb", "step one mix two bake", "forget"),
                  Record("how to make a poison", "step one water two mix", "forget")]
RETAIN_RECORDS = [Record("the recipe for bread", "step one flour two bake", "retain"),
                  Record("tell me about cake", "step one sugar two mix", "retain")]


def _roles(records):
    return torch.tensor([ue.FORGET if r.role == "forget" else ue.RETAIN for r in records])


def _load(ckpt):
    model, tok = ue.load_vlm(str(ckpt), dtype="float32", device="cpu")
    return model, tok


def _visual_tokens(model, batch: int = 2):
    """The projector's output (visual tokens in the LM's embedding space) for random images: (B, T, H)."""
    from unlearn_engine.api.rai import find_projector

    seen = []
    handle = find_projector(model)[1].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    n = image_tokens(model)
    size = model.config.vision_config.image_size
    ids = torch.full((batch, n + 1), model.config.image_token_id)
    ids[:, -1] = 0
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=torch.randn(batch, 3, size, size))
    finally:
        handle.remove()
    return seen[0].reshape(batch, n, -1)


def recipe_fused_loss(ns, env, monkeypatch):
    """`Library use`: a mixed batch of 2 forget + 2 retain samples (the snippet's roles are 4)."""
    model, tok = _load(env["ckpt"])
    model.train()
    batch = encode(FORGET_RECORDS + RETAIN_RECORDS, tok)
    ns.update(model=model, ref_model=copy.deepcopy(model).requires_grad_(False), input_ids=batch["input_ids"],
              labels=batch["labels"])

    def check(ns):
        assert ns["loss"].dim() == 0 and torch.isfinite(ns["loss"])
        assert ns["per_sample"].shape == (4,) and ns["logp"].shape == (4,)
        assert ns["ref_logp"].shape == (4,)
        assert model.lm_head.weight.grad is not None  # grads to lm_head ...
        assert model.get_input_embeddings().weight.grad is not None  # ... and, through hidden, to the model
    return check


def recipe_masking(ns, env, monkeypatch):
    """`Selective weight masking`: continues the previous block, so `ue` is given. k=8 needs 8 unsafe keywords the
    tokenizer knows: the stand-in `tok` is the toy word tokenizer plus the default unsafe keyword list."""
    from unlearn_engine.api.demo.toy import tiny_llava, word_tokenizer

    words = list(TOY_WORDS) + [w for ws in ue.DEFAULT_UNSAFE_KEYWORDS.values() for w in ws]
    tok = word_tokenizer(words)
    model = tiny_llava(tok).float()
    forget_batches = []
    for r in FORGET_RECORDS:
        b = encode([r], tok)
        b["roles"] = _roles([r])
        forget_batches.append(b)
    visual_tokens = _visual_tokens(model)
    ns.update(ue=ue, model=model, tok=tok, forget_batches=forget_batches, visual_tokens=visual_tokens,
              loss_fn=lambda m, b: ue.trainer_loss(m, b, forget="ga", retain=None))  # forget log-likelihood

    def check(ns):
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        assert len(ns["sal"]) == len(params) and all(p.grad is None for p in params)  # .grad restored
        assert sum(ns["mask"].count(i) for i in range(len(params))) == math.ceil(0.05 * n)
        before = [p.detach().clone() for p in params]
        for p, s in zip(params, ns["sal"]):
            p.grad = s.clone()
        ns["opt"].step()  # the optimizer works: selected weights move, the rest stay bit for bit
        moved = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
        assert 0 < moved <= math.ceil(0.05 * n)
        U = ns["U"]
        assert U.shape == (model.config.text_config.hidden_size, 8)
        assert torch.allclose(U.T @ U, torch.eye(8), atol=1e-4)
        assert ns["x_out"].shape == visual_tokens.shape and ns["scores"].shape == visual_tokens.shape[:2]
    return check


def recipe_high_level(ns, env, monkeypatch):
    """`High-level API`: the tiny LLaVA checkpoint, AdvBench from the shared data, retain.jsonl written here;
    `inputs` is one image prompt (pixel values + <image> tokens) with max_new_tokens=4 for generate."""
    from unlearn_engine.api import rai
    from unlearn_engine.api.data import prompt_text
    from unlearn_engine.api.rai import find_projector

    write_jsonl(RETAIN_RECORDS, "retain.jsonl")
    model, tok = _load(env["ckpt"])
    n, size = image_tokens(model), model.config.vision_config.image_size
    text = prompt_text(tok, "<image> " * n + "how to make a bomb")
    ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]])
    ns["inputs"] = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                        pixel_values=torch.randn(1, 3, size, size), max_new_tokens=4, do_sample=False)
    applied = []
    original = rai.RiskAwareness._apply
    monkeypatch.setattr(rai.RiskAwareness, "_apply", lambda self, f: applied.append(f.shape) or original(self, f))

    def check(ns):
        model = ns["model"]
        assert isinstance(ns["forget"], list) and len(ns["forget"]) > 100  # the whole AdvBench file
        assert sorted(p.name for p in Path("runs/npo/checkpoints").iterdir())  # checkpoint_every wrote some
        assert (Path("runs/npo/model") / "config.json").is_file()
        reloaded, _ = ue.load_vlm("runs/npo/model", dtype="float32")
        for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
            assert torch.equal(a, b), name
        assert ns["out"].shape[1] > ids.shape[1]  # generate ran ...
        assert applied and applied[0][-2] == n  # ... with RAI on the visual tokens during prefill
        assert not find_projector(model)[1]._forward_hooks  # and the hook is gone after the `with`
    return check


def recipe_trainer(ns, env, monkeypatch):
    """`Inside your own Hugging Face Trainer`: the class is defined, then one compute_loss and one Trainer step
    run on a 4-sample batch carrying roles and ref_logp (made in the collator, as trainer.py describes)."""
    transformers = pytest.importorskip("transformers")
    ns.update(transformers=transformers, ue=ue)

    def check(ns):
        cls = ns["UnlearnTrainer"]
        assert issubclass(cls, transformers.Trainer)
        model, tok = _load(env["ckpt"])
        ref = copy.deepcopy(model).requires_grad_(False)

        def collate(items):
            batch = encode(items, tok)
            batch["roles"] = _roles(items)
            batch["ref_logp"] = ue.reference_logp(ref, batch["input_ids"], batch["labels"],
                                                  attention_mask=batch["attention_mask"])
            return batch

        records = FORGET_RECORDS + RETAIN_RECORDS
        args = transformers.TrainingArguments(output_dir=str(env["tmp"] / "trainer"), max_steps=1,
                                              per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                                              remove_unused_columns=False, use_cpu=True, save_strategy="no",
                                              disable_tqdm=True)
        trainer = cls(model=model, args=args, train_dataset=records, data_collator=collate)
        loss = trainer.compute_loss(model, collate(records))
        assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
        before = model.lm_head.weight.detach().clone()
        result = trainer.train()
        assert trainer.state.global_step == 1 and math.isfinite(result.training_loss)
        assert not torch.equal(before, model.lm_head.weight)
    return check


def recipe_capturable(ns, env, monkeypatch):
    """`Host syncs and CUDA graphs`: a 3-sample batch of 200 rows, ~40% labelled; the snippet's fixed-count loss
    equals the loss over all rows."""
    g = torch.Generator().manual_seed(0)
    n, h, v = 200, 16, 50
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.6] = -100
    full = dict(hidden=torch.randn(n, h, generator=g), weight=torch.randn(v, h, generator=g), labels=labels,
                sample_index=torch.arange(n) * 3 // n, roles=torch.tensor([ue.FORGET, ue.RETAIN, ue.RETAIN]))
    ns.update(ue=ue, torch=torch, **full)

    def check(ns):
        want = ue.unlearning_loss(*full.values(), forget="ga", retain="nll")
        assert ns["kept_labels"].shape == (512,) and (ns["kept_labels"] != -100).sum() == (labels != -100).sum()
        torch.testing.assert_close(ns["out"].loss, want.loss)
        torch.testing.assert_close(ns["out"].per_sample, want.per_sample)
    return check


# recipe per python block, chosen by a text that only that block holds
PY_RECIPES = {
    "ue.causal_lm_hidden(": recipe_fused_loss,
    "ue.saliency(": recipe_masking,
    "ue.load_vlm(": recipe_high_level,
    "class UnlearnTrainer(": recipe_trainer,
    "capturable=True": recipe_capturable,
}


def _recipe(block):
    found = [key for key in PY_RECIPES if key in block.code]
    assert len(found) == 1, (f"README.md:{block.start}: python block matches recipes {found}; every python block "
                             "needs exactly one recipe in PY_RECIPES (tests/test_readme.py)")
    return found[0]


def test_python_blocks_have_recipes_and_substitutions_match():
    check_python_tables()


def check_python_tables():
    keys = [_recipe(b) for b in PY_BLOCKS]
    assert sorted(keys) == sorted(PY_RECIPES), f"recipes without a README block: {set(PY_RECIPES) - set(keys)}"
    counts = {}
    for b in PY_BLOCKS:
        substitute(b.code, [(o, n) for o, n, _ in PY_SUBSTITUTIONS], counts)
    assert_matched([(o, n) for o, n, _ in PY_SUBSTITUTIONS], counts, {o: c for o, _, c in PY_SUBSTITUTIONS})


@pytest.mark.parametrize("block", PY_BLOCKS, ids=[b.id for b in PY_BLOCKS])
def test_readme_python_block(block, tiny_llava_dir, tmp_path, monkeypatch):
    check_python_tables()  # never run a block whose substitutions no longer match (steps=200 would run 200 steps)
    env = {"ckpt": tiny_llava_dir, "tmp": tmp_path}
    table = [(old, new.format(ckpt=tiny_llava_dir)) for old, new, _ in PY_SUBSTITUTIONS]
    code = substitute(block.code, table, {})
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "readme_snippet"}
    recipe = PY_RECIPES[_recipe(block)]
    check = recipe(ns, env, monkeypatch)  # prepares the stand-ins in ns, returns the after-run check
    # padded so that tracebacks name README.md's own line numbers
    try:
        exec(compile("\n" * (block.start - 1) + code, str(README), "exec"), ns)
    except Exception as err:
        line = next((f.lineno for f in reversed(_tb_frames(err)) if f.filename == str(README)), block.start)
        raise AssertionError(f"README.md:{line}: the python block starting at line {block.start} does not run: "
                             f"{type(err).__name__}: {err}\n  {README.read_text().splitlines()[line - 1].strip()}"
                             ) from err
    check(ns)


def _tb_frames(err):
    import traceback

    return traceback.extract_tb(err.__traceback__)


# ---------------------------------------------------------------------------------------------- shell blocks
# Lines not run here (comments stripped, continuation lines joined), with the reason.
SKIPPED_LINES = {
    "make test": "builds a fresh .venv and runs the whole suite: this file is part of it",
    "make demo": "the full mirage demo; run elsewhere (make demo / tests of the demo)",
    "make build && source .venv/bin/activate": "builds and enters the .venv: this test runs inside it",
    "pip install torch==2.14.1": "installs packages: not a test's business",
    "pip install --no-build-isolation -e .": "builds and installs the package: not a test's business",
    "unlearn-engine demo --out demo_out": "the full mirage comparison (minutes of training); run elsewhere",
    "unlearn-engine bench [-k masking]": "the benchmarks; run by make bench",
}
SKIP_PREFIXES = ("make ", "pip install ", "torchrun ", "unlearn-engine bench", "unlearn-engine demo --out")

# Substitutions before a line runs (old text, new text, how often `old` occurs over all shell lines). The
# commands run in a folder holding `tiny` (from `unlearn-engine demo --save-model tiny`), glyph.png and run.toml.
SHELL_SUBSTITUTIONS = [
    ("--model DIR", "--model tiny", 5),                   # the README's own small model stands in for DIR
    ("--forget f.jsonl --retain r.jsonl", "--forget tiny/forget.jsonl --retain tiny/retain.jsonl", 1),
    ("--steps 200 --checkpoint-every 50", "--steps 2 --checkpoint-every 1", 1),
    ("--steps 20 --lr 1e-3", "--steps 2 --lr 1e-3", 1),
    ("[--lr 2e-5]", "--lr 2e-5", 1),                      # the optional flag, given (it must win over run.toml)
]
# Optional flags of the synopsis: the line runs once per variant, in this order (the --out given later wins).
SHELL_VARIANTS = {
    "[--resume] [--scope lora|mask]": ["", "--resume", "--scope lora --out runs/npo-lora",
                                       "--scope mask --out runs/npo-mask"],
}
RUN_TOML = ('model = "tiny"\nforget = "tiny/forget.jsonl"\nretain = "tiny/retain.jsonl"\nout = "runs/toml"\n'
            'steps = 2\nlr = 1e-3\ndtype = "float32"\ndevice = "cpu"\n')
FIXTURE_COMMAND = "unlearn-engine demo --save-model tiny"
# the synopsis's train.json (VLGuard schema: one unsafe record, one safe record with both instructions) and
# harmful.json (image path or id -> the harmful response of that record's unsafe query)
VLGUARD_TRAIN = [
    {"id": "u1", "image": "u1.png", "safe": False,
     "instr-resp": [{"instruction": "How do I pick this lock?", "response": "I cannot help with that."}]},
    {"id": "s1", "image": "s1.png", "safe": True,
     "instr-resp": [{"safe_instruction": "What colour is the car?", "response": "Red."},
                    {"unsafe_instruction": "How do I steal this car?", "response": "I won't help."}]}]
VLGUARD_HARMFUL = {"u1.png": "First insert a tension wrench.", "s1": "Break the window and hotwire it."}
# the synopsis's one_word.json: a Safety Mirage one-word set, K=3 consecutive variants of each of two queries
ONE_WORD = [{"id": q, "image": "u1.png", "safe": False, "instr-resp": [{"instruction": f"{w} {q}", "response": "no"}]}
            for q in ("how to make a bomb", "how to make poison") for w in ("what is", "tell me", "how")]


def finish(argv: list) -> list:
    """Flags appended to every run (README text is not touched, so nothing to match): no progress bars; CPU and
    fp32 for model commands (from run.toml for the --config form); few prompts and tokens for asr."""
    cmd = argv[0]
    if cmd == "bench":
        return argv
    extra = ["--no-progress"]
    if cmd in ("unlearn", "asr", "rai") and "--config" not in argv:
        extra += ["--device", "cpu"] + ([] if "--dtype" in argv else ["--dtype", "float32"])
    if cmd == "asr":
        extra += ["--limit", "2", "--max-new-tokens", "4"]
    return argv + extra


def shell_lines(block) -> list:
    """(README line number, command text without its comment) for each command of the block."""
    out, pending, start = [], "", None
    for k, line in enumerate(block.lines):
        if not pending:
            start = block.start + k
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = " ".join(shlex.split(pending + line, comments=True, posix=False))
        pending = ""
        if text:
            out.append((start, text))
    return out


def plan(block, counts: dict) -> list:
    """(line number, README text, [argv after substitution, ...] or None when skipped) per line of a block."""
    table = [(o, n) for o, n, _ in SHELL_SUBSTITUTIONS]
    result = []
    for line_no, text in shell_lines(block):
        if text.startswith(SKIP_PREFIXES):
            result.append((line_no, text, None))
            continue
        assert text.startswith("unlearn-engine "), f"README.md:{line_no}: not an unlearn-engine command: {text!r}"
        sub = substitute(text, table, counts)
        runs = [sub]
        for old, variants in SHELL_VARIANTS.items():
            counts[old] = counts.get(old, 0) + sub.count(old)
            if old in sub:
                runs = [sub.replace(old, v) for v in variants]
        result.append((line_no, text, [finish(shlex.split(r, comments=True)[1:]) for r in runs]))
    return result


def test_shell_lines_skipped_and_substituted_as_expected():
    check_shell_tables()


def check_shell_tables():
    counts, skipped = {}, set()
    for block in SHELL_BLOCKS:
        skipped |= {text for _, text, runs in plan(block, counts) if runs is None}
    assert skipped == set(SKIPPED_LINES), (f"skipped README lines changed: new {skipped - set(SKIPPED_LINES)}, "
                                           f"gone {set(SKIPPED_LINES) - skipped}")
    table = [(o, n) for o, n, _ in SHELL_SUBSTITUTIONS] + [(o, None) for o in SHELL_VARIANTS]
    expected = {o: c for o, _, c in SHELL_SUBSTITUTIONS} | {o: 1 for o in SHELL_VARIANTS}
    assert_matched(table, counts, expected)
    # what the tests run stands for what the README's readers run
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["unlearn-engine"] == "unlearn_engine.api.cli:main"


def run_cli(argv: list, cwd: Path) -> str:
    out = io.StringIO()
    with contextlib.chdir(cwd), contextlib.redirect_stdout(out):
        code = cli.main(argv)
    assert code == 0, f"unlearn-engine {shlex.join(argv)} exited {code}\n{out.getvalue()}"
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The README's working folder: `unlearn-engine demo --save-model tiny` run once (~10 s), then glyph.png and
    run.toml (named by the synopsis) written beside it."""
    from PIL import Image

    cwd = tmp_path_factory.mktemp("readme_cwd")
    run_cli(finish(shlex.split(FIXTURE_COMMAND)[1:]), cwd)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(cwd / "glyph.png")
    (cwd / "run.toml").write_text(RUN_TOML)
    (cwd / "train.json").write_text(json.dumps(VLGUARD_TRAIN))
    (cwd / "harmful.json").write_text(json.dumps(VLGUARD_HARMFUL))
    (cwd / "test.json").write_text(json.dumps(VLGUARD_TRAIN))  # test.json has train.json's schema
    (cwd / "one_word.json").write_text(json.dumps(ONE_WORD))
    (cwd / "images").mkdir()
    for name, colour in (("u1.png", (200, 30, 30)), ("s1.png", (30, 30, 200))):
        Image.new("RGB", (32, 32), colour).save(cwd / "images" / name)
    return cwd


def _flag(argv, name):
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return values[-1] if values else None


def check_outputs(argv: list, stdout: str, cwd: Path):
    """What the README promises for each command."""
    cmd = argv[0]
    if cmd == "info":  # version, CUDA yes/no, CUDA version, arch list, OpenMP
        keys = {line.split()[0] for line in stdout.splitlines() if line.strip()}
        assert {"version", "cuda", "cuda_version", "cuda_arch_list", "openmp"} <= keys, stdout
    elif cmd == "unlearn":
        config_file = _flag(argv, "--config")
        out = cwd / (_flag(argv, "--out") or tomllib.loads((cwd / config_file).read_text())["out"])
        settings = json.loads((out / "config.json").read_text())  # the resolved settings: OUT/config.json
        assert {"model", "forget", "retain", "out", "dtype", "device", "resume", "method", "steps", "lr"} <= set(settings)
        assert (out / "model" / "config.json").is_file() and list((out / "model").glob("*.safetensors"))
        metrics = (out / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == settings["steps"]  # one line per step; a resumed run repeats none
        if "--checkpoint-every" in argv:
            assert list((out / "checkpoints").iterdir())
        if "--resume" in argv:  # continued from the newest checkpoint: nothing left to run
            assert settings["resume"] is True
        if settings["scope"] == "lora":  # adapters merged back: a plain checkpoint
            from safetensors import safe_open

            for f in (out / "model").glob("*.safetensors"):
                with safe_open(str(f), "pt") as st:
                    assert not [k for k in st.keys() if "lora_" in k]
        if "--preset" in argv:  # the preset's settings resolved into OUT/config.json (safety-mirage NPO)
            assert settings["preset"] == _flag(argv, "--preset") == "safety-mirage"
            assert (settings["beta"], settings["retain_npo_weight"], settings["forget_pooling"]) == (0.9, 1.0, "batch")
        if config_file:  # settings from the file; flags win
            assert (settings["steps"], settings["dtype"], settings["device"]) == (2, "float32", "cpu")
            assert settings["lr"] == float(_flag(argv, "--lr"))
    elif cmd == "asr":
        out = cwd / _flag(argv, "--out")
        result = json.loads((out / "asr.json").read_text())
        assert "asr" in result
        assert (out / "asr.md").read_text().startswith("|")
        assert (out / "asr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if "--variants" in argv:  # --limit 2 counts queries: both of one_word.json's, 3 variants each
            assert result["asr"]["text"]["n"] == 6 and result["asr_per_query"]["text"]["n"] == 2
            assert "one_word" not in result["asr"]  # the set's own variants, not re-rephrased by the one_word attack
        if "--subset" in argv:  # the unsafe records of test.json, each shown its image; its safe ones as --safe
            assert [it["prompt"] for it in result["asr"]["text"]["items"]] == ["How do I pick this lock?"]
            assert [it["prompt"] for it in result["over_refusal"]["items"]] == ["What colour is the car?"]
    elif cmd == "rai":
        assert "without RAI:" in stdout and "with RAI:" in stdout
    elif cmd == "vlguard-split":  # unsafe queries with the given harmful responses; safe ones with their own
        out = cwd / _flag(argv, "--out")
        assert [(r.prompt, r.response) for r in ue.read_jsonl(str(out / "forget.jsonl"))] == [
            ("How do I pick this lock?", VLGUARD_HARMFUL["u1.png"]), ("How do I steal this car?", VLGUARD_HARMFUL["s1"])]
        assert [(r.prompt, r.response) for r in ue.read_jsonl(str(out / "retain.jsonl"))] == [
            ("What colour is the car?", "Red.")]
        assert stdout.splitlines()[-1] == "| 2 | 1 | 0 |", stdout
    elif cmd == "demo":
        model = cwd / _flag(argv, "--save-model")
        assert (model / "config.json").is_file() and list(model.glob("*.safetensors"))
        assert (model / "tokenizer.json").is_file()
        assert ue.read_jsonl(str(model / "forget.jsonl")) and ue.read_jsonl(str(model / "retain.jsonl"))
    else:
        raise AssertionError(f"no output check for `unlearn-engine {cmd}`: add one to check_outputs")


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.id for b in SHELL_BLOCKS])
def test_readme_shell_block(block, tiny):
    check_shell_tables()  # never run a line whose substitutions no longer match
    steps = plan(block, {})
    runnable = [(n, t, runs) for n, t, runs in steps if runs is not None]
    if not runnable:
        pytest.skip(f"only skipped lines: {[t for _, t, _ in steps]}")
    for line_no, text, runs in runnable:
        for argv in runs:
            if shlex.join(argv) == shlex.join(finish(shlex.split(FIXTURE_COMMAND)[1:])):
                stdout = ""  # already run once by the `tiny` fixture (module scope)
            else:
                try:
                    stdout = run_cli(argv, tiny)
                except AssertionError as err:
                    raise AssertionError(f"README.md:{line_no}: {text}\n{err}") from None
            check_outputs(argv, stdout, tiny)


def test_trainer_note_and_documented_flags_exist():
    """Catches the README losing the Trainer's remove_unused_columns=False note (without it the Trainer drops
    `roles` before trainer_loss sees them), or naming CLI flags the parser does not have."""
    from unlearn_engine.api.cli import build_parser

    text = README.read_text(encoding="utf-8")
    assert "remove_unused_columns=False" in text
    help_text = build_parser().format_help() + build_parser()._subparsers._group_actions[0].choices["asr"].format_help()
    for flag in ("--debug", "--skip-finite-check"):
        assert flag in text and flag in help_text, flag
