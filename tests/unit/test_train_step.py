"""Where the logged gradient norm comes from: measured before the boundary step where DeepSpeed keeps
none, else the engine's after it; nothing measured on steps that do not log."""

from __future__ import annotations

import pytest

from pretrain.train_step import boundary_step


class NormEngine:
    def __init__(self, tracks: bool) -> None:
        self.tracks_grad_norm, self.calls = tracks, []

    def local_grad_norm(self) -> float:
        self.calls.append("local")
        return 1.0

    def step(self, skip: bool = False) -> None:
        self.calls.append(f"step skip={skip}")

    def grad_norm(self) -> float:
        self.calls.append("tracked")
        return 2.0


@pytest.mark.parametrize("tracks, measure, norm, calls", [
    (False, True, 1.0, ["local", "step skip=False"]),
    (True, True, 2.0, ["step skip=False", "tracked"]),
    (False, False, None, ["step skip=False"]),
])
def test_the_gradient_norm_comes_from_where_the_engine_has_it(tracks, measure, norm, calls):
    engine = NormEngine(tracks)
    assert boundary_step(engine, skip=False, measure_grad_norm=measure) == norm
    assert engine.calls == calls
