"""A plan as a readable table or as JSON."""

from __future__ import annotations

from typing import Any

from dromedary_ray.plan.planner import PhasePlan, Plan
from dromedary_ray.plan.specs import GIB


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "config": plan.config,
        "recipe": plan.recipe,
        "model": plan.model.to_dict(),
        "gpu": plan.gpu,
        "cluster": plan.cluster,
        "pools": [p.to_dict() for p in plan.pools],
        "iterations": plan.iterations,
        "fits": plan.fits,
        "problems": plan.problems,
        "hours": _round(plan.hours),
        "gpu_hours": _round(plan.gpu_hours),
        "cost": _round(plan.cost, 2),
        "stages": [{
            "stage": s.stage, "kind": s.kind, "work": s.work, "concurrent": s.concurrent,
            "hours": _round(s.hours), "gpu_hours": _round(s.gpu_hours), "cost": _round(s.cost, 2),
            "phases": [_phase_dict(p) for p in s.phases],
        } for s in plan.stages],
        "assumptions": plan.assumptions,
    }


def _phase_dict(p: PhasePlan) -> dict[str, Any]:
    return {
        "phase": p.phase, "request": p.request, "gpus": p.gpus, "gpu": p.gpu, "pool": p.pool,
        "nodes": p.nodes, "max_nodes": p.max_nodes, "billed_gpus": p.billed_gpus,
        "memory_gib": {k: round(v / GIB, 3) for k, v in p.memory.items()},
        "need_gib": round(p.need / GIB, 3), "usable_gib": round(p.usable / GIB, 3),
        "fits": not p.problems, "hours": _round(p.hours), "gpu_hours": _round(p.gpu_hours),
        "cost": _round(p.cost, 2),
        "detail": {k: _round(v) if isinstance(v, float) else v for k, v in p.detail.items()},
        "problems": p.problems,
    }


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def format_plan(plan: Plan) -> str:
    m = plan.model
    lines = [f"dromedary plan {plan.config}: recipe {plan.recipe}, model {m.name} "
             f"({m.params / 1e9:.1f}e9 parameters)"]
    if plan.cluster:
        pools = "; ".join(f"{p.name} {p.gpus_per_node} x {p.gpu} ({p.machine or '?'}, <= "
                          f"{p.max_nodes} nodes{', ' + p.role if p.role else ''})"
                          for p in plan.pools)
        lines.append(f"cluster {plan.cluster}: {pools}")
    else:
        lines.append(f"no cluster file: GPUs of type {plan.gpu}, nodes not counted")
    if plan.iterations > 1:
        lines.append(f"the recipe runs {plan.iterations} iterations of these stages; totals "
                     "count all of them")
    lines += ["", _table(plan), "", "memory per GPU (GiB)"]
    for s in plan.stages:
        for p in s.phases:
            lines.append(f"  {s.stage}/{p.phase}: {_memory_line(p)}")
    lines += ["", "work and throughput"]
    for s in plan.stages:
        lines.append(f"  {s.stage}: {'; '.join(s.work)}")
        for p in s.phases:
            if speed := _speed_line(p):
                lines.append(f"    {p.phase}: {speed}")
    lines += ["", "assumptions"] + [f"  - {a}" for a in plan.assumptions]
    if plan.problems:
        lines += ["", "DOES NOT FIT"] + [f"  {p}" for p in plan.problems]
    return "\n".join(lines)


def _table(plan: Plan) -> str:
    head = ("stage", "phase", "request", "pool / GPU", "nodes", "GiB/GPU", "fits", "hours",
            "GPU-h", "cost")
    rows = []
    for s in plan.stages:
        if not s.phases:
            rows.append((s.stage, "driver", "no GPU", "", "", "", "yes", "", "", ""))
        for i, p in enumerate(s.phases):
            where = " ".join(x for x in (p.pool, p.gpu) if x) or "CPU"
            nodes = f"{p.nodes}/{p.max_nodes}" if p.nodes is not None else ""
            memory = f"{p.need / GIB:.1f}/{p.usable / GIB:.1f}" if p.memory else ""
            rows.append((s.stage if i == 0 else "", p.phase, p.request, where, nodes, memory,
                         "no" if p.problems else "yes", _num(p.hours), _num(p.gpu_hours, 1),
                         _money(p.cost)))
    times = f" (x{plan.iterations})" if plan.iterations > 1 else ""
    rows.append(("total" + times, "", "", "", "", "", "yes" if plan.fits else "NO",
                 _num(plan.hours), _num(plan.gpu_hours, 1), _money(plan.cost)))
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [head, *rows])


def _memory_line(p: PhasePlan) -> str:
    if not p.memory:
        return p.detail.get("note", "not planned")
    parts = " + ".join(f"{k} {v / GIB:.1f}" for k, v in p.memory.items() if v >= 0.05 * GIB)
    if p.phase == "generate":
        share = f"gpu_memory_utilization of {p.gpu}"
        kv = (f"; KV cache for {p.detail.get('sequences', 0)} running sequences of "
              f"{p.detail.get('context', 0)} tokens ({p.detail.get('shared_prefix', 0)} shared)")
    else:
        share, kv = f"usable share of {p.gpu}", ""
    line = f"{parts} = {p.need / GIB:.1f} of {p.usable / GIB:.1f} ({share}){kv}"
    return line + (f"  [{p.detail['note']}]" if "note" in p.detail else "")


def _speed_line(p: PhasePlan) -> str:
    d = p.detail
    if "decode_tokens_per_s" in d:
        return (f"{d['decode_tokens_per_s']:,.0f} tok/s decoding over all engines (a step "
                f"{d['decode_step_ms']:.0f} ms for {d['sequences']} sequences); "
                f"{d['generated_tokens'] / 1e6:,.1f}M tokens: prefill "
                f"{d['prefill_hours']:.2f} h + decode {d['decode_hours']:.2f} h")
    if "train_flops" in d:
        return f"{d['train_tokens'] / 1e6:,.1f}M tokens, {d['train_flops']:.2e} FLOPs"
    return ""


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _money(x: float | None) -> str:
    return "-" if x is None else f"${x:,.0f}"
