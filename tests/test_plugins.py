"""The plugin host: entry points, plugins.toml, strict registration, a real third-party distribution."""

from __future__ import annotations

import sys
import textwrap

import pytest

from prismkit import hookimpl
from prismkit.core.cli import main
from prismkit.core.host import PluginError, PluginsConfig, get_plugin_manager


def test_builtins_are_entry_point_plugins():
    host = get_plugin_manager()
    names = {p.name for p in host.plugins}
    assert {"vision", "language", "adapters", "resampler", "heads", "configs", "edges"} <= names
    assert all(p.distribution == "prismkit" for p in host.plugins)
    assert "clip_vit" in host.vision_backbones and "patch" in host.image_stems
    assert {"bert", "roberta"} <= set(host.language_backbones.names())
    assert host.adaptors.owner("residual") == "adapters"
    vision = next(p for p in host.plugins if p.name == "vision")
    assert vision.hooks == ("register_image_stems", "register_vision_backbones")


def test_duplicate_registration_names_both_plugins():
    from prismkit.adapters.residual import ResidualAdaptor

    class Again:
        __name__ = "again"

        @hookimpl
        def register_adaptors(self, register):
            register(ResidualAdaptor)

    with pytest.raises(
        PluginError,
        match="adaptors 'residual' is registered twice: by plugin 'adapters' and by plugin 'again'",
    ):
        get_plugin_manager(extra_plugins=[Again()])


def test_misspelled_hook_is_caught():
    class Typo:
        __name__ = "typo"

        @hookimpl
        def register_expert(self, register):  # missing "s"
            pass

    with pytest.raises(Exception, match="register_expert"):
        get_plugin_manager(extra_plugins=[Typo()])


def test_plugins_toml_unknown_names(tmp_path):
    bad = tmp_path / "plugins.toml"
    bad.write_text('[plugins]\nenabled = ["vision", "nope"]\n')
    with pytest.raises(PluginError, match=r"unknown plugin\(s\) \['nope'\]; installed: .*adapters"):
        get_plugin_manager(bad)
    bad.write_text('[experts]\nenabled = ["edge", "telepathy"]\n')
    with pytest.raises(
        PluginError, match=r"unknown expert\(s\) \['telepathy'\]; registered: .*depth"
    ):
        get_plugin_manager(bad)
    bad.write_text("[plugin]\n")
    with pytest.raises(PluginError, match="unknown section"):
        get_plugin_manager(bad)
    bad.write_text('[experts]\nenabled = "edge"\n')
    with pytest.raises(PluginError, match="must be"):
        get_plugin_manager(bad)


def test_plugins_toml_selects_a_subset(tmp_path):
    sub = tmp_path / "plugins.toml"
    sub.write_text(
        '[plugins]\nenabled = ["vision", "language", "adapters", "heads", "configs"]\n[experts]\nenabled = "*"\n'
    )
    host = get_plugin_manager(sub)
    assert host.resamplers.names() == [] and host.experts.names() == []
    assert PluginsConfig.load(sub).plugins == ["vision", "language", "adapters", "heads", "configs"]


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A real installed distribution (dist-info with an entry point) on sys.path."""
    (tmp_path / "prismkit_example_plugin.py").write_text(
        textwrap.dedent("""
        import torch
        from prismkit import hookimpl
        from prismkit.experts import Expert, LabelMap

        class Brightness(Expert):
            name = "brightness"
            kind = "dense"
            channels = 1
            version = "2"

            def predict(self, images, inputs):
                return LabelMap(images.mean(1, keepdim=True))

        @hookimpl
        def register_experts(register):
            register(Brightness)
    """)
    )
    info = tmp_path / "prismkit_example_plugin-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: prismkit-example-plugin\nVersion: 0.3.0\n"
    )
    (info / "entry_points.txt").write_text("[prismkit]\nbrightness = prismkit_example_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("prismkit_example_plugin", None)


def test_third_party_distribution_shows_up_and_can_be_used(third_party, tiny_dir, capsys):
    from helpers import batch_for, tiny_config

    from prismkit.core.model import create_model

    host = get_plugin_manager()
    info = next(p for p in host.plugins if p.name == "brightness")
    assert (info.distribution, info.version, info.hooks) == (
        "prismkit-example-plugin",
        "0.3.0",
        ("register_experts",),
    )
    assert host.experts.owner("brightness") == "brightness"
    model = create_model(tiny_config(tiny_dir, experts=["brightness"]), host)
    assert model.experts[0].channels == 1
    model(**batch_for(model)).loss.backward()
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "brightness   prismkit-example-plugin 0.3.0" in out
    assert "brightness      dense      1" in out


def test_every_hook_is_documented_in_the_readme():
    """Like datasette's: a hook that users cannot find in the README is a bug."""
    from pathlib import Path

    from prismkit.core import hookspecs
    from prismkit.core.host import KINDS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    specs = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert sorted(specs) == sorted(KINDS.values())
    for name in specs:
        assert f"`{name}`" in readme, f"hook {name} is not documented in README.md"
        assert getattr(hookspecs, name).__doc__, f"hook {name} has no docstring"


