"""Peak estimators against numpy/scipy references, their convergence on known distributions, and
the thin-statistics warning (thin statistics warn once, naming the fix; thick ones stay quiet)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tiny_models as T
import torch
from scipy.stats import gaussian_kde

import headlab as hl
from headlab.interventions import intervention_from_name
from headlab.models.layout import Family, Layout
from headlab.stats import StatsCollector, ThinStatisticsWarning
from headlab.stats.container import _smooth
from headlab.stats.thin import (
    MEDIAN_MIN_VALUES,
    hist_values_needed,
    kde_values_needed,
    per_occupied_bin,
    thin_message,
)


def fake_layout(d_head: int) -> Layout:
    fam = Family("fake", ("fake",), layers="layers", out_proj="o")
    return Layout(fam, 1, 1, d_head, 1, ("o",), (None,))


def feed(samples: torch.Tensor, config: hl.StatsConfig, chunk: int = 4096) -> hl.Stats:
    """samples: [tokens, neuron] for one layer with one head, fed ``chunk`` tokens per input."""
    col = StatsCollector(fake_layout(samples.shape[1]), config)
    for i in range(0, samples.shape[0], chunk):
        col.begin_batch(1)
        col.update(0, samples[i : i + chunk][None, :, None, :])  # [batch=1, pos, head=1, neuron]
    return col.finalize()


def _skewed(n: int, gen: torch.Generator) -> torch.Tensor:
    """Three neurons: gamma(3) (mode 2), a Laplace spike at 0.5 over a wide tail, bimodal."""
    g = torch.distributions.Gamma(3.0, 1.0).sample((n,))
    lap = 0.5 + torch.distributions.Laplace(0.0, 0.3).sample((n,))
    wide = torch.where(torch.rand(n, generator=gen) < 0.2, torch.randn(n, generator=gen) * 4, lap)
    bi = torch.where(
        torch.rand(n, generator=gen) < 0.65,
        torch.randn(n, generator=gen) * 0.4 - 1.5,
        torch.randn(n, generator=gen) * 0.8 + 2.0,
    )
    return torch.stack([g, wide, bi], dim=1)  # [n, neuron]


TRUE_MODES = np.array([2.0, 0.5, -1.5])


def test_fft_smoothing_equals_direct_gaussian_convolution():
    gen = torch.Generator().manual_seed(0)
    hist = torch.rand(2, 3, 120, generator=gen, dtype=torch.float64)  # [layer, N, bins]
    sigma = torch.tensor([[0.7, 2.5, 6.0], [1.0, 3.0, 0.2]], dtype=torch.float64)
    got = _smooth(hist, sigma)
    r = 24  # 4 * the widest sigma: the kernel's cut
    x = np.arange(-r, r + 1)
    for layer in range(2):
        for i in range(3):
            kern = np.exp(-0.5 * (x / float(sigma[layer, i])) ** 2)
            want = np.convolve(hist[layer, i].numpy(), kern / kern.sum(), mode="same")
            np.testing.assert_allclose(got[layer, i].numpy(), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bandwidth", [0.1, 0.3])
def test_kde_peak_matches_scipy_gaussian_kde_on_the_same_samples(bandwidth):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    samples = _skewed(20_000, gen)
    stats = feed(samples, hl.StatsConfig(bins=1000, warmup_tokens=20_000, reservoir=0))
    got = stats.peak("kde", bandwidth=bandwidth)[0, 0].numpy()
    width = stats.bin_width()[0, 0].numpy()
    lo, hi = stats.tensors["lo"][0].numpy(), stats.tensors["hi"][0].numpy()
    for i in range(samples.shape[1]):
        x = samples[:, i].double().numpy()
        inside = x[(x >= lo[i]) & (x <= hi[i])]  # the histogram's range: what headlab smooths
        kde = gaussian_kde(inside, bw_method=bandwidth * x.std() / inside.std(ddof=1))
        grid = lo[i] + (np.arange(1000) + 0.5) * width[i]
        want = grid[np.argmax(kde(grid))]
        assert abs(got[i] - want) <= 1.01 * width[i], (i, got[i], want, width[i])


@pytest.mark.parametrize("estimator", ["hist", "kde"])
def test_peaks_of_known_distributions_converge_as_data_grows(estimator):
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    samples = _skewed(400_000, gen)
    sd = samples.std(0).numpy()
    errors = []
    for n in (2_000, 400_000):
        stats = feed(samples[:n], hl.StatsConfig(bins=200, warmup_tokens=2_000, reservoir=0))
        peak = stats.peak(estimator, bandwidth=0.1)[0, 0].numpy()
        errors.append(np.abs(peak - TRUE_MODES) / sd)
    small, large = errors
    width = (stats.bin_width()[0, 0].numpy() / sd).max()
    assert np.all(large <= max(0.05, 1.01 * width)), large  # within one bin / 0.05 sd at 400k
    assert large.mean() < small.mean()  # and closer than from 2k values


def test_per_occupied_bin_counts_only_bins_that_hold_values():
    hist = torch.tensor(
        [[[4, 0, 2, 2, 0, 0, 1, 0], [0, 0, 0, 9, 0, 0, 0, 0], [3, 3, 3, 0, 0, 0, 0, 0]]]
    )  # [layer, N, bins]: 9 values in 4, 1 and 3 occupied bins
    assert per_occupied_bin(hist) == pytest.approx(3.0)  # the median neuron


def test_thin_message_names_the_fix_and_thick_statistics_pass():
    gen = torch.Generator().manual_seed(3)
    thin = feed(torch.randn(384, 4, generator=gen), hl.StatsConfig(bins=1000, reservoir=0), 48)
    hist = thin_message(thin, "peak", "hist")  # 8 inputs of 48 values: blocks are counted
    assert hist is not None and "384 values per neuron over 1000 bins" in hist
    assert f"--n-stats-blocks {-(-hist_values_needed(1000) // 48)}" in hist and "KDE" in hist
    kde = thin_message(thin, "peak", "kde", 0.1)
    assert kde is not None and f"{kde_values_needed(0.1):,}" in kde
    assert "peak:kde:" not in kde  # 384 values would need a kernel wider than 0.2 sd
    some = feed(torch.randn(1_536, 4, generator=gen), hl.StatsConfig(reservoir=0), 48)
    assert "or use a wider kernel (peak:kde:0.2)" in thin_message(some, "peak", "kde", 0.1)
    median = thin_message(thin, "median")
    assert median is not None and f"{MEDIAN_MIN_VALUES:,}" in median
    thick = feed(torch.randn(60_000, 4, generator=gen), hl.StatsConfig(bins=1000, reservoir=0))
    for args in (("peak", "hist"), ("peak", "kde", 0.1), ("median",)):
        assert thin_message(thick, *args) is None, args
    assert thin_message(thick, "peak", "kde", 0.01) is not None  # a narrow kernel needs more


def test_peak_means_the_statistics_own_estimator_and_old_files_keep_the_histogram(tmp_path):
    from safetensors.torch import load_file, save_file

    assert hl.Peak().label == "peak" and hl.Peak().estimator is None
    assert intervention_from_name("peak:hist").label == "peak:hist"
    assert intervention_from_name("peak:kde").label == "peak:kde:0.1"
    assert hl.Peak(bandwidth=0.3).estimator == "kde"  # only a KDE has a bandwidth
    gen = torch.Generator().manual_seed(4)
    stats = feed(_skewed(20_000, gen), hl.StatsConfig(bins=500, reservoir=0))
    assert stats.config.peak_estimator == "kde"
    assert torch.equal(stats.peak(), stats.peak("kde", bandwidth=0.1))
    assert torch.equal(stats.constant("peak", 0), stats.peak("kde")[0])
    assert not torch.equal(stats.peak(), stats.peak("hist"))
    # a file written before `peak` meant the KDE: its header has no peak_estimator
    path = stats.save(tmp_path / "new.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["headlab"])
    del header["config"]["peak_estimator"]
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"headlab": json.dumps(header)})
    again = hl.Stats.load(old)
    assert again.config.peak_estimator == "hist"
    assert torch.equal(again.peak(), stats.peak("hist"))
    assert torch.equal(hl.Stats.load(path).peak(), stats.peak("kde"))


def _tiny_stats(n_inputs: int) -> tuple[torch.nn.Module, hl.Stats]:
    model = T.build("llama_gqa")
    batch = hl.Batch(**T.inputs("llama_gqa", batch=n_inputs, seed=4))
    return model, hl.collect_stats(model, batch, config=hl.StatsConfig(reservoir=0))


def test_tiny_model_thin_statistics_warn_once_and_thick_ones_do_not():
    model, thin = _tiny_stats(4)  # 48 values per neuron
    plan = hl.Plan.of({(0, 1): hl.Peak(), (1, 2): hl.Peak(), (1, 3): hl.Median()})
    inputs = T.inputs("llama_gqa", batch=2, seed=5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            with hl.intervene(model, plan, stats=thin):
                model(**inputs)
    thin_warnings = [str(w.message) for w in seen if w.category is ThinStatisticsWarning]
    assert len(thin_warnings) == 2, thin_warnings  # once for peak, once for median: not per head
    assert "peak ablation (KDE, bandwidth 0.1 sd) from 48 values per neuron" in thin_warnings[0]
    assert "--n-stats-blocks 264" in thin_warnings[0]  # 3,162 values / 12 tokens per input
    assert thin_warnings[1].startswith("median ablation from 48 values")

    model, thick = _tiny_stats(400)  # 4,800 values per neuron
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThinStatisticsWarning)
        with hl.intervene(model, plan, stats=thick):
            model(**inputs)


@pytest.fixture(scope="module")
def tiny_folder_unit(tmp_path_factory):
    from tiny_folder import make_model_folder

    return make_model_folder(tmp_path_factory.mktemp("tiny-llama"))


def test_job_reports_thin_statistics_once_on_its_status_line(tiny_folder_unit, tmp_path):
    common = dict(model=str(tiny_folder_unit), data="python-docs", seq_len=16, n_blocks=1)
    said: list[str] = []
    hl.run_sweep(
        out=tmp_path / "thin", n_stats_blocks=2, methods=["zero", "peak"],
        on_status=said.append, **common,
    )  # fmt: skip
    thin = [m for m in said if "is noisy" in m]
    assert len(thin) == 1 and "--n-stats-blocks 198" in thin[0], said  # 3,162 / 16
    said.clear()
    hl.run_sweep(
        out=tmp_path / "thick", n_stats_blocks=256, methods=["zero", "peak"],
        on_status=said.append, **common,
    )  # fmt: skip
    assert not [m for m in said if "noise" in m or "noisy" in m], said
