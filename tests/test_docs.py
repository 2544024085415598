"""The documentation as a reader meets it: README.md and docs/**/*.md.

- The site builds with `mkdocs build --strict`, and the strict build really fails on a broken link, a missing
  anchor, an absolute link and a page left out of the nav (each tried on a copy of docs/). README.md's own links
  (GitHub reads them; MkDocs never sees the README) point to files that exist and to anchors the built pages have.
- Every ```python block runs, in the order of its page, the blocks of a page sharing their names as a reader's
  session would, against a tiny offline Florence-2: hub ids such as microsoft/Florence-2-base-ft are found in a
  temporary Hugging Face cache (HF_HUB_OFFLINE=1) that holds the tiny checkpoint under that id, so the loader's real
  hub path runs; files the blocks open (invoice.png, ...) are in the working folder. A block preceded by
  `<!-- notest: why -->` is not run (it must say why). A comment after an expression or an assignment that reads
  as a Python literal (`# {'<OD>': {'bboxes': [[x1, y1, x2, y2], ...], 'labels': [...]}}`) is checked as the
  shape of the value: the same dict keys, lists whose items match, strings where strings, numbers where names.
- Every command of a ```bash block or an inline `python ...` span (`python -m florence2 ...`, `python -m
  training.finetune ...`, `python tools/x.py ...`, under torchrun too) uses only flags its `--help` lists.
- README.md stays at most 200 lines.
"""

from __future__ import annotations

import ast
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import tokenize
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from .conftest import BIAS, FIXTURES, offline_hub_cache

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOC_FILES = [README, *sorted(DOCS.rglob("*.md"))]
README_MAX_LINES = 200

# the hub ids the blocks may load; each is the tiny checkpoint in the temporary cache
DOC_REPOS = (
    "microsoft/Florence-2-base-ft",
    "microsoft/Florence-2-base",
    "microsoft/Florence-2-large-ft",
    "microsoft/Florence-2-large",
    "HuggingFaceM4/Florence-2-DocVQA",
)
# the images the blocks open, from the tests' fixtures
TEXT_POSITIONS = 1024
EOS, EOS_BOOST = 2, 1.0
DOC_IMAGES = {"invoice.png": "rgb_640x480.png", "photo.jpg": "rgb_640x480.png", "page.png": "rgba_300x900.png",
              "street.jpg": "rgb_640x480.png"}
# the server the pages' client blocks talk to; a page that names it gets a real one (python -m florence2.serve
# --model microsoft/Florence-2-base-ft from the temporary cache) on a free port, put in the blocks' place of this
DOC_SERVER = "127.0.0.1:8000"

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
NOTEST = re.compile(r"^\s*<!--\s*notest:\s*(?P<why>\S.*?)\s*-->\s*$")


@dataclass
class Block:
    path: Path
    line: int  # of the block's first line of code, 1-based
    lang: str
    code: str
    notest: str | None  # why it does not run

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, indented ones (in list items) too, their indentation removed."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        before = next((line for line in reversed(lines[:i]) if line.strip()), "")
        why = NOTEST.match(before)
        body, j = [], i + 1
        while j < len(lines) and not re.fullmatch(rf"[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*", lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        blocks.append(Block(path, i + 2, opening["info"].lower(), "\n".join(body) + "\n", why and why["why"]))
        i = j + 1
    return blocks


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


# ------------------------------------------------------------------------------------------------ README length
def test_readme_is_at_most_200_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the detail to docs/ (at most 200)"


# ------------------------------------------------------------------------------------------------ the site
def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        capture_output=True,
        text=True,
        cwd=config.parent,
        env={**_env(), "NO_MKDOCS_2_WARNING": "1"},
    )


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site") / "site"
    built = mkdocs_build(ROOT / "mkdocs.yml", folder)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    return folder


def test_the_site_builds_strictly(site):
    assert (site / "index.html").is_file()
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    assert nav, "mkdocs.yml has a nav"


