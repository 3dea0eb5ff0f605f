"""Streaming statistics against numpy, known modes, the reservoir bound, disk round trips."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as T
import torch

import headlab as hl
from headlab.models.layout import Family, Layout
from headlab.stats import StatsCollector


def fake_layout(n_layers=1, n_heads=1, d_head=2) -> Layout:
    fam = Family("fake", ("fake",), layers="layers", out_proj="o")
    return Layout(fam, n_layers, n_heads, d_head, n_heads, ("o",) * n_layers, (None,) * n_layers)


def feed(samples: torch.Tensor, config: hl.StatsConfig, chunk: int = 50_000) -> hl.Stats:
    """samples: [tokens, d_head] for one layer with one head."""
    col = StatsCollector(fake_layout(d_head=samples.shape[1]), config)
    for i in range(0, samples.shape[0], chunk):
        x = samples[i : i + chunk]
        col.begin_batch(1)
        col.update(0, x[None, :, None, :])  # [batch=1, pos, head=1, d_head]
    return col.finalize()


def test_mean_and_variance_equal_numpy_on_the_same_activations():
    model = T.build("llama_gqa")
    batch = hl.Batch(**T.inputs("llama_gqa", batch=7, seed=3))
    stats = hl.collect_stats(model, batch, batch_size=3)  # three uneven chunks
    acts = hl.record(model, batch.model_inputs())
    for layer in range(2):
        a = acts[layer].reshape(-1, 4, 8).double().numpy()  # [tokens, head, d_head]
        np.testing.assert_allclose(stats.mean[layer].numpy(), a.mean(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(stats.var[layer].numpy(), a.var(0), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(stats.min[layer].numpy(), a.min(0), rtol=1e-6)
        np.testing.assert_allclose(stats.max[layer].numpy(), a.max(0), rtol=1e-6)
    assert stats.n_inputs == 7


def _bimodal(n, gen):
    a = torch.randn(n, generator=gen) * 0.3 - 2.0
    b = torch.randn(n, generator=gen) * 1.0 + 3.0
    pick = torch.rand(n, generator=gen) < 0.7
    return torch.where(pick, a, b)  # mode near -2


def _lognormal(n, gen):
    mu, sigma = 0.0, 0.5
    return torch.exp(mu + sigma * torch.randn(n, generator=gen))  # mode exp(mu - sigma^2)


@pytest.mark.parametrize("estimator", ["hist", "kde"])
def test_peak_of_skewed_and_bimodal_samples_within_one_bin(estimator):
    gen = torch.Generator().manual_seed(0)
    n = 1_000_000
    samples = torch.stack([_bimodal(n, gen), _lognormal(n, gen)], dim=1)
    true_modes = torch.tensor([-2.0, float(np.exp(-0.25))])
    cfg = hl.StatsConfig(bins=100, warmup_tokens=50_000, reservoir=0)  # one chunk fixes the range
    stats = feed(samples, cfg)
    peak = stats.peak(estimator, bandwidth=0.05)[0, 0]
    width = stats.bin_width()[0, 0]
    assert torch.all((peak - true_modes).abs() <= width), (peak, true_modes, width)
    # the mean is far from the mode for both: the peak is not the mean in disguise
    assert torch.all((stats.mean[0, 0] - true_modes).abs() > 3 * width)


def test_median_within_one_bin_of_numpy():
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack([_bimodal(200_000, gen), _lognormal(200_000, gen)], dim=1)
    stats = feed(samples, hl.StatsConfig(bins=200, warmup_tokens=5000, reservoir=0))
    want = torch.from_numpy(np.median(samples.numpy(), axis=0))
    assert torch.all((stats.median()[0, 0] - want).abs() <= stats.bin_width()[0, 0])


def test_reservoir_stays_within_its_bound_and_holds_real_inputs():
    model = T.build("gpt2")
    batch = hl.Batch(**T.inputs("gpt2", batch=40, seed=4))
    stats = hl.collect_stats(model, batch, batch_size=7, config=hl.StatsConfig(reservoir=5, seed=3))
    res = stats.reservoir(1)
    assert res.shape == (5, T.SEQ, 4, 8)
    acts = hl.record(model, batch.model_inputs())[1]  # [40, pos, head, d_head]
    for row in res:  # every kept input is one of the real inputs
        assert any(torch.allclose(row, a, atol=1e-6) for a in acts)
    # uniform selection: over many seeds, late inputs are kept as often as early ones
    col_hits = torch.zeros(40)
    for seed in range(200):
        col = StatsCollector(fake_layout(), hl.StatsConfig(reservoir=5, seed=seed))
        for i in range(40):
            col.begin_batch(1)
            col.update(0, torch.full((1, 1, 1, 2), float(i)))
        kept = col.finalize().tensors["reservoir"][0, :, 0, 0].long()
        col_hits[kept] += 1
    assert col_hits.sum() == 1000
    assert col_hits[:20].sum() / col_hits[20:].sum() == pytest.approx(1.0, abs=0.2)


def test_memory_does_not_grow_with_data():
    col = StatsCollector(
        fake_layout(d_head=3), hl.StatsConfig(bins=10, warmup_tokens=100, reservoir=2)
    )
    sizes = []
    for _ in range(30):
        col.begin_batch(2)
        col.update(0, torch.randn(2, 50, 1, 3))
        held = sum(t.numel() for t in col._warm[0]) + col.hist.numel() + col.res.numel()
        sizes.append(held)
    assert max(sizes[5:]) == sizes[5]


def test_save_load_round_trip_and_mismatch_errors(tmp_path):
    model = T.build("gpt_neox")
    batch = hl.Batch(**T.inputs("gpt_neox", batch=4))
    stats = hl.collect_stats(model, batch)
    path = stats.save(tmp_path / "stats.safetensors")
    again = hl.Stats.load(path, model=model)
    assert torch.equal(again.peak(), stats.peak())
    assert torch.equal(again.reservoir(0), stats.reservoir(0))
    assert again.data_fingerprint == stats.data_fingerprint
    other = T.build("gpt_neox", seed=5)  # same layout, other weights
    with pytest.raises(hl.StatsMismatchError, match="different model"):
        hl.Stats.load(path, model=other)
    with pytest.raises(hl.StatsMismatchError, match="layout"):
        hl.Stats.load(path, model=T.build("gemma"))
    with (
        pytest.raises(hl.StatsMismatchError, match="layout"),
        hl.intervene(T.build("gemma"), hl.Plan.of({(0, 0): hl.Mean()}), stats=stats),
    ):
        pass


def test_nan_while_collecting_is_a_clear_error():
    col = StatsCollector(fake_layout(), hl.StatsConfig())
    col.begin_batch(1)
    x = torch.zeros(1, 4, 1, 2)
    x[0, 2, 0, 1] = float("nan")
    with pytest.raises(hl.HeadlabError, match="NaN/Inf activations in layer 0"):
        col.update(0, x)


def test_fixed_and_minmax_ranges():
    gen = torch.Generator().manual_seed(2)
    samples = torch.randn(10_000, 2, generator=gen)
    s = feed(samples, hl.StatsConfig(range="fixed", fixed_range=(-1.0, 1.0), bins=20, reservoir=0))
    total = s.tensors["hist"].sum(-1) + s.tensors["under"] + s.tensors["over"]
    assert torch.all(total == 10_000)
    assert torch.allclose(s.bin_width(), torch.full_like(s.bin_width(), 0.1))
    s2 = feed(samples, hl.StatsConfig(range="minmax", bins=20, warmup_tokens=20_000, reservoir=0))
    assert torch.all(s2.tensors["under"] == 0) and torch.all(s2.tensors["over"] == 0)
    with pytest.raises(hl.ConfigError, match="fixed_range"):
        hl.StatsConfig(range="fixed")


def test_statistics_do_not_depend_on_where_batches_end():
    """The histogram range comes from exactly the first warmup_tokens tokens, so feeding the same
    tokens in chunks of 1,000 or 3,000 (the range fixed after 5,000 or 6,000) gives one result."""
    gen = torch.Generator().manual_seed(5)
    samples = torch.randn(20_000, 3, generator=gen) ** 3  # heavy tails: the range is sensitive
    config = hl.StatsConfig(bins=200, warmup_tokens=4096, reservoir=0)
    a, b = feed(samples, config, chunk=1000), feed(samples, config, chunk=3000)
    for key in ("hist", "under", "over"):
        assert torch.equal(a.tensors[key], b.tensors[key]), key
    first = feed(samples[:4096], config, chunk=4096)  # the range of the first 4,096 alone
    for key in ("lo", "hi"):
        assert torch.equal(a.tensors[key], first.tensors[key]), key
