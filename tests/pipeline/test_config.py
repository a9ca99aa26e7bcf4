"""Config resolution: defaults < YAML < flags, and the options a plug-in (a loss) owns."""
import dataclasses
from typing import Optional

import pytest

from pipeline.config import choice_options, fingerprinted, flags, option, resolve, runtime
from pipeline.errors import PipelineError


@dataclasses.dataclass
class AOpts:
    alpha: float = option(1.0, "a's alpha")
    shared: bool = option(False, "both have it")


@dataclasses.dataclass
class BOpts:
    beta: Optional[int] = option(3, "b's beta")
    shared: bool = option(False, "both have it")


@dataclasses.dataclass
class NoOpts:
    pass


@dataclasses.dataclass
class Cfg:
    kind: str = option("a", "which plug-in", choices=("a", "b", "c"))
    kind_options: object = choice_options("kind", lambda: {"a": AOpts, "b": BOpts, "c": NoOpts})
    lr: float = option(0.1, "learning rate")
    workers: int = runtime(0, "not part of the identity")


def test_flags_list_every_plugin_option_once_with_its_owners():
    by_name = {f.name: f for f in flags(Cfg)}
    assert by_name["alpha"].owners == ("a",) and by_name["beta"].owners == ("b",)
    assert by_name["shared"].owners == ("a", "b")
    assert "kind_options" not in by_name


def test_only_the_chosen_plugins_options_are_kept_and_fingerprinted():
    cfg = resolve(Cfg, None, {"kind": "b", "beta": 7})
    assert cfg.kind_options == BOpts(beta=7)
    fp = fingerprinted(cfg)
    assert fp["kind_options"] == {"beta": 7, "shared": False} and "workers" not in fp
    # an option of another plug-in changes nothing of this one's identity: it is refused, not stored
    assert fingerprinted(resolve(Cfg, None, {"kind": "b"}))["kind_options"] == {"beta": 3, "shared": False}


def test_another_plugins_option_is_refused_with_its_owner_named():
    with pytest.raises(PipelineError, match="--alpha is an option of a, not of --kind b"):
        resolve(Cfg, None, {"kind": "b", "alpha": 2.0})


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("kind: a\nalpha: 2\nlr: 1e-4\n")  # YAML reads 1e-4 as a string: accepted for a float
    cfg = resolve(Cfg, f, {"alpha": 5.0})
    assert cfg.kind_options.alpha == 5.0 and cfg.lr == pytest.approx(1e-4)
    f.write_text("lr: fast\n")
    with pytest.raises(PipelineError, match="option 'lr' expects float, got 'fast'"):
        resolve(Cfg, f, {})


def test_an_added_option_enters_the_fingerprint_only_when_set():
    from pipeline.config import fingerprinted, option

    @dataclasses.dataclass
    class Before:
        k: int = option(8)

    @dataclasses.dataclass
    class After:
        k: int = option(8)
        extra: bool = option(False, added=True)

    assert fingerprinted(After()) == fingerprinted(Before()) == {"k": 8}
    assert fingerprinted(After(extra=True)) == {"k": 8, "extra": True}


def test_a_pipeline_file_gives_each_verb_its_section(tmp_path):
    @dataclasses.dataclass
    class Mine:
        run: str = runtime(None)
        k: int = option(8)
        device: str = runtime("auto")

    verbs = ("mine", "distill")
    f = tmp_path / "pipeline.yaml"
    f.write_text("run: runs/x\ndevice: cpu\nloss: kl\nmine:\n  k: 4\ndistill:\n  lr: 1e-4\n")
    cfg = resolve(Mine, f, {}, section="mine", sections=verbs)
    assert (cfg.run, cfg.k, cfg.device) == ("runs/x", 4, "cpu")        # `loss` is distill's: left to it
    assert resolve(Mine, f, {"k": 2}, section="mine", sections=verbs).k == 2   # flags still win
    f.write_text("mine:\n  k: 4\n  lr: 1e-4\n")
    with pytest.raises(PipelineError, match="unknown option 'lr'"):
        resolve(Mine, f, {}, section="mine", sections=verbs)
    f.write_text("k: 3\n")                                              # a flat file, as before
    assert resolve(Mine, f, {}, section="mine", sections=verbs).k == 3
