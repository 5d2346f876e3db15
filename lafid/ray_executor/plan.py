"""Pool sizes from the cluster: how many actors each stage's pool may have and what each asks of Ray, or
whether one pool runs the whole chain of stages in each actor."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from lafid.recipe import Recipe, RecipeError
from lafid.stage import Stage

# `auto` pools: CPU requests are scaled down only as far as one actor per auto stage plus one SPARE actor of
# the largest fit. More actors than CPUs do not run faster, and each costs ~2.5 CPU-s to start
# (benchmarks/curate_throughput.py, 2 CPUs: room for 2x as many actors started 13 and took 105 CPU-s for the
# 62 CPU-s of stage work; 1x started 4: 68-88 CPU-s). Without the spare, a stage that dominates (speech on
# talking footage) keeps one actor, and one of two cores, while the other stages' actors sit idle.
SPARE = 1


@dataclass
class Plan:
    """How one stage's pool is sized: actors (min, max) and what each asks of Ray."""

    low: int
    high: int | None
    cpus: float
    gpus: float


def plan_pools(recipe: Recipe, stages: list[Stage]) -> list[Plan]:
    """Size every pool from the cluster, or fail now when a request can never fit.

    Fixed and {min, max} pools ask for what the recipe says, and their minimum must fit. `auto` pools
    start at one actor; their CPU request is the stage's, scaled down (fractional CPUs) when the
    cluster cannot hold one actor of every auto stage and SPARE more of the largest beside the fixed
    minimums (so the slowest stage can grow by one), and never above the largest node."""
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    node_cpus = max(_node_cpus(), default=cpus)
    specs = list(zip(recipe.stages, stages))
    fixed = sum(spec.worker_range[0] * st.resources.cpus for spec, st in specs if spec.workers != "auto")
    auto = _one_each_and_spare([st.resources.cpus for spec, st in specs if spec.workers == "auto"])
    room = cpus - fixed
    scale = 1.0 if auto == 0 else min(1.0, room / auto)
    if fixed > cpus + 1e-9 or (auto and scale <= 0.01):
        detail = ", ".join(f"{s.stage}: {s.workers if s.workers != 'auto' else 'auto (at least 1)'} x "
                           f"{st.resources.cpus:g}" for s, st in specs)
        raise RecipeError(f"recipe {recipe.name!r} asks for {fixed:g} CPUs ({detail}) but the cluster has "
                          f"{cpus:g}; lower 'workers' or 'cpus' per stage, or use workers: auto")
    plans = []
    for spec, st in specs:
        low, high = spec.worker_range
        want_gpus = st.resources.gpus
        if want_gpus and low * want_gpus > gpus + 1e-9:
            raise RecipeError(f"recipe {recipe.name!r}: stage {spec.stage!r} asks for {low} x {want_gpus:g} GPUs "
                              f"but the cluster has {gpus:g}")
        per = st.resources.cpus
        if spec.workers == "auto":
            per = round(max(0.01, min(per * scale, node_cpus)), 4)
        elif per > node_cpus + 1e-9:
            raise RecipeError(f"recipe {recipe.name!r}: stage {spec.stage!r} asks for {per:g} CPUs per actor but "
                              f"the largest node has {node_cpus:g}")
        plans.append(Plan(low, high, per, want_gpus))
    return plans


def chain_plan(recipe: Recipe, stages: list[Stage]) -> Plan | None:
    """One pool whose actors each run every stage on whole videos (`pools: chain`), or None: a pool per stage.

    `auto` chains where per-stage pools would have to scale their requests down (every stage CPU-only with
    `workers: auto`, and the cluster cannot hold one actor of each at its CPUs plus SPARE): on 2 CPUs the
    stages' four pools time-share two cores, and each actor process, its start-up and every hand-off through
    the object store cost CPU that a chain does not spend (benchmarks/curate_throughput.py, docs/runtime.md).
    A chain's actors ask for the largest stage's CPUs, at least one; as many start as the nodes hold, and stay."""
    if recipe.pools == "per_stage":
        return None
    cpus = ray.cluster_resources().get("CPU", 0.0)
    nodes = _node_cpus()
    # at least a whole CPU: no more batches run at once than there are CPUs (stream.BATCHES_PER_CPU), so a
    # further chain would only load every model again and wait
    per = min(max(1.0, *(st.resources.cpus for st in stages)), max(nodes, default=0.0) or cpus)
    if recipe.pools == "auto":
        cpu_only = all(st.resources.gpus == 0 for st in stages)
        every_auto = all(spec.workers == "auto" for spec in recipe.stages)
        if not (cpu_only and every_auto and cpus < _one_each_and_spare([st.resources.cpus for st in stages]) - 1e-9):
            return None
    if per <= 0:
        raise RecipeError(f"recipe {recipe.name!r} (pools: chain): the cluster has no CPU")
    actors = max(1, sum(int(n / per + 1e-9) for n in nodes))
    return Plan(actors, actors, per, 0.0)


def _node_cpus() -> list[float]:
    """CPUs of each live node of the cluster."""
    return [n.get("Resources", {}).get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")]


def _one_each_and_spare(cpus: list[float]) -> float:
    """CPUs for one actor of each `auto` stage (their `cpus`) plus SPARE more of the largest."""
    return sum(cpus) + SPARE * max(cpus, default=0.0)