def test_detectron2_plugin_says_why_it_is_not_loaded():
    """detectron2 is not on PyPI: its plugin must not break the host, and must say why."""
    import importlib.util

    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed here")
    host = get_plugin_manager()
    assert "detectron2" in host.skipped and "detectron2" in host.skipped["detectron2"]
    assert "obj_detection_d2" not in host.experts
    assert main(["plugins"]) == 0


def test_a_plugin_adds_its_own_command(capsys):
    """simonw/llm's register_commands: the core CLI names no plugin; a plugin brings its command."""
    from prismkit.core.cli import Command, build_parser

    def configure(p):
        p.add_argument("--times", type=int, default=1)
        p.set_defaults(func=lambda args: print("hello " * args.times) or 0)

    class Greeter:
        __name__ = "greeter"

        @hookimpl
        def register_commands(self, register):
            register(Command("hello", "say hello", configure))

    host = get_plugin_manager(extra_plugins=[Greeter()])
    assert host.commands.owner("hello") == "greeter"
    args = build_parser(host).parse_args(["hello", "--times", "2"])
    assert args.func(args) == 0 and capsys.readouterr().out.strip() == "hello hello"
    # the built-in commands come from plugins too, each listed with its owner
    assert {host.commands.owner(n) for n in ("train", "experts", "capfilt", "muvla", "bench")} == {
        "engine",
        "labels",
        "blip",
        "muvla",
        "bench",
    }

    class Clash:
        __name__ = "clash"

        @hookimpl
        def register_commands(self, register):
            register(Command("describe", "mine", configure))

    with pytest.raises(PluginError, match="registers command 'describe', which the core owns"):
        build_parser(get_plugin_manager(extra_plugins=[Clash()]))


def test_plugins_lists_every_component_kind(capsys):
    from prismkit.core.host import KINDS

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for kind in KINDS:
        assert f"  {kind:<19} " in out
    assert "train <- engine" in out and "blip <- blip" in out and "easyvqa <- datasets" in out


def test_one_call_api(tiny_dir, tmp_path):
    """timm/open_clip-style: prismkit.create_model(name, pretrained, **overrides) and
    prismkit.load_checkpoint(path)."""
    import torch

    import prismkit
    from prismkit.core.checkpoint import save_checkpoint

    host = get_plugin_manager()
    model = prismkit.create_model(
        "tiny", host=host, experts=["edge", "depth"], vision={"image_size": 48}
    )
    assert [e.name for e in model.experts] == ["edge", "depth"]
    assert model.config.vision.image_size == 48 and model.config.vision.width == 32
    assert host.model_configs.get("tiny")  # the registered config itself is not modified
    with pytest.raises(Exception, match="unknown field"):
        prismkit.create_model("tiny", host=host, vision={"widht": 3})
    cfg_path = tmp_path / "mine.toml"
    cfg_path.write_text(
        host.model_configs.get("tiny").read_text().replace('name = "tiny"', 'name = "mine"')
    )
    m2 = prismkit.create_model(cfg_path, host=host)
    assert m2.config.name == "mine"
    from helpers import tiny_config

    torch.manual_seed(0)
    trained = prismkit.create_model(tiny_config(tiny_dir), pretrained=True, host=host)
    path = tmp_path / "m.safetensors"
    save_checkpoint(trained, path, host)
    loaded = prismkit.load_checkpoint(path, host=host)
    for (k, a), b in zip(trained.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
