"""Config resolution: defaults < YAML < flags, and the options a plug-in (a loss) owns."""
import dataclasses
from typing import Optional

import pytest

from pipeline.config import OptionError, choice_options, fingerprinted, flags, option, resolve, runtime
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


def test_an_unknown_key_is_named_as_written_with_the_closest_known_one(tmp_path):
    @dataclasses.dataclass
    class Distill:
        num_negatives: int = option(8)
        batch_size: int = runtime(64)

    f = tmp_path / "pipeline.yaml"
    f.write_text("distill:\n  num-negative: 4\n")
    with pytest.raises(PipelineError, match=rf"^--config {f} \(distill:\): unknown option 'num-negative' "
                                            r"\(did you mean 'num-negatives'\?\)$"):
        resolve(Distill, f, {}, section="distill", sections=("mine", "distill"))
    f.write_text("num_negative: 4\n")                     # underscores: answered in underscores
    with pytest.raises(PipelineError, match=r"unknown option 'num_negative' \(did you mean 'num_negatives'\?\)"):
        resolve(Distill, f, {})
    f.write_text("batch-size: 2\nzzz: 4\n")                # nothing close: the known keys, as the file spells them
    with pytest.raises(PipelineError, match=r"unknown option 'zzz' \(known: batch-size, num-negatives\)$"):
        resolve(Distill, f, {})


@dataclasses.dataclass
class Ranged:
    kind: str = option("a", "which plug-in", choices=("a", "b"))
    kind_options: object = choice_options("kind", lambda: {"a": RangedOpts, "b": NoOpts})
    batch_size: int = runtime(64, at_least=1)
    lr: float = option(0.1, above=0)
    share: float = option(0.5, at_least=0, at_most=1)
    limit: Optional[int] = option(None, at_least=1)


@dataclasses.dataclass
class RangedOpts:
    temperature: float = option(1.0, above=0)


@pytest.mark.parametrize("values, message", [
    ({"batch_size": 0}, "--batch-size: must be >= 1, got 0"),
    ({"lr": 0.0}, "--lr: must be > 0, got 0.0"),
    ({"share": 1.5}, "--share: must be <= 1, got 1.5"),
    ({"limit": 0}, "--limit: must be >= 1, got 0"),
    ({"temperature": -1.0}, "--temperature: must be > 0, got -1.0"),       # a plug-in's option
])
def test_declared_ranges_are_checked_from_flags_files_and_python(tmp_path, values, message):
    with pytest.raises(PipelineError, match=f"^{message}$"):
        resolve(Ranged, None, values)
    f = tmp_path / "c.yaml"
    f.write_text("".join(f"{k.replace('_', '-')}: {v}\n" for k, v in values.items()))
    with pytest.raises(PipelineError, match=f"^--config {f}: {message}$"):
        resolve(Ranged, f, {})
    from pipeline.config import complete

    opts = {k: v for k, v in values.items() if k == "temperature"}
    cfg = Ranged(**{k: v for k, v in values.items() if k not in opts}, kind_options=RangedOpts(**opts))
    with pytest.raises(PipelineError, match=f"^{message}$"):
        complete(cfg)


def test_values_inside_their_range_and_unset_optionals_pass():
    cfg = resolve(Ranged, None, {"batch_size": 1, "share": 1.0, "temperature": 0.01})
    assert (cfg.batch_size, cfg.limit, cfg.kind_options.temperature) == (1, None, 0.01)


def _config_classes():
    from cprd_pipeline.demo import DemoConfig
    from cprd_pipeline.rounds import LoopConfig
    from pipeline.losses import registry
    from stages import STAGES

    return [s.load()[0] for s in STAGES] + list(registry.options_by_loss().values()) + [LoopConfig, DemoConfig]


# numeric options that take any value: a threshold on the teacher's scores, which can be negative; and distill's
# --val-k-test, still checked by hand in distill.check while the validation options are reworked
UNBOUNDED = {"max_teacher_margin", "min_teacher_score"}


def test_every_numeric_option_declares_its_range_and_its_default_is_inside_it():
    import typing

    from pipeline.config import out_of_range

    for cls in _config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            numeric = {int, float} & ({hints[f.name]} | set(typing.get_args(hints[f.name])))
            if numeric and f.name not in UNBOUNDED:
                assert f.metadata.get("bounds"), f"{cls.__name__}.{f.name} declares no range"
            default = None if f.default is dataclasses.MISSING else f.default
            assert out_of_range(f, default) is None, f"{cls.__name__}.{f.name}: default {default} out of range"


@dataclasses.dataclass
class RangeOpts:
    low: float = option(0.0, "bottom")
    high: float = option(1.0, "top")

    def check(self) -> None:   # what two ranges cannot say: one option against the other
        if self.low >= self.high:
            raise OptionError("high", f"must be above --low ({self.low}), got {self.high}")


PLUGINS = {"r": RangeOpts}


@dataclasses.dataclass
class Checked:
    kind: str = option("r", "which plug-in", choices=("r",))
    kind_options: object = choice_options("kind", lambda: dict(PLUGINS))


def test_an_options_class_checks_itself_from_flags_files_and_python(tmp_path):
    from pipeline.config import complete

    message = r"--high: must be above --low \(2.0\), got 1.5"
    with pytest.raises(PipelineError, match=f"^{message}$"):
        resolve(Checked, None, {"low": 2.0, "high": 1.5})
    f = tmp_path / "c.yaml"
    f.write_text("low: 2\nhigh: 1.5\n")
    with pytest.raises(PipelineError, match=f"^--config {f}: {message}$"):
        resolve(Checked, f, {})
    with pytest.raises(PipelineError, match=f"^{message}$"):
        complete(Checked(kind_options=RangeOpts(low=2.0, high=1.5)))
    assert resolve(Checked, f, {"high": 3.0}).kind_options == RangeOpts(low=2.0, high=3.0)


def test_a_plugin_added_after_the_class_is_a_choice(monkeypatch):
    with pytest.raises(PipelineError, match="'late' is not one of r$"):
        resolve(Checked, None, {"kind": "late"})
    monkeypatch.setitem(PLUGINS, "late", AOpts)
    assert {f.name: f.choices for f in flags(Checked)}["kind"] == ("r", "late")
    assert resolve(Checked, None, {"kind": "late", "alpha": 3.0}).kind_options == AOpts(alpha=3.0)