BREAKAGES = {  # what is done to a copy of docs/, and the warning --strict must fail on
    "broken link": ("index.md", "\n[a page](no-such-page.md)\n", r"no-such-page\.md.*not found"),
    "missing anchor": ("index.md", "\n[a section](install.md#no-such-section)\n", r"no-such-section"),
    "absolute link": ("index.md", "\n[the root](/install/)\n", r"absolute link"),
    "page outside the nav": ("left-out.md", "# Left out\n", r"not included in the \"nav\""),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_the_strict_build_fails_on(breakage, tmp_path):
    page, text, warning = BREAKAGES[breakage]
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    with open(tmp_path / "docs" / page, "a") as f:
        f.write(text)
    built = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0, f"the strict build passed with a {breakage}"
    assert re.search(warning, built.stdout + built.stderr), built.stdout + built.stderr


LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


def test_readme_links_reach_files_and_anchors(site):
    problems = link_problems(README.read_text(), site)
    assert not problems, "README.md:\n" + "\n".join(problems)


def test_a_broken_readme_link_is_found(site):
    text = "[a](docs/install.md) [b](docs/no-such.md) [c](docs/evaluate.md#metrics) [d](docs/evaluate.md#no-such)"
    assert link_problems(text, site) == [
        "docs/no-such.md: no such file",
        "docs/evaluate.md#no-such: evaluate/index.html has no anchor 'no-such'",
    ]


def link_problems(text: str, site: Path) -> list[str]:
    """Where the relative links of a README-level text (paths from the repository's root) lead nowhere."""
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / path) if path else README
        if not file.exists():
            problems.append(f"{target}: no such file")
        elif anchor:
            relative = file.relative_to(DOCS).with_suffix("") if file.is_relative_to(DOCS) else None
            if relative is None:
                problems.append(f"{target}: an anchor outside docs/ (only the docs' pages are checked)")
                continue
            page = site / ("index.html" if relative.name == "index" else relative / "index.html")
            if f'id="{anchor}"' not in page.read_text():
                problems.append(f"{target}: {page.relative_to(site)} has no anchor {anchor!r}")
    return problems


# ------------------------------------------------------------------------------------------------ python blocks
PYTHON_PAGES = [path for path in DOC_FILES if any(b.lang in ("python", "py") for b in code_blocks(path))]


@pytest.fixture(scope="module")
def doc_checkpoint(tmp_path_factory) -> Path:
    """A tiny Florence-2 that answers fast: 64 px images (5 image tokens), the base model's 1024 text positions, and
    its random weights nudged towards the end token (as the export tests do), so that answers end within a few
    dozen tokens where random weights would run to max_new_tokens."""
    from florence2 import Florence2
    from florence2.config import PRESETS, with_changes
    from florence2.processor import Florence2Processor

    folder = tmp_path_factory.mktemp("doc_model") / "tiny"
    config = with_changes(PRESETS["tiny"], text={"max_position_embeddings": TEXT_POSITIONS})
    Florence2.from_config(config, seed=0).save_pretrained(folder)
    Florence2Processor(image_size=64).save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    state[BIAS][0, EOS] += EOS_BOOST
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_adapter(folder: Path, checkpoint: Path) -> None:
    """A LoRA adapter as peft's PeftModel.save_pretrained writes it (Microsoft's module names), on two layers."""
    from safetensors.torch import save_file

    d = json.loads((checkpoint / "config.json").read_text())["text_config"]["d_model"]
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in (0, 1):
        module = f"base_model.model.language_model.model.encoder.layers.{layer}.self_attn.q_proj"
        tensors[f"{module}.lora_A.weight"] = torch.randn(4, d, generator=generator)
        tensors[f"{module}.lora_B.weight"] = torch.randn(d, 4, generator=generator)
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q_proj"],
                "bias": "none",
                "base_model_name_or_path": "microsoft/Florence-2-base-ft",
            }
        )
    )


