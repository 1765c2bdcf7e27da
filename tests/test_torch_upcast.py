"""dsocr_torch/weights/upcast.py: vision towers stored in bfloat16, their float32 copies made a unit at a time."""

from __future__ import annotations

import pytest
import torch

from dsocr_torch.weights import upcast


def test_upcast_while_running_copies_a_unit_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Big modules are split into units (containers never are units); a parent's small children go with it, so
    a parent may read their weights directly; after the call every parameter is the stored one again."""
    monkeypatch.setattr(upcast, "_UNIT_BYTES", 40 * 40 * 4 + 1000)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(40, 40)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(sum(p.dtype == torch.float32 for p in tower.parameters()))
            return self.fc(x)

    class Tower(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(40))
            self.table = torch.nn.Embedding(3, 40)  # read directly by forward, never called
            self.blocks = torch.nn.ModuleList(Block() for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x * self.scale + self.table.weight[0]
            for block in self.blocks:
                x = block(x)
            return x

    seen: list[int] = []
    reference = Tower()
    tower = Tower().to(torch.bfloat16)
    tower.load_state_dict({k: v.bfloat16() for k, v in reference.state_dict().items()})
    stored = {name: p for name, p in tower.named_parameters()}
    assert upcast.upcast_while_running(tower, torch.float32) == 4  # the tower's own unit + 3 blocks
    x = torch.randn(2, 40)
    want = reference.to(torch.bfloat16).float()(x)
    seen.clear()
    got = tower(x)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-5)
    assert seen == [1 + 1 + 2] * 3  # scale, table, and one block's weight and bias at a time
    assert all(p is stored[name] for name, p in tower.named_parameters())


def test_copies_reuse_one_buffer_and_outputs_never_alias_it() -> None:
    """Every call copies into the same per-thread buffer (no fresh pages per view); a unit whose output is a view
    of its own copy (a position table returned as is) gets its own tensor back, not one the next unit overwrites."""

    class Table(torch.nn.Module):
        def __init__(self, rows: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(rows, 8))

        def forward(self, n: int) -> torch.Tensor:
            storages.append(self.weight.untyped_storage().data_ptr())
            return self.weight[:n]  # a view of the copy

    storages: list[int] = []
    first, second = Table(100).to(torch.bfloat16), Table(100).to(torch.bfloat16)
    for table in (first, second):
        assert upcast.upcast_while_running(table, torch.float32) == 1
    got = first(5)
    second(100)  # reuses the buffer's space
    torch.testing.assert_close(got, first.weight[:5].float())
    assert got.dtype == torch.float32 and got.untyped_storage().data_ptr() != upcast._arena().data_ptr()
    assert set(storages) == {upcast._arena().untyped_storage().data_ptr()}  # copies in the buffer, every call
    assert upcast._arenas.top == 0  # everything given back
