"""The registry maps each name to the right loss with the right options; `include_positive` adds the positive."""
import dataclasses

import pytest
import torch

from pipeline.losses import DistillInputs, registry

from reference import (cprd_ref, cprd_tie_margin_ref, hard_negatives_ref, hinge_pair, kl_ref, margin_mse_ref,
                       partial_pairs_ref, random_case, ranknet_pair, ranknet_ref)


def _inputs(seed=0):
    student, teacher, mask = random_case(seed)
    g = torch.Generator().manual_seed(100 + seed)
    s_pos = torch.randn(student.shape[0], generator=g, dtype=torch.float64) * 3
    t_pos = torch.randn(student.shape[0], generator=g, dtype=torch.float64) + 1
    return DistillInputs(student, teacher, mask, s_pos, t_pos)


def _prepend(x):
    """The positive as column 0, built by hand (independent of DistillInputs.with_positive)."""
    B, N = x.student.shape
    s = torch.stack([torch.stack([x.student_positive[b]] + [x.student[b, j] for j in range(N)]) for b in range(B)])
    t = torch.tensor([[float(x.teacher_positive[b])] + x.teacher[b].tolist() for b in range(B)], dtype=torch.float64)
    m = torch.tensor([[True] + x.mask[b].tolist() for b in range(B)])
    return s, t, m


def test_every_distillation_loss_is_registered():
    assert set(registry.names()) == {"cprd", "cprd-kl", "listmle", "kl", "margin-mse", "ranknet",
                                      "hard-negatives", "partial-ranknet", "partial-hinge", "none"}
    assert registry.get("none").fn is None and not registry.get("none").uses_teacher
    assert not registry.get("hard-negatives").uses_teacher
    with pytest.raises(KeyError, match="unknown distillation loss 'hinge'"):
        registry.get("hinge")


def _run(name, x, **options):
    spec = registry.get(name)
    return spec.fn(x, spec.options(**options))


@pytest.mark.parametrize("seed", range(3))
def test_each_name_computes_its_own_loss(seed):
    x = _inputs(seed)
    s, t, m = x.student, x.teacher, x.mask
    cases = {
        ("cprd", ()): cprd_ref(s / 2.0, t, m, num_valid=3),
        ("listmle", ()): cprd_ref(s, t, m),
        ("kl", ()): kl_ref(s, t, m, T=2.0),
        ("margin-mse", ()): margin_mse_ref(x.student_positive, s, x.teacher_positive, t, m),
        ("ranknet", ()): ranknet_ref(s, t, m),
        ("hard-negatives", ()): hard_negatives_ref(x.student_positive, s, m),
        ("partial-ranknet", ()): partial_pairs_ref(s / 2.0, t, ranknet_pair, m, 3, tie_margin=0.2),
        ("partial-hinge", ()): partial_pairs_ref(s, t, hinge_pair(0.5), m, 2),
    }
    opts = {"cprd": dict(num_valid=3, student_temperature=2.0), "kl": dict(teacher_temperature=2.0),
            "partial-ranknet": dict(num_valid=3, student_temperature=2.0, tie_margin=0.2),
            "partial-hinge": dict(num_valid=2, hinge_margin=0.5)}
    values = {}
    for (name, _), ref in cases.items():
        got = _run(name, x, **opts.get(name, {}))
        torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-6, msg=name)
        values[name] = float(got.detach())
    assert len({round(v, 6) for v in values.values()}) == len(values)  # all different: a swap would be caught


@pytest.mark.parametrize("name,ref", [("cprd", lambda s, t, m: cprd_ref(s, t, m, num_valid=4)),
                                      ("listmle", lambda s, t, m: cprd_ref(s, t, m)),
                                      ("partial-ranknet", lambda s, t, m: partial_pairs_ref(s, t, ranknet_pair, m, 4)),
                                      ("partial-hinge", lambda s, t, m: partial_pairs_ref(s, t, hinge_pair(1.0), m, 4)),
                                      ("kl", lambda s, t, m: kl_ref(s, t, m, T=3.0))])
def test_include_positive_puts_the_positive_in_the_list(name, ref):
    x = _inputs(1)
    opts = {"cprd": dict(num_valid=4), "kl": dict(teacher_temperature=3.0)}.get(name, {})
    with_pos = _run(name, x, include_positive=True, **opts)
    torch.testing.assert_close(with_pos.double(), ref(*_prepend(x)).double(), rtol=1e-5, atol=1e-6)
    assert float(with_pos.detach()) != pytest.approx(float(_run(name, x, **opts).detach()))