@pytest.fixture(scope="module")
def doc_export(doc_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported to ONNX, fp32 and int8, for the pages that run OnnxFlorence2."""
    from florence2.export import export

    return export(doc_checkpoint, tmp_path_factory.mktemp("doc_export") / "onnx", quantize="int8")


@pytest.fixture
def doc_session(doc_checkpoint, tmp_path, monkeypatch, one_thread):
    """A working folder with the blocks' files and a Hugging Face cache with DOC_REPOS, offline."""
    offline_hub_cache(monkeypatch, tmp_path / "hub", doc_checkpoint, DOC_REPOS, files=None)
    # SAHI turns PIL's decompression-bomb guard off for the whole process when it opens a path (sliced-inference.md):
    # put it back after the page, for the tests that follow in this process
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    work = tmp_path / "work"
    work.mkdir()
    for name, fixture in DOC_IMAGES.items():
        Image.open(FIXTURES / "tiny" / "images" / fixture).convert("RGB").save(work / name)
    write_adapter(work / "path" / "to" / "adapter", doc_checkpoint)
    monkeypatch.chdir(work)
    return work


def shape_of(comment: str):
    """The shape a comment such as `{'<OD>': {'bboxes': [[x1, y1, x2, y2], ...]}}` describes, or None when the comment
    is prose."""
    text = comment.lstrip("#").strip()
    if not text or text[0] not in "{['\"":
        return None
    try:
        return ast.parse(text, mode="eval").body
    except SyntaxError:
        return None


def shape_problems(value, shape: ast.expr, where: str = "") -> list[str]:
    """How `value` differs from the shape (empty when it matches)."""
    if isinstance(shape, ast.Constant) and shape.value is Ellipsis:
        return []
    if isinstance(shape, ast.Name):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return [] if ok else [f"{where or 'value'}: a number expected, got {value!r}"]
    if isinstance(shape, ast.Constant):
        kind = str if isinstance(shape.value, str) else (int, float) if isinstance(shape.value, (int, float)) else None
        ok = kind is None or isinstance(value, kind)
        return [] if ok else [f"{where or 'value'}: {type(shape.value).__name__} expected, got {value!r}"]
    if isinstance(shape, ast.Dict):
        if not isinstance(value, dict):
            return [f"{where or 'value'}: a dict expected, got {type(value).__name__}"]
        keys = [ast.literal_eval(k) for k in shape.keys]
        if set(keys) != set(value):
            return [f"{where or 'value'}: keys {sorted(keys)} expected, got {sorted(value)}"]
        return [p for k, s in zip(keys, shape.values) for p in shape_problems(value[k], s, f"{where}[{k!r}]")]
    if isinstance(shape, (ast.List, ast.Tuple)):
        if not isinstance(value, (list, tuple)):
            return [f"{where or 'value'}: a list expected, got {type(value).__name__}"]
        items = [s for s in shape.elts if not (isinstance(s, ast.Constant) and s.value is Ellipsis)]
        if len(items) == len(shape.elts) and len(value) != len(items):  # no `...`: exactly these items
            return [f"{where or 'value'}: {len(items)} items expected, got {len(value)}"]
        if not items:
            return []
        last = len(items) - 1
        return [p for i, v in enumerate(value) for p in shape_problems(v, items[min(i, last)], f"{where}[{i}]")]
    raise AssertionError(f"cannot read the shape {ast.unparse(shape)}")


def comments_by_line(code: str) -> dict[int, str]:
    tokens = tokenize.generate_tokens(io.StringIO(code).readline)
    return {t.start[0]: t.string for t in tokens if t.type == tokenize.COMMENT}


def run_block(block: Block, namespace: dict) -> list[str]:
    """Runs the block statement by statement; returns where a value differs from the shape its comment gives."""
    tree = ast.parse(block.code, filename=str(block.path))
    ast.increment_lineno(tree, block.line - 1)
    comments = {line + block.line - 1: c for line, c in comments_by_line(block.code).items()}
    filename = str(block.path)
    problems = []
    for statement in tree.body:
        shape = shape_of(comments.get(statement.end_lineno, ""))
        exec(compile(ast.Module([statement], type_ignores=[]), filename, "exec"), namespace)
        if shape is None:
            continue
        if isinstance(statement, ast.Expr):
            value = eval(compile(ast.Expression(statement.value), filename, "eval"), namespace)  # again, to see it
        elif isinstance(statement, ast.Assign) and isinstance(statement.targets[0], ast.Name):
            value = namespace[statement.targets[0].id]
        else:
            continue
        where = f"{block.path.relative_to(ROOT)}:{statement.lineno}"
        problems += [f"{where}: {p}" for p in shape_problems(value, shape)]
    return problems


@pytest.mark.parametrize("path", PYTHON_PAGES, ids=doc_id)
def test_python_blocks_run(path, doc_session, request):
    if "exports/base-ft" in path.read_text():  # what `python -m florence2.export ... exports/base-ft` writes
        (doc_session / "exports").mkdir()
        (doc_session / "exports" / "base-ft").symlink_to(request.getfixturevalue("doc_export"))
    blocks = [b for b in code_blocks(path) if b.lang in ("python", "py") and not b.notest]
    if any(DOC_SERVER in b.code for b in blocks):
        from .serving import ServerProcess

        server = ServerProcess(DOC_REPOS[0], doc_session / "server.log")
        request.addfinalizer(server.close)
        blocks = [replace(b, code=b.code.replace(DOC_SERVER, server.url.removeprefix("http://"))) for b in blocks]
    namespace = {"__name__": "__docs__"}
    problems = []
    for block in blocks:
        problems += run_block(block, namespace)
    assert not problems, "\n".join(problems)


def test_blocks_that_do_not_run_say_why():
    """Every `notest` marker names its reason, and only python blocks have one (a command block is never run)."""
    for path in DOC_FILES:
        for block in code_blocks(path):
            if block.notest is not None:
                assert block.lang in ("python", "py"), f"{block.where}: notest on a {block.lang} block"
                assert len(block.notest.split()) >= 3, f"{block.where}: say why it does not run"


def test_blocks_are_read_with_their_markers(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Text.\n\n<!-- notest: needs a CUDA device -->\n```python\nmodel.cuda()\n```\n\n"
        '- a list item:\n\n  ```bash\n  python -m florence2 a.png --task "<OD>"\n  ```\n\n````text\n```\n````\n'
    )
    blocks = code_blocks(page)
    assert [(b.lang, b.code, b.notest) for b in blocks] == [
        ("python", "model.cuda()\n", "needs a CUDA device"),
        ("bash", 'python -m florence2 a.png --task "<OD>"\n', None),
        ("text", "```\n", None),
    ]
    assert blocks[0].line == 5


def test_shapes_are_checked():
    """The comment checker accepts what the README promises and refuses what differs."""
    shape = shape_of("# {'<OD>': {'bboxes': [[x1, y1, x2, y2], ...], 'labels': [...]}}")
    assert shape_problems({"<OD>": {"bboxes": [[1.0, 2.0, 3.0, 4.5]], "labels": ["car"]}}, shape) == []
    assert shape_problems({"<OD>": {"bboxes": [], "labels": []}}, shape) == []
    assert shape_problems({"<OD>": {"bboxes": [[1.0, 2.0, 3.0]], "labels": []}}, shape)  # three coordinates
    assert shape_problems({"<OD>": {"bboxes": [], "labels": [], "scores": []}}, shape)  # a key more
    assert shape_problems({"<OD>": "car"}, shape)
    assert shape_problems("an answer", shape_of("# {'<DocVQA>': '$1,234.00'}"))
    assert shape_problems({"<DocVQA>": "an answer"}, shape_of("# {'<DocVQA>': '$1,234.00'}")) == []
    assert shape_of("# a hub id or a local folder") is None


# ------------------------------------------------------------------------------------------------ command flags
@dataclass(frozen=True)
class Command:
    where: str
    program: tuple[str, ...]  # what runs before --help: ("-m", "florence2", "predict") or ("tools/benchmark.py",)
    flags: tuple[str, ...]


SEPARATORS = {";", "&", "&&", "|", "||", "(", ")"}
KEYWORDS = {"do", "then", "else", "time", "exec"}


def commands_in(text: str, where: str) -> list[Command]:
    """This package's commands in a piece of shell: python -m florence2[.x] / training.x, python tools/x.py,
    torchrun ... -m x; continuation lines joined, comments dropped, `a; b`, `a && b`, `for ...; do a & done` split."""
    commands = []
    for line in shell_lines(text, where):
        words = []
        for token in [*shell_words(line), ";"]:
            if token not in SEPARATORS:
                words.append(token)
                continue
            while words and (words[0] in KEYWORDS or re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0])):
                words.pop(0)
            command = ours(words)
            if command is not None:
                commands.append(Command(where, *command))
            words = []
    return commands


