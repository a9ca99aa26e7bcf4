"""The demo's recipe (data/demo.yaml, data/demo-transfer.yaml, data/demo-tour.yaml) as typed dataclasses.

    recipe = Recipe.load("data/demo.yaml").for_run(quick=True, corpus_seed=None)

`load` refuses an unknown key with one line naming the file, the block and the key (with the nearest known
key); the options a recipe passes to a stage (`distill:`, each method's, `full: train_teacher:`) are checked
against that stage's options. `for_run` is the one place where `--quick` and `--corpus-seed` change a recipe;
every later step reads the recipe it returns. `as_dict` gives the recipe back as its YAML reads.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.config import flags, load_yaml, option, option_name, out_of_range, suggest
from pipeline.errors import PipelineError

# options of the stages that the demo sets itself (folders, models, seeds, device): a recipe may not set them
SET_BY_DEMO = {"run", "run_dir", "out", "student", "teacher", "scores", "seed", "save_every", "device", "replace"}


@dataclass(frozen=True)
class Corpus:
    """The generated corpus (pipeline/demo/corpus.py's DemoCorpusSpec) and its evaluation galleries."""
    seed: int = option(0, "the generator's seed (the same seed, the same corpus)", at_least=0)
    held_out: int = option(40, "combinations never seen in training (of 264)", at_least=0)
    train_images: int = option(2000, "images of the pipeline's training split (5 captions each)", at_least=1)
    galleries: int = option(1, "test (and val) galleries, one image per combination each", at_least=1)


@dataclass(frozen=True)
class Mine:
    k: int = option(8, "mined negatives per query", at_least=1)
    easy: Optional[int] = option(None, "easy candidates per query beside the mined ones (mine --easy: for distill "
                                       "--list easy)", at_least=1)
    easy_from: Optional[str] = option(None, "with easy: where they come from (mine --easy-from; default random)",
                                      choices=("random", "bottom"))


@dataclass(frozen=True)
class Teacher:
    score: str = option("itm+itc", "the teacher cache's score (ITM log-odds + itc_weight x ITC cosine)",
                        choices=("itm+itc",))


@dataclass(frozen=True)
class Evaluate:
    k_test: int = option(16, "the teacher re-ranks (and rank agreement covers) each query's top k_test", at_least=1)
    teacher_galleries: Optional[int] = option(None, "galleries with the teacher re-rank for distilled students "
                                                    "(default: all)", at_least=1)
    reference_galleries: Optional[int] = option(None, "galleries with the teacher re-rank for the student before "
                                                      "distillation and the teacher's row (default: all)", at_least=1)

    def reference_on(self, galleries: int) -> int:
        """How many of the `galleries`, the first ones, carry the teacher's own rows (the gap closed is taken there)."""
        return min(self.reference_galleries or galleries, galleries)


@dataclass(frozen=True)
class Quick:
    """`--quick`: the same pipeline, smaller (unset fields keep the recipe's)."""
    max_steps: int = option(4, "training steps instead of the recipe's epochs", at_least=1)
    train_images: Optional[int] = option(None, "the corpus's train_images", at_least=1)
    galleries: Optional[int] = option(None, "the corpus's galleries", at_least=1)
    seeds: Optional[int] = option(None, "the recipe's seeds", at_least=1)


@dataclass(frozen=True)
class Method:
    """One report row: a distilled student per seed. `options` are distill's, over the recipe's `distill:`."""
    name: str = option("", "its folder (students/NAME-sSEED) and its --methods name")
    label: str = option("", "its report row")
    cache: str = option("itm+itc", "the teacher score it learns from", choices=("itm+itc", "itm"))
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Full:
    """`--full`: LoopITR's two halves, each once, on one method's students."""
    method: str = option("", "the method whose students go on to round 2 and learn from the fine-tuned teacher")
    train_teacher: dict[str, Any] = field(default_factory=dict)   # train-teacher's options


@dataclass(frozen=True)
class Recipe:
    corpus: Corpus
    assets: str                          # the assets folder (relative to the repository, or absolute)
    mine: Mine
    distill: dict[str, Any]              # distill's options, shared by every method
    methods: tuple[Method, ...]
    baseline: Optional[str] = None       # the method every other is compared with (`vs none`), if it is run
    seeds: int = 1
    teacher: Teacher = Teacher()
    evaluate: Evaluate = Evaluate()
    quick: Optional[Quick] = None
    full: Optional[Full] = None

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """The recipe file, checked; one line naming the file and key for anything wrong."""
        path = Path(path)
        if not path.is_file():
            raise PipelineError(f"--recipe: file not found: {path}")
        return cls.from_dict(load_yaml(path), str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "recipe") -> "Recipe":
        values = _known(cls, raw, where, blocks={"corpus", "assets", "mine", "distill", "methods"})
        for name, kind in (("corpus", Corpus), ("mine", Mine), ("teacher", Teacher), ("evaluate", Evaluate),
                           ("quick", Quick)):
            if name in values:
                values[name] = _typed(kind, values[name], f"{where}: {name}")
        values["distill"] = _stage_options("distill", values["distill"], f"{where}: distill")
        if not isinstance(values["methods"], list) or not values["methods"]:
            raise PipelineError(f"{where}: methods: a list of {{name, label, ...}} mappings, at least one")
        values["methods"] = tuple(_method(m, f"{where}: methods[{i}]") for i, m in enumerate(values["methods"]))
        if "full" in values:
            values["full"] = _full(values["full"], f"{where}: full")
        recipe = cls(**values)
        recipe._check(where)
        return recipe

    def _check(self, where: str) -> None:
        if not isinstance(self.assets, str) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise PipelineError(f"{where}: `assets` must name a folder and `seeds` be a whole number >= 1")
        names = [m.name for m in self.methods]
        if len(set(names)) < len(names):
            raise PipelineError(f"{where}: methods: two methods named "
                                f"'{next(n for n in names if names.count(n) > 1)}' (a name is a folder)")
        if self.full is not None and self.full.method not in names:
            raise PipelineError(f"{where}: full: method '{self.full.method}' is not one of the methods "
                                f"({suggest(self.full.method, names)})")

    def for_run(self, quick: bool, corpus_seed: Optional[int]) -> "Recipe":
        """The recipe a run uses: `--corpus-seed` over the corpus's seed, and with `quick`, the recipe's `quick:`
        block over the corpus and seeds, and its max_steps instead of the epochs of the shared training options
        (distill's and the fine-tuned teacher's)."""
        recipe = self
        if corpus_seed is not None:
            recipe = dataclasses.replace(recipe, corpus=dataclasses.replace(recipe.corpus, seed=corpus_seed))
        if not quick:
            return recipe
        if recipe.quick is None:
            raise PipelineError("--quick: the recipe has no `quick:` block")
        q = recipe.quick
        sized = {k: v for k, v in (("train_images", q.train_images), ("galleries", q.galleries)) if v is not None}
        shorter = lambda options: {**{k: v for k, v in options.items() if k != "epochs"}, "max_steps": q.max_steps}
        full = recipe.full and dataclasses.replace(recipe.full, train_teacher=shorter(recipe.full.train_teacher))
        return dataclasses.replace(recipe, corpus=dataclasses.replace(recipe.corpus, **sized), full=full,
                                   seeds=q.seeds or recipe.seeds, distill=shorter(recipe.distill), quick=None)

    def chosen(self, names: str, path: str, keep: tuple[str, ...] = ()) -> tuple[Method, ...]:
        """The methods named in the comma-separated `names` (all when empty), in the recipe's order, with the
        baseline (and those named in `keep`) kept."""
        if not names.strip():
            return self.methods
        want = {n.strip() for n in names.split(",") if n.strip()}
        known = [m.name for m in self.methods]
        if unknown := sorted(want - set(known)):
            raise PipelineError(f"--methods: {', '.join(unknown)} not in {path} (its methods: {', '.join(known)})")
        return tuple(m for m in self.methods if m.name in want or m.name in (self.baseline, *keep))

    def method(self, name: str) -> Method:
        return next(m for m in self.methods if m.name == name)

    def as_dict(self) -> dict[str, Any]:
        """The recipe as its YAML reads (unset optional fields left out); `from_dict` of it is this recipe."""
        out = {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["methods"] = [{"name": m.name, "label": m.label, **({"cache": m.cache} if m.cache != "itm+itc" else {}),
                           **m.options} for m in self.methods]
        if self.full is not None:
            out["full"] = {"method": self.full.method, "train_teacher": dict(self.full.train_teacher)}
        return {k: v for k, v in out.items() if v is not None}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    return dict(value) if isinstance(value, dict) else value


def _mapping(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PipelineError(f"{where}: expected a mapping of key: value, got {raw!r}")
    return raw


def _known(cls: type, raw: Any, where: str, blocks: set[str] = frozenset()) -> dict[str, Any]:
    """`raw`'s keys as `cls`'s field names, an unknown one refused naming it (and the nearest known one), a
    missing required one (`blocks`) likewise."""
    names = [f.name for f in dataclasses.fields(cls)]
    values = {option_name(k): v for k, v in _mapping(raw, where).items()}
    for key in raw:
        if option_name(key) not in names:
            raise PipelineError(f"{where}: unknown key '{key}' ({suggest(key, names, raw)})")
    if missing := sorted(blocks - set(values)):
        raise PipelineError(f"{where}: no `{missing[0]}:` (a recipe needs {', '.join(sorted(blocks))})")
    return values


def _typed(cls: type, raw: Any, where: str) -> Any:
    """A block of scalars as its dataclass: keys known, types and declared ranges checked."""
    values = _known(cls, raw, where)
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        want = [a for a in typing.get_args(hints[name]) if a is not type(None)] or [hints[name]]
        ok = value is None or any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in want)
        if not ok:
            raise PipelineError(f"{where}: '{name}' expects {want[0].__name__}, got {value!r}")
    made = cls(**values)
    for f in dataclasses.fields(cls):
        value, choices = getattr(made, f.name), f.metadata.get("choices")
        problem = out_of_range(f, value)
        if choices and value is not None and value not in choices:
            problem = f"'{value}' is not one of {', '.join(choices)}"
        if problem:
            raise PipelineError(f"{where}: '{f.name}' {problem}")
    return made


def _method(raw: Any, where: str) -> Method:
    raw = _mapping(raw, where)
    for need in ("name", "label"):
        if not isinstance(raw.get(need), str) or not raw[need]:
            raise PipelineError(f"{where}: no `{need}` (every method has a name and a label)")
    where = f"{where} ({raw['name']})"
    own = {k: raw[k] for k in ("name", "label", "cache") if k in raw}
    options = _stage_options("distill", {k: v for k, v in raw.items() if k not in own}, where)
    return dataclasses.replace(_typed(Method, own, where), options=options)


def _full(raw: Any, where: str) -> Full:
    values = _known(Full, raw, where, blocks={"method"})
    tt = _stage_options("train-teacher", values.get("train_teacher") or {}, f"{where}: train_teacher")
    return dataclasses.replace(_typed(Full, {"method": values["method"]}, where), train_teacher=tt)


def _stage_options(verb: str, raw: Any, where: str) -> dict[str, Any]:
    """Options for a stage (their values are the stage's to check): each key one of the stage's options (its
    plug-ins' included) that the demo does not set itself."""
    from stages import stage

    known = {f.name for f in flags(stage(verb).load()[0])} - SET_BY_DEMO
    values = {option_name(k): v for k, v in _mapping(raw, where).items()}
    for key in raw:
        if option_name(key) in SET_BY_DEMO:
            raise PipelineError(f"{where}: '{key}' is set by the demo (folders, models, seeds, device); remove it")
        if option_name(key) not in known:
            raise PipelineError(f"{where}: unknown {verb} option '{key}' ({suggest(key, known, raw)})")
    return values