@pytest.mark.parametrize("seed", range(3))
def test_cprd_kl_returns_both_terms_each_its_own_reference(seed):
    x = _inputs(seed)
    s, t, m = x.student, x.teacher, x.mask
    got = _run("cprd-kl", x, num_valid=3, student_temperature=2.0, teacher_temperature=3.0, kl_weight=0.5)
    assert set(got) == {"cprd", "kl"}
    torch.testing.assert_close(got["cprd"].double(), cprd_ref(s / 2.0, t, m, num_valid=3).double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["kl"].double(), 0.5 * kl_ref(s, t, m, T=3.0).double(), rtol=1e-5, atol=1e-6)
    tied = _run("cprd-kl", x, tie_margin=0.5)
    torch.testing.assert_close(tied["cprd"].double(), cprd_tie_margin_ref(s, t, m, num_valid=4, tie_margin=0.5).double(),
                               rtol=1e-5, atol=1e-6)
    with_pos = _run("cprd-kl", x, include_positive=True, num_valid=4, teacher_temperature=3.0)
    ps, pt, pm = _prepend(x)
    torch.testing.assert_close(with_pos["cprd"].double(), cprd_ref(ps, pt, pm, num_valid=4).double(), rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(with_pos["kl"].double(), kl_ref(ps, pt, pm, T=3.0).double(), rtol=1e-5, atol=1e-6)


def test_cprd_tie_margin_option_reaches_the_loss():
    x = _inputs(0)
    got = _run("cprd", x, num_valid=5, tie_margin=0.7)
    ref = cprd_tie_margin_ref(x.student, x.teacher, x.mask, num_valid=5, tie_margin=0.7)
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-6)
    assert float(got.detach()) != pytest.approx(float(_run("cprd", x, num_valid=5).detach()))


def test_cprd_lift_positive_lifts_the_positive_scaled_like_the_list():
    x = _inputs(1)
    s_pos = x.student_positive.clone().requires_grad_()
    x = dataclasses.replace(x, student_positive=s_pos)
    got = _run("cprd", x, num_valid=4, student_temperature=2.0, lift="positive")
    ref = cprd_ref(x.student / 2.0, x.teacher, x.mask, num_valid=4, lift="positive", positive=s_pos / 2.0)
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-6)
    g_got = torch.autograd.grad(got, (x.student, s_pos), retain_graph=True)
    g_ref = torch.autograd.grad(ref, (x.student, s_pos))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    assert (g_got[1] < 0).any() and (g_got[0] >= 0).all()


def test_options_are_dataclasses_with_defaults():
    for name, opts in registry.options_by_loss().items():
        assert dataclasses.is_dataclass(opts)
        opts()  # every option has a default
    assert registry.options_by_loss()["cprd"]().num_valid == 4


def test_no_stage_or_framework_module_names_a_losss_option():
    """The plug-in boundary: a loss's options are its own; distill, the other stages, the application and the
    framework outside pipeline/losses reach them only through the registry and `choice_options`."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[3]
    names = {f.name for opts in registry.options_by_loss().values() for f in dataclasses.fields(opts)}
    assert {"num_valid", "teacher_temperature", "lift"} <= names
    patterns = {n: re.compile(rf"\b{n}\b|\b{n.replace('_', '-')}\b" if "_" in n
                              else rf"[\"'.]{n}\b|--{n}\b|\b{n}\s*=") for n in names}
    files = [p for d in ("stages", "pipeline", "cprd_pipeline") for p in (repo / d).rglob("*.py")
             if "losses" not in p.relative_to(repo).parts]
    assert len(files) > 20
    found = [(str(p.relative_to(repo)), n) for p in files for n, pat in patterns.items()
             if pat.search(p.read_text())]
    assert not found, found


def test_a_loss_registered_from_outside_is_known_and_can_be_removed(monkeypatch):
    @dataclasses.dataclass
    class Opts:
        width: int = 2

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    fn = registry.register("outside", Opts, "a loss from elsewhere")(lambda x, o: x.student.sum() * o.width)
    assert "outside" in registry.names() and registry.options_by_loss()["outside"] is Opts
    assert registry.get("outside").fn is fn
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("outside", Opts)(lambda x, o: x.student.sum())
    registry.unregister("outside")
    assert "outside" not in registry.names()


def test_the_modules_named_in_the_environment_are_imported_and_a_missing_one_is_one_line(monkeypatch, tmp_path):
    from pipeline.errors import PipelineError

    (tmp_path / "env_losses.py").write_text(
        "from pipeline.losses.registry import register\n"
        "register('from-env', summary='registered by CPRD_LOSS_MODULES')(lambda x, o: x.student.sum())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.delitem(__import__("sys").modules, "env_losses", raising=False)
    assert "from-env" not in registry.names()
    monkeypatch.setenv(registry.MODULES_VARIABLE, " env_losses , ")
    assert "from-env" in registry.names()
    monkeypatch.setenv(registry.MODULES_VARIABLE, "env_losses,no_such_module_here")
    with pytest.raises(PipelineError, match=r"^CPRD_LOSS_MODULES: cannot import 'no_such_module_here' \("):
        registry.names()
    __import__("sys").modules.pop("env_losses", None)
