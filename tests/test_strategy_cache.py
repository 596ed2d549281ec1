"""The engine keeps the ``"auto"`` probe's choice in a strategy cache: a later engine of the same model,
machine and batch shape skips the probe; anything else that could change the choice probes again."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from camscope import CamEngine, gradients
from camscope.strategy_cache import cached_strategy, save_strategy


def small_cnn(channels: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()


@pytest.fixture()
def probes(monkeypatch):
    """The choices the probe made (each call of ``gradients.fastest``), answering "folded"."""
    made = []
    monkeypatch.setattr(gradients, "fastest", lambda *args: made.append("folded") or "folded")
    return made


def explain(engine: CamEngine, batch: int = 2) -> dict:
    return engine.explain(torch.rand(batch, 3, 8, 8), labels=[0, 1, 2]).maps


def test_a_later_engine_reads_the_choice_and_gives_the_same_maps(tmp_path, probes):
    x = torch.rand(2, 3, 8, 8)
    first = CamEngine(small_cnn(), strategy_cache=tmp_path).explain(x, labels=[0, 1, 2]).maps
    assert probes == ["folded"] and len(list(tmp_path.glob("*.json"))) == 1
    second = CamEngine(small_cnn(), strategy_cache=tmp_path).explain(x, labels=[0, 1, 2]).maps
    assert probes == ["folded"]  # no second probe
    plain = CamEngine(small_cnn(), strategy="sequential").explain(x, labels=[0, 1, 2]).maps
    for algorithm, layers in plain.items():
        for name, maps in layers.items():
            torch.testing.assert_close(second[algorithm][name], first[algorithm][name])
            torch.testing.assert_close(second[algorithm][name], maps, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("change", ["model", "batch", "threads"])
def test_what_could_change_the_choice_probes_again(tmp_path, probes, change):
    explain(CamEngine(small_cnn(), strategy_cache=tmp_path))
    threads = torch.get_num_threads()
    try:
        if change == "threads":
            torch.set_num_threads(threads + 1)
        model = small_cnn(channels=6) if change == "model" else small_cnn()
        explain(CamEngine(model, strategy_cache=tmp_path), batch=3 if change == "batch" else 2)
    finally:
        torch.set_num_threads(threads)
    assert probes == ["folded", "folded"] and len(list(tmp_path.glob("*.json"))) == 2


@pytest.mark.parametrize("text", ["{not json", '{"strategy": "auto"}', '{"strategy": "fastest"}', "[]"])
def test_a_bad_entry_is_ignored_and_rewritten(tmp_path, probes, text):
    explain(CamEngine(small_cnn(), strategy_cache=tmp_path))
    (entry,) = tmp_path.glob("*.json")
    entry.write_text(text)
    assert cached_strategy(tmp_path, entry.stem) is None
    explain(CamEngine(small_cnn(), strategy_cache=tmp_path))
    assert probes == ["folded", "folded"] and cached_strategy(tmp_path, entry.stem) == "folded"


def test_an_unwritable_cache_only_means_probing_again(tmp_path, probes):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    save_strategy(blocked, "key", "folded")  # no error
    explain(CamEngine(small_cnn(), strategy_cache=blocked))
    explain(CamEngine(small_cnn(), strategy_cache=blocked))
    assert probes == ["folded", "folded"]


def test_without_a_cache_every_engine_probes_and_writes_nothing(tmp_path, probes, monkeypatch):
    monkeypatch.chdir(tmp_path)
    explain(CamEngine(small_cnn()))
    explain(CamEngine(small_cnn()))
    assert probes == ["folded", "folded"] and not list(tmp_path.iterdir())
