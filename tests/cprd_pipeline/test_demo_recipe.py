"""The demo's typed recipe: the shipped recipes round-trip, unknown keys are refused naming them, and --quick
changes a recipe in one place, once."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from conftest import cli
from cprd_pipeline.demo_recipe import Recipe
from pipeline.errors import PipelineError

DATA = Path(__file__).resolve().parents[2] / "data"
SHIPPED = [DATA / "demo-tour.yaml", DATA / "demo.yaml", DATA / "demo-transfer.yaml", DATA / "paper.yaml"]


@pytest.mark.parametrize("path", SHIPPED + sorted((DATA / "study").glob("*.yaml")), ids=lambda p: p.name)
def test_a_shipped_recipe_round_trips_through_its_dataclasses(path, tmp_path):
    raw = yaml.safe_load(path.read_text())
    recipe = Recipe.load(path)
    assert recipe.as_dict() == raw                       # nothing dropped, nothing added
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(recipe.as_dict()))
    assert Recipe.load(tmp_path / "again.yaml") == recipe
    # typed: the blocks are dataclasses, each method's own options apart from its name, label and cache
    assert recipe.mine.k == raw["mine"]["k"] and recipe.corpus.galleries == raw["corpus"]["galleries"]
    for m, r in zip(recipe.methods, raw["methods"]):
        assert (m.name, m.label, m.cache) == (r["name"], r["label"], r.get("cache", "itm+itc"))
        assert m.options == {k: v for k, v in r.items() if k not in ("name", "label", "cache")}


def edited(tmp_path, change) -> Path:
    raw = yaml.safe_load(SHIPPED[0].read_text())
    change(raw)
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(baselin="none"), "edited.yaml: unknown key 'baselin' (did you mean 'baseline'?)"),
    (lambda r: r["corpus"].update(train_image=10), "corpus: unknown key 'train_image' (did you mean 'train_images'?)"),
    (lambda r: r["quick"].update(max_step=2), "quick: unknown key 'max_step' (did you mean 'max_steps'?)"),
    (lambda r: r["methods"][2].update(teacher_temprature=3),
     "methods[2] (kl): unknown distill option 'teacher_temprature' (did you mean 'teacher_temperature'?)"),
    (lambda r: r["distill"].update(num_negative=8), "distill: unknown distill option 'num_negative' (did you mean "
                                                    "'num_negatives'?)"),
    (lambda r: r["full"]["train_teacher"].update(lr_=1), "full: train_teacher: unknown train-teacher option 'lr_'"),
    (lambda r: r["distill"].update(seed=3), "distill: 'seed' is set by the demo"),
    (lambda r: r["mine"].update(k="eight"), "mine: 'k' expects int, got 'eight'"),
    (lambda r: r["corpus"].update(galleries=0), "corpus: 'galleries' must be >= 1, got 0"),
    (lambda r: r["methods"][1].update(cache="itc"), "methods[1] (control): 'cache' 'itc' is not one of itm+itc, itm"),
    (lambda r: r["full"].update(method="kl_"), "full: method 'kl_' is not one of the methods (did you mean 'kl'?)"),
    (lambda r: r.pop("mine"), "no `mine:`"),
])
def test_a_bad_recipe_is_refused_naming_the_key(tmp_path, change, message):
    with pytest.raises(PipelineError) as e:
        Recipe.load(edited(tmp_path, change))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_demo_refuses_a_bad_recipe_in_one_line_before_writing_anything(tmp_path):
    bad = edited(tmp_path, lambda r: r["corpus"].update(train_image=10))
    out = tmp_path / "demo"
    result = cli("demo", "--quick", "--recipe", bad, "--out", out, "--device", "cpu", expect=2)
    assert "unknown key 'train_image' (did you mean 'train_images'?)" in result.output.strip().splitlines()[-1]
    assert not out.exists()


def test_quick_replaces_the_sizes_and_the_training_length_once():
    raw = yaml.safe_load(SHIPPED[0].read_text())
    recipe = Recipe.load(SHIPPED[0])
    quick = recipe.for_run(quick=True, corpus_seed=5)
    q = raw["quick"]
    # expected from the YAML by hand: the quick block over the corpus, seeds; max_steps instead of epochs
    assert dataclasses.asdict(quick.corpus) == {**raw["corpus"], "seed": 5, "train_images": q["train_images"],
                                                "galleries": q["galleries"]}
    assert quick.seeds == q["seeds"]
    assert quick.distill == {**{k: v for k, v in raw["distill"].items() if k != "epochs"}, "max_steps": q["max_steps"]}
    assert quick.full.train_teacher == {**{k: v for k, v in raw["full"]["train_teacher"].items() if k != "epochs"},
                                        "max_steps": q["max_steps"]}
    assert quick.methods == recipe.methods and quick.mine == recipe.mine   # what quick does not name is kept
    assert recipe == Recipe.load(SHIPPED[0])                                # the loaded recipe is not changed
    with pytest.raises(PipelineError, match="no `quick:` block"):           # applied once: it is spent
        quick.for_run(quick=True, corpus_seed=None)
    plain = recipe.for_run(quick=False, corpus_seed=None)
    assert plain == recipe and plain.distill["epochs"] == raw["distill"]["epochs"]


def test_the_demo_reads_its_recipe_once_through_for_run(monkeypatch, tmp_path):
    from cprd_pipeline import demo

    calls = []
    real = Recipe.for_run

    def counted(self, quick, corpus_seed):
        calls.append((quick, corpus_seed))
        return real(self, quick, corpus_seed)

    class Stop(Exception):
        pass

    def stop(corpus, *args):
        raise Stop(corpus)

    monkeypatch.setattr(Recipe, "for_run", counted)
    monkeypatch.setattr(demo, "_prepare_data", stop)
    with pytest.raises(Stop) as e:
        demo.run(demo.DemoConfig(out=str(tmp_path / "d"), quick=True, recipe=str(SHIPPED[0])))
    assert calls == [(True, None)]
    assert e.value.args[0].train_images == yaml.safe_load(SHIPPED[0].read_text())["quick"]["train_images"]


def test_methods_keep_the_baseline_and_the_full_method():
    recipe = Recipe.load(SHIPPED[0])
    assert [m.name for m in recipe.chosen("kl", "demo.yaml")] == ["none", "kl"]
    assert [m.name for m in recipe.chosen("kl", "demo.yaml", keep=("cprd",))] == ["none", "kl", "cprd"]
    assert recipe.chosen(" ", "demo.yaml") == recipe.methods
    with pytest.raises(PipelineError, match="--methods: hinge not in demo.yaml"):
        recipe.chosen("kl,hinge", "demo.yaml")
