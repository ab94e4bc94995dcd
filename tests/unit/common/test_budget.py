"""common/budget.py: what a process lets its clients hold at once."""

from __future__ import annotations

from common.budget import Hold, MemoryBudget


def test_a_budget_refuses_what_does_not_fit_and_takes_it_back_when_released() -> None:
    budget = MemoryBudget(100)
    first, second = Hold(budget), Hold(budget)
    assert first.take(60) and not second.take(50) and second.take(40)
    assert budget.held == 100 and not budget.fits(1) and not second.take(1)
    first.release()
    assert budget.held == 40 and second.take(60)


def test_one_item_larger_than_the_budget_fits_only_alone_and_only_when_asked() -> None:
    budget = MemoryBudget(100)
    alone = Hold(budget)
    assert not alone.take(150)
    assert alone.take(150, alone_ok=True) and budget.held == 150
    other = Hold(budget)
    assert not other.take(1, alone_ok=True)  # something is held: the limit holds again
    alone.release()
    assert budget.held == 0 and other.take(1)


def test_no_budget_means_no_limit() -> None:
    assert Hold(None).take(10**12)
