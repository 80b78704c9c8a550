import io
import math

import pytest
import torch
from omegaconf import OmegaConf

from dinoseg.engine.config import SchedulerConfig, scheduler_kwargs
from dinoseg.engine.schedulers import SchedulerType, build_scheduler, lr_factor


def _official_one_cycle(step, max_lr, total, warmup, ratio, final_div=float("inf"), div=25.0):
    # The official WarmupOneCycleLR (pct_start=0, cosine) written out independently for comparison.
    if step < warmup:
        k = (1 - step / warmup) * (1 - ratio)
        return max_lr * (1 - k) * (1 - step / total)
    min_lr = max_lr / div / final_div
    pct = (step + 1) / total
    return min_lr + (max_lr - min_lr) / 2 * (math.cos(math.pi * pct) + 1)


def _run(cfg, steps, lr=1e-3):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    cfg = OmegaConf.structured(cfg)
    sched = build_scheduler(cfg.type, opt, lr, cfg.total_iter, scheduler_kwargs(cfg))
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])  # the lr this iteration trains with
        opt.step()
        sched.step()
    return lrs


def test_one_cycle_matches_official_formula_from_step_zero():
    cfg = SchedulerConfig(total_iter=100, warmup_iters=10, warmup_ratio=1e-6)
    lrs = _run(cfg, 100)
    expected = [_official_one_cycle(k, 1e-3, 100, 10, 1e-6) for k in range(100)]
    assert lrs == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert lrs[0] == pytest.approx(1e-3 * 1e-6)  # warmup applies to the very first step
    assert lrs[10] == pytest.approx(max(lrs)) and lrs[-1] < 1e-6


def test_poly_and_constant_with_warmup():
    poly = SchedulerConfig(type=SchedulerType.POLY, total_iter=50, warmup_iters=5, warmup_ratio=0.1, poly_power=0.9)
    lrs = _run(poly, 50)
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[5] == pytest.approx(1e-3 * (1 - 5 / 50) ** 0.9)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    const = SchedulerConfig(type=SchedulerType.CONSTANT, total_iter=20, warmup_iters=4, warmup_ratio=0.0)
    lrs = _run(const, 20)
    assert lrs[:5] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3]) and set(lrs[4:]) == {1e-3}


def test_poly_min_lr_floor():
    cfg = OmegaConf.structured(SchedulerConfig(type=SchedulerType.POLY, total_iter=10, warmup_iters=0, min_lr=1e-5))
    poly = {k: v for k, v in scheduler_kwargs(cfg).items() if k in ("warmup_iters", "warmup_ratio", "poly_power", "min_lr")}
    assert lr_factor(10, cfg.type, cfg.total_iter, **poly, base_lr=1e-3) == pytest.approx(1e-2)


def test_schedule_resumes_exactly():
    cfg = OmegaConf.structured(SchedulerConfig(total_iter=30, warmup_iters=5))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(cfg.type, opt, 1e-3, cfg.total_iter, scheduler_kwargs(cfg))
    for _ in range(12):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.AdamW([p], lr=1e-3)
    sched2 = build_scheduler(cfg.type, opt2, 1e-3, cfg.total_iter, scheduler_kwargs(cfg))
    sched2.load_state_dict(state)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def _official_beta1(step, total, warmup, base=0.85, top=0.95):
    # The official WarmupOneCycleLR (use_beta1=True): momentum stays 0 in warmup, then cosine from base up to max.
    if step < warmup:
        return 0.0
    pct = (step - warmup) / (total - warmup)
    return top + (base - top) / 2 * (math.cos(math.pi * pct) + 1)