def shell_words(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
    lexer.whitespace_split = True
    return list(lexer)


def shell_lines(text: str, where: str) -> list[str]:
    """The shell's logical lines: continuations joined, and a quote that spans lines (curl -d '{...}') kept whole."""
    lines, pending = [], None
    for line in text.replace("\\\n", " ").splitlines():
        pending = line if pending is None else f"{pending}\n{line}"
        try:
            shell_words(pending)
        except ValueError:  # no closing quotation yet
            continue
        lines.append(pending)
        pending = None
    assert pending is None, f"{where}: a quote that never closes"
    return lines


def ours(words: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    if not words or words[0] not in ("python", "python3", "torchrun"):
        return None
    if words[0] == "torchrun":
        if "-m" not in words:
            return None
        words = ["python", *words[words.index("-m") :]]
    if len(words) > 2 and words[1] == "-m" and re.fullmatch(r"(florence2|training)(\.\w+)*", words[2]):
        program, rest = ("-m", words[2]), words[3:]
        if words[2] == "florence2" and rest[:1] == ["predict"]:
            program, rest = (*program, "predict"), rest[1:]
    elif len(words) > 1 and re.fullmatch(r"tools/\w+\.py", words[1]):
        program, rest = (words[1],), words[2:]
    else:
        return None
    return program, tuple(w.split("=")[0] for w in rest if w.startswith("--"))


INLINE_COMMAND = re.compile(r"`((?:python|torchrun) [^`]+)`")


def all_commands() -> list[Command]:
    commands = []
    for path in DOC_FILES:
        for block in code_blocks(path):
            if block.lang in ("bash", "sh", "shell", "console"):
                commands += commands_in(block.code, block.where)
        text = re.sub(r"(?ms)^[ \t]*(`{3,}|~{3,}).*?^[ \t]*\1", "", path.read_text())  # outside the blocks
        for number, line in enumerate(text.splitlines(), 1):
            for span in INLINE_COMMAND.findall(line):
                commands += commands_in(span, f"{path.relative_to(ROOT)} (inline, near line {number})")
    return commands


def help_text(program: tuple[str, ...]) -> str:
    run = subprocess.run([sys.executable, *program, "--help"], capture_output=True, text=True, cwd=ROOT, env=_env())
    assert run.returncode == 0, f"{' '.join(program)} --help failed: {run.stderr[-2000:]}"
    return run.stdout


def test_command_flags_exist():
    commands = all_commands()
    programs = sorted({c.program for c in commands})
    assert ("-m", "training.finetune") in programs and ("-m", "florence2", "predict") in programs  # the parser works
    with ThreadPoolExecutor(max_workers=2) as pool:
        helps = dict(zip(programs, pool.map(help_text, programs)))
    problems = missing_flags(commands, helps)
    assert not problems, "flags that the commands' --help does not list:\n" + "\n".join(problems)


def missing_flags(commands: list[Command], helps: dict[tuple[str, ...], str]) -> list[str]:
    return [
        f"{c.where}: {' '.join(c.program)} has no {flag}"
        for c in commands
        for flag in c.flags
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", helps[c.program])
    ]


def test_a_flag_the_help_does_not_list_is_found():
    helps = {("-m", "training.evaluate"): "usage: ... [--split SPLIT] [--no-train-vision]\n  --output-dir OUTPUT_DIR"}
    commands = commands_in("python -m training.evaluate --split test --output-dir o --outputdir p --train-vision", "x")
    assert missing_flags(commands, helps) == [
        "x: -m training.evaluate has no --outputdir",
        "x: -m training.evaluate has no --train-vision",
    ]


def test_commands_are_parsed():
    """The block parser finds the commands a reader would type, and their flags."""
    text = (
        'python -m florence2 predict photos/ --task "<OD>" \\\n    --output a.jsonl  # a comment --not-a-flag\n'
        "torchrun --nproc_per_node=8 -m training.docvqa --output-dir runs/ddp\n"
        "for i in 0 1; do CUDA_VISIBLE_DEVICES=$i python -m florence2.serve --model m --port 800$i & done\n"
        "pip install -e . && python tools/benchmark.py --tasks onnx; python -m pytest -q\n"
    )
    assert [(c.program, c.flags) for c in commands_in(text, "")] == [
        (("-m", "florence2", "predict"), ("--task", "--output")),
        (("-m", "training.docvqa"), ("--output-dir",)),
        (("-m", "florence2.serve"), ("--model", "--port")),
        (("tools/benchmark.py",), ("--tasks",)),
    ]
