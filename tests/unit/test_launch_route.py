"""Which way `pretrain train` runs: the route table, decided from the environment and the config alone."""

from __future__ import annotations

import pytest

from pipeline.launch.route import (BUDGET_SPENT, LAUNCHER, RAY_DRIVER, SINGLE_PROCESS, TORCHRUN, Route,
                                   choose_route)

pytestmark = pytest.mark.unit

SPENT = "runs/x is at step 8, train.max_steps is 8: the budget is spent, nothing to do"
TORCHRUN_ENV = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
SRUN_ENV = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}


# (backend, nproc_per_node, env, spent) → route; each row names the rule that decides it
TABLE = [
    # a launcher started us: this process is one rank, whatever else holds
    ("local", 1, TORCHRUN_ENV, None, LAUNCHER),
    ("local", 4, TORCHRUN_ENV, SPENT, LAUNCHER),
    ("local", 1, SRUN_ENV, None, LAUNCHER),
    ("ray", 1, {"RANK": "0"}, None, LAUNCHER),  # a Ray Train worker runs `train()` as one rank
    ("ray", 2, SRUN_ENV, SPENT, LAUNCHER),
    # --backend ray without a launcher: this process drives Ray Train (it checks the budget itself)
    ("ray", 1, {}, None, RAY_DRIVER),
    ("ray", 4, {}, SPENT, RAY_DRIVER),
    # no launcher, local backend: a spent budget wins over starting anything
    ("local", 4, {}, SPENT, BUDGET_SPENT),
    ("local", 1, {}, SPENT, BUDGET_SPENT),
    # then our own torchrun for several ranks, else this process
    ("local", 2, {}, None, TORCHRUN),
    ("local", 1, {}, None, SINGLE_PROCESS),
    ("local", 1, {"LOCAL_RANK": "0", "WORLD_SIZE": "1"}, None, SINGLE_PROCESS),  # no RANK: not a launcher
]


@pytest.mark.parametrize("backend, nproc, env, spent, expected", TABLE)
def test_route_table(backend, nproc, env, spent, expected):
    route = choose_route(backend, nproc, env, spent)
    assert isinstance(route, Route) and route.name == expected
    assert route.why and "\n" not in route.why


def test_every_route_is_reachable():
    assert {row[-1] for row in TABLE} == {RAY_DRIVER, LAUNCHER, BUDGET_SPENT, TORCHRUN, SINGLE_PROCESS}


def test_the_budget_spent_route_says_why():
    assert choose_route("local", 2, {}, SPENT).why == SPENT


def test_the_decision_reads_only_what_it_is_given(monkeypatch):
    monkeypatch.setenv("RANK", "0")  # the real environment says launcher; the mapping given does not
    assert choose_route("local", 1, {}, None).name == SINGLE_PROCESS
    monkeypatch.delenv("RANK")
    assert choose_route("local", 1, {"RANK": "0"}, None).name == LAUNCHER
