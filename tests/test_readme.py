"""The README as a new user meets it: every command in it is known and its options parse, the
tour runs as written, the cheap reference commands run, and the Python example runs."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from prismkit.core.cli import build_parser, main
from prismkit.core.host import get_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PREFIX = ".venv/bin/prismkit"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    """Each command of a bash block as argv (comments dropped, ``a ; b`` split; leading
    ``VAR=value`` assignments and a ``nice -n N`` wrapper are not part of the command)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():  # join continued lines
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index(";") if ";" in words else len(words)
            out.append(_unwrapped(words[:cut]))
            words = words[cut + 1 :]
    return [c for c in out if c]


def _unwrapped(argv: list[str]) -> list[str]:
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", argv[0]):
        argv = argv[1:]
    if argv[:2] == ["nice", "-n"]:
        argv = argv[3:]
    return argv


ALL = [c for b in _blocks("bash") for c in _commands(b)]
PRISMKIT = [c for c in ALL if c[0] == PREFIX]
TOUR = _commands(_blocks("bash")[1])


def test_every_command_is_written_to_run():
    assert PRISMKIT and all(c[0] in (PREFIX, "make") for c in ALL), [c for c in ALL if c[0] not in (PREFIX, "make")]  # fmt: skip
    for c in PRISMKIT:
        assert not any(w.startswith("[") or w.endswith("]") for w in c), c  # no [optional] copies


@pytest.mark.parametrize(
    "argv", [c[1:] for c in PRISMKIT], ids=[" ".join(c[1:3]) for c in PRISMKIT]
)
def test_every_command_is_known_and_its_options_parse(argv):
    parser = build_parser(get_plugin_manager())
    if "--help" in argv:
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 0
    else:
        args = parser.parse_args(argv)
        assert callable(args.func)


@pytest.mark.parametrize(
    "argv",
    [c[1:] for c in PRISMKIT if c[1] in ("plugins", "configs", "describe") or "--help" in c],
    ids=lambda a: " ".join(a[:2]),
)
def test_the_cheap_reference_commands_run(argv, capsys):
    if "--help" in argv:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0 and "usage: prismkit" in capsys.readouterr().out
        return
    assert main(argv) == 0
    out = capsys.readouterr().out
    if argv[0] == "describe":
        assert "total" in out and "trainable" in out
    if argv[-1] == "vision.image_size=480":
        assert "480px / 14 -> 1156 tokens" in out  # 34 x 34, as the reference


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A fresh folder with the repository's examples, as the current directory."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_tour_runs_as_written(workdir, capsys):
    assert [c[1] for c in TOUR] == [
        "train",
        "train",
        "eval",
        "caption",
        "ask",
        "experts",
        "experts",
    ]
    outputs = []
    for c in TOUR:
        assert main(c[1:]) == 0, c
        outputs.append(capsys.readouterr().out)
    run = workdir / "runs" / "tour"
    assert len((run / "log.jsonl").read_text().splitlines()) == 20
    assert json.loads((run / "result.json").read_text())["steps"] == 20
    assert "rouge_l" in outputs[2] and "cider" in outputs[2]
    captions = outputs[3].splitlines()
    assert [line.split("\t")[0] for line in captions] == TOUR[3][3:]
    assert outputs[4].strip() in {"red", "green", "blue"}
    assert "3 images: 3 label files written" in outputs[5]
    assert (workdir / "runs" / "gallery.png").is_file()


def test_the_python_example_runs(workdir, capsys):
    (code,) = _blocks("python")[:1]
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1] in ("['red']", "['green']", "['blue']")
    assert (workdir / "runs" / "api" / "model.safetensors").is_file()