def test_one_cycle_beta1_cycle_matches_the_official_scheduler_and_resumes():
    from dinoseg.eval.depth.config import DepthSchedulerConfig

    cfg = OmegaConf.structured(DepthSchedulerConfig(total_iter=40, warmup_iters=8))
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99))
    sched = build_scheduler(cfg.type, opt, 1e-3, cfg.total_iter, scheduler_kwargs(cfg))
    betas, lrs = [], []
    for _ in range(40):
        betas.append(opt.param_groups[0]["betas"])
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [b[0] for b in betas] == pytest.approx([_official_beta1(k, 40, 8) for k in range(40)], abs=1e-12)
    assert {b[1] for b in betas} == {0.99}  # beta2 is left alone
    # Warmup without warmup_ratio (the depth default): max_lr / final_div_factor + cosine peak * step / warmup.
    assert lrs[0] == pytest.approx(1e-3 / 1000) and lrs[4] == pytest.approx(
        1e-3 / 1000 + 1e-3 * (1 + math.cos(math.pi * 4 / 40)) / 2 * 4 / 8)
    assert lrs[8:] == pytest.approx([_official_one_cycle(k, 1e-3, 40, 8, 0.0, 1000.0) for k in range(8, 40)])
    # The schedule's state holds numbers only (weights-only checkpoints), and a resumed one continues exactly.
    opt2 = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99))
    sched2 = build_scheduler(cfg.type, opt2, 1e-3, cfg.total_iter, scheduler_kwargs(cfg))
    buffer = io.BytesIO()
    torch.save({"s": sched.state_dict(), "o": opt.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    sched2.load_state_dict(state["s"])
    opt2.load_state_dict(state["o"])
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    opt.step()
    sched.step()
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_without_use_beta1_the_optimizer_keeps_its_betas():
    for kind in ("WarmupOneCycleLR", "poly"):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-3, betas=(0.9, 0.99))
        sched = build_scheduler(kind, opt, 1e-3, 10, {"warmup_iters": 2, "use_beta1": kind == "poly"})
        for _ in range(5):
            opt.step()
            sched.step()
        assert opt.param_groups[0]["betas"] == (0.9, 0.99)  # use_beta1 is the one-cycle schedule's only


def test_a_resumed_beta1_cycle_follows_an_extended_total_iter():
    from dinoseg.engine.schedulers import one_cycle_momentum

    kwargs = {"warmup_iters": 4, "use_beta1": True, "final_div_factor": 1000.0}
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler("WarmupOneCycleLR", opt, 1e-3, 20, kwargs)
    for _ in range(10):
        opt.step()
        sched.step()
    opt2 = torch.optim.AdamW([p], lr=1e-3)
    longer = build_scheduler("WarmupOneCycleLR", opt2, 1e-3, 40, kwargs)
    longer.load_state_dict(sched.state_dict())
    opt2.load_state_dict(opt.state_dict())
    opt2.step()
    longer.step()
    assert opt2.param_groups[0]["betas"][0] == pytest.approx(one_cycle_momentum(11, 40, warmup_iters=4))
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(11, "WarmupOneCycleLR", 40, warmup_iters=4,
                                                                        warmup_ratio=0.0, final_div_factor=1000.0))


def test_step_schedule_warms_up_then_drops_at_each_milestone():
    """Plain-DETR's schedule in iterations: linear warm-up from 0, then x gamma from each milestone on."""
    cfg = SchedulerConfig(type=SchedulerType.STEP, total_iter=30, warmup_iters=4, warmup_ratio=0.0, milestones=[10, 20],
                          gamma=0.1)
    lrs = _run(cfg, 30)
    assert lrs[:5] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4:10] == pytest.approx([1e-3] * 6) and lrs[10:20] == pytest.approx([1e-4] * 10)
    assert lrs[20:] == pytest.approx([1e-5] * 10)
    # Other schedules leave the step settings alone; the step schedule without milestones is constant.
    assert _run(SchedulerConfig(type=SchedulerType.POLY, total_iter=10, milestones=[5]), 10) == _run(
        SchedulerConfig(type=SchedulerType.POLY, total_iter=10), 10)
    assert set(_run(SchedulerConfig(type=SchedulerType.STEP, total_iter=10, warmup_iters=0), 10)) == {1e-3}


def test_step_schedule_settings_are_checked():
    from dinoseg.engine.config import ConfigError
    from dinoseg.eval.segmentation.config import load_config

    for value in ("[5,3]", "[0]", "[100]", "[4,4]"):
        with pytest.raises(ConfigError, match=r"scheduler.milestones=.*: expected increasing iterations in \[1, "
                                              r"scheduler.total_iter=100\)"):
            load_config(["demo.yaml"], ["scheduler.type=step", "scheduler.total_iter=100", f"scheduler.milestones={value}"])
    with pytest.raises(ConfigError, match=r"scheduler.gamma=0.0: must be in \(0, 1\]"):
        load_config(["demo.yaml"], ["scheduler.gamma=0"])
    cfg = load_config(["demo.yaml"], ["scheduler.type=STEP", "scheduler.milestones=[100]"])  # any task may pick it
    assert SchedulerType(cfg.scheduler.type) is SchedulerType.STEP


def test_parameter_groups_keep_their_lr_ratio_through_the_schedule_and_a_resume():
    """A group built at a fraction of the lr (`lr_scale`, or its lr when built) follows the schedule at that
    fraction, and a rebuilt schedule on a resumed optimizer keeps it."""
    from dinoseg.engine.optim import build_optimizer

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[1].parameters()), "lr_scale": 0.1,
                                                        "weight_decay": 0.0}]
    cfg = OmegaConf.structured(SchedulerConfig(type=SchedulerType.STEP, total_iter=10, warmup_iters=2, milestones=[5]))

    def build():
        opt = build_optimizer(model, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.05, param_groups=groups)
        return opt, build_scheduler(cfg.type, opt, 2e-3, cfg.total_iter, scheduler_kwargs(cfg))

    opt, sched = build()
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    seen = []
    for _ in range(7):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert [b / a for a, b in seen[1:]] == pytest.approx([0.1] * 6)
    assert seen[3] == pytest.approx([2e-3, 2e-4]) and seen[6] == pytest.approx([2e-4, 2e-5])
    state = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    opt2, sched2 = build()
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx([g["lr"] for g in opt.param_groups])
    # The official form: groups built at one lr all follow the lr given to build_scheduler.
    plain = torch.optim.AdamW(model.parameters(), lr=0.5)
    build_scheduler("constant", plain, 1e-3, 10, {"warmup_iters": 0})
    assert plain.param_groups[0]["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="every trainable parameter of the model exactly once"):
        build_optimizer(model, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, param_groups=groups[:1])
