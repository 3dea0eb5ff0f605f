"""Models larger than one device: a tiny model dispatched by accelerate over the CPU and the disk
(blocks alternately on ``cpu`` and ``disk``, the head on disk) gives the numbers of the unsplit
model: clean logits, interventions of every kind, the engine's prefix reuse, statistics, gates.

Both models are loaded from the same safetensors folder, run on the CPU in float32 and do the same
operations in the same order, so the numbers are compared exactly (``torch.equal``); the largest
absolute difference is printed per family (``pytest -s``)."""

from __future__ import annotations

import re

import pytest
import torch
import transformers as tf
from tiny_folder import make_tokenizer

import headlab as hl
from headlab.analyses.gates.core import loss_targets, masked_nll
from headlab.engine import CleanCache, forward_logits, run_plans
from headlab.models.layout import blocks_of, input_device
from headlab.models.load import load_model, model_fingerprint

VOCAB, SEQ, LAYERS = 96, 12, 4


def _config(name: str):
    """Four-layer configs: llama (grouped-query attention), gpt2 (tied head, Conv1D, learned
    positions), gpt_neox (parallel attention and MLP), opt (tied head, offset positions)."""
    if name == "llama":
        return tf.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
        )  # fmt: skip
    if name == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64)
    if name == "gpt_neox":
        return tf.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=64,
        )  # fmt: skip
    return tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        ffn_dim=48, max_position_embeddings=64, word_embed_proj_dim=32,
    )  # fmt: skip


FAMILIES = ["llama", "gpt2", "gpt_neox", "opt"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def save_tiny(name: str, path, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(_config(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)  # load_model loads one; the tests feed token ids directly
    return path


def split_map(model) -> dict[str, str]:
    """Blocks alternately on cpu and disk, the final norm and the head on disk, the rest on cpu
    (an input embedding tied to the head goes to disk with it)."""
    blocks = blocks_of(model, hl.describe(model))
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names[id(blocks)]
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    disk = {names[id(head)]}
    if head.weight is embed.weight:
        disk.add(names[id(embed)])
    device_map: dict[str, str] = {}

    def visit(module, name):
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if full == prefix:
                for i in range(len(child)):
                    device_map[f"{full}.{i}"] = "cpu" if i % 2 == 0 else "disk"
            elif prefix.startswith(full + "."):
                visit(child, full)
            elif full in disk or "norm" in full or full.endswith("ln_f"):
                device_map[full] = "disk"
            else:
                device_map[full] = "cpu"

    visit(model, "")
    return device_map


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory, tokenizer):
    """(family, unsplit model, the same weights dispatched over cpu + disk)."""
    name = request.param
    folder = save_tiny(name, tmp_path_factory.mktemp(name) / "model", tokenizer)
    plain, _ = load_model(folder)
    offload = tmp_path_factory.mktemp(f"{name}-offload")
    split, _ = load_model(folder, device_map=split_map(plain), offload_folder=offload)
    return name, plain, split


def batch(n: int = 5, seed: int = 1) -> hl.Batch:
    g = torch.Generator().manual_seed(seed)
    return hl.Batch(input_ids=torch.randint(3, VOCAB, (n, SEQ), generator=g))


def assert_equal_scores(got, want, what):
    """Equal ``Scores`` (per example and per token, NaN where the metric reads nothing)."""
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for name in g:
            for attr in ("per_example", "per_token", "weight"):
                a, b = getattr(g[name], attr), getattr(w[name], attr)
                if b is None:
                    assert a is None
                    continue
                assert torch.equal(torch.isnan(a), torch.isnan(b)), (what, name, attr)
                diff = (torch.nan_to_num(a) - torch.nan_to_num(b)).abs().max()
                worst = max(worst, float(diff))
    assert worst == 0.0, (what, worst)
    return worst


def test_the_split_model_is_really_on_cpu_and_disk(pair):
    _, plain, split = pair
    assert set(split.hf_device_map.values()) == {"cpu", "disk"}
    meta = [n for n, p in split.named_parameters() if p.device.type == "meta"]
    assert meta  # disk-offloaded weights wait on the meta device until their module runs
    assert all(p.device.type == "cpu" for p in plain.parameters())
    assert input_device(split) == torch.device("cpu") == input_device(plain)
    # the fingerprint reads offloaded weights in: statistics of one model check on the other
    assert model_fingerprint(split) == model_fingerprint(plain)
    # ... and leaves them offloaded (accelerate's own forward unties a tied head the same way)
    after = dict(split.named_parameters(remove_duplicate=False))
    assert all(after[n].device.type == "meta" for n in meta)


def test_clean_logits_are_equal(pair):
    name, plain, split = pair
    b = batch()
    want, got = forward_logits(plain, b), forward_logits(split, b)
    print(f"\n{name}: clean logits max |diff| = {float((got - want).abs().max()):.3g}")
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def stats_of(pair):
    _, plain, split = pair
    data = batch(6, seed=7)
    config = hl.StatsConfig(bins=50, reservoir=4, warmup_tokens=64)
    return tuple(hl.collect_stats(m, data, config=config) for m in (plain, split))


def test_statistics_are_equal(pair, stats_of):
    want, got = stats_of
    assert got.model_fingerprint == want.model_fingerprint
    assert got.tensors.keys() == want.tensors.keys()
    for key in want.tensors:
        assert torch.equal(got.tensors[key], want.tensors[key]), key


def plans(acts: hl.Activations) -> list[hl.Plan]:
    last = LAYERS - 1
    return [
        hl.Plan(),
        hl.Plan.of({(0, 1): hl.Zero()}),
        hl.Plan.of({(1, 0): hl.Mean()}),
        hl.Plan.of({(2, 3): hl.Peak()}),
        hl.Plan.of({(last, 1): hl.Median()}),
        hl.Plan.of({(1, 2): hl.Resample(seed=2)}),
        hl.Plan.of({(3, 1): hl.Scale(-1.0)}),
        hl.Plan.of({(last, 2): hl.Patch(acts)}),
        hl.Plan.of({(0, 0): hl.Zero(), (3, 0): hl.Mean()}),
        hl.Plan.of({hl.Site(2, (1, 2), neurons=(0, 3), positions=(2, -1)): hl.Zero()}),
    ]


def test_interventions_through_evaluate_are_equal(pair, stats_of):
    name, plain, split = pair
    stats, _ = stats_of  # statistics of the unsplit model serve the split one (same weights)
    b = batch()
    acts = hl.record(plain, batch(5, seed=9).model_inputs())
    again = hl.record(split, batch(5, seed=9).model_inputs())
    assert again.layers == acts.layers
    assert all(torch.equal(again[ly], acts[ly]) for ly in acts.layers)
    metrics = ["ce", "top1", "kl"]
    worst = 0.0
    for plan in plans(acts):
        want = hl.evaluate(plain, b, metrics, plan=plan, stats=stats)
        got = hl.evaluate(split, b, metrics, plan=plan, stats=stats)
        worst = max(worst, assert_equal_scores([got], [want], plan))
    print(f"\n{name}: evaluate (10 plans) max |diff| = {worst:.3g}")
    # hl.intervene around the model's own forward
    plan = hl.Plan.of({(1, 1): hl.Peak(), (3, 2): hl.Patch(acts)})
    with torch.no_grad():
        with hl.intervene(plain, plan, stats=stats):
            want = plain(**b.model_inputs()).logits
        with hl.intervene(split, plan, stats=stats):
            got = split(**b.model_inputs()).logits
    assert torch.equal(got, want)


def test_engine_with_prefix_reuse_is_equal(pair, stats_of):
    name, plain, split = pair
    stats, _ = stats_of
    b = batch(6, seed=3)
    acts = hl.record(plain, b.model_inputs())
    todo = plans(acts) + [hl.Plan.of({(ly, h): hl.Zero()}) for ly in (3, 0, 2, 1) for h in (0, 3)]
    blocks = blocks_of(split, hl.describe(split))
    forwards = [block.__dict__.get("forward") for block in blocks]  # accelerate's wrappers
    worst = 0.0
    for options in ({}, {"batch_size": 4, "max_batch_tokens": 8 * SEQ, "max_logit_tokens": 5}):
        want = run_plans(plain, b, todo, ["ce", "kl"], stats=stats, **options)
        cache = CleanCache()
        for _ in range(2):  # the second call replays the cached clean run's block outputs
            got = run_plans(split, b, todo, ["ce", "kl"], stats=stats, cache=cache, **options)
            worst = max(worst, assert_equal_scores(got, want, options))
    print(f"\n{name}: run_plans max |diff| = {worst:.3g}")
    # the replayed blocks got accelerate's forward back (it loads the offloaded weights)
    assert [block.__dict__.get("forward") for block in blocks] == forwards
    assert all(f is not None for f in forwards)


def test_prefix_reuse_skips_the_early_blocks_wherever_they_sit(pair):
    """Plans on the last layer replay blocks 0..2 (on cpu, disk, cpu) from the clean run: their
    attention output projections run once (the clean pass), the last one once per plan."""
    _, _, split = pair
    layout = hl.describe(split)
    calls = [0] * LAYERS

    def count(i):
        def hook(module, args, out):
            calls[i] += 1

        return hook

    handles = [p.register_forward_hook(count(i)) for i, p in enumerate(layout.out_projs)]
    try:
        run_plans(split, batch(4), [hl.Plan.of({(3, h): hl.Zero()}) for h in range(4)], ["ce"])
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 1, 1, 5]


def test_gate_nll_and_its_gradient_are_equal(pair):
    name, plain, split = pair
    b = batch(4, seed=5)
    targets = loss_targets(b)
    layout = hl.describe(plain)
    g = torch.Generator().manual_seed(0)
    base = torch.rand(2, layout.n_layers, layout.n_heads, generator=g)
    out = []
    for model in (plain, split):
        gates = base.clone().requires_grad_(True)
        nll, valid = masked_nll(model, b, targets, gates, hl.describe(model))
        nll.sum().backward()
        out.append((nll.detach(), valid, gates.grad))
    (nll_p, valid_p, grad_p), (nll_s, valid_s, grad_s) = out
    print(
        f"\n{name}: gate NLL max |diff| = {float((nll_s - nll_p).abs().max()):.3g}, "
        f"gradient {float((grad_s - grad_p).abs().max()):.3g}"
    )
    assert torch.equal(valid_s, valid_p)
    assert torch.equal(nll_s, nll_p)
    assert torch.equal(grad_s, grad_p)
    assert all(p.grad is None for p in split.parameters())


def test_auto_map_under_a_memory_budget_offloads_to_disk(tmp_path, tokenizer):
    """``max_memory`` smaller than the model: accelerate fills the CPU budget in order and puts
    the rest on disk; still the unsplit numbers."""
    folder = save_tiny("llama", tmp_path / "model", tokenizer)
    plain, _ = load_model(folder)
    size = sum(p.numel() * p.element_size() for p in plain.parameters())
    split, _ = load_model(
        folder, device_map="sequential", max_memory={"cpu": size // 2},
        offload_folder=tmp_path / "offload",
    )  # fmt: skip
    assert {"cpu", "disk"} <= set(split.hf_device_map.values())
    b = batch()
    assert torch.equal(forward_logits(split, b), forward_logits(plain, b))
    todo = [hl.Plan.of({(ly, 1): hl.Zero()}) for ly in range(LAYERS)]
    assert_equal_scores(run_plans(split, b, todo, ["ce"]), run_plans(plain, b, todo, ["ce"]), "")


def test_auto_without_a_gpu_keeps_the_model_on_the_cpu(tmp_path, tokenizer, monkeypatch):
    """``device_map='auto'`` on a machine without a usable GPU: the whole model on the CPU (it
    fits in the free memory), no hooks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    folder = save_tiny("gpt2", tmp_path / "model", tokenizer)
    model, _ = load_model(folder, device_map="auto")
    assert all(p.device.type == "cpu" for p in model.parameters())
    plain, _ = load_model(folder)
    assert torch.equal(forward_logits(model, batch()), forward_logits(plain, batch()))


def test_the_default_model_loads_through_the_same_dispatch(tmp_path, tokenizer, monkeypatch):
    """The embedded default is a converted safetensors folder in the cache: ``load_model`` hands
    it the device map like any folder (the real model: tests/slow/test_device_map_default.py)."""
    from dataclasses import replace

    from headlab.models.named import NAMED_MODELS

    folder = save_tiny("llama", tmp_path / "model", tokenizer)
    entry = replace(NAMED_MODELS["smollm2-135m"], folder=lambda on_status, progress: folder)
    monkeypatch.setitem(NAMED_MODELS, "smollm2-135m", entry)
    plain, _ = load_model(folder)
    model, _ = load_model(
        "smollm2-135m", device_map=split_map(plain), offload_folder=tmp_path / "off"
    )
    assert "disk" in model.hf_device_map.values()
    assert torch.equal(forward_logits(model, batch()), forward_logits(plain, batch()))


# --- bad input -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer):
    return save_tiny("llama", tmp_path_factory.mktemp("llama") / "model", tokenizer)


def test_a_model_too_large_without_an_offload_folder_is_refused_before_loading(
    llama_folder, monkeypatch
):
    read = []
    real = tf.LlamaForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        read.append(args)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(tf.LlamaForCausalLM, "from_pretrained", classmethod(spy))
    with pytest.raises(hl.ConfigError) as err:
        load_model(llama_folder, device_map="auto", max_memory={"cpu": "20KiB"})
    message = str(err.value)
    assert re.search(r"model needs 0\.\d\d MiB for its float32 weights, more than", message)
    assert "max_memory cpu=20.00 KiB" in message
    assert "--offload-folder DIR" in message and "--max-memory" in message
    assert read == []  # refused before a weight was read


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"device": "cuda", "device_map": "auto"}, "both say where the model goes"),
        ({"device": "cpu", "device_map": "auto"}, "both say where the model goes"),
        ({"device_map": "everywhere"}, "unknown device_map 'everywhere'"),
        ({"device_map": "auto", "max_memory": {"cpu": "2 lots"}}, "not a number with a unit"),
        ({"device_map": "auto", "max_memory": {"gpu": "1GiB"}}, "device 'gpu' is unknown"),
        ({"device_map": "auto", "max_memory": {"disk": "1GiB"}}, "not needed"),
        ({"max_memory": {"cpu": "1GiB"}}, "max_memory applies only to a dispatched model"),
        ({"offload_folder": "off"}, "offload_folder applies only to a dispatched model"),
        ({"device_map": {"model": "cpu"}}, "gives no device to lm_head.weight"),
        ({"device_map": {"": "cpu", "decoder": "cpu"}}, "'decoder', which is no module"),
        ({"device_map": {"": "tpu"}}, "puts '' on 'tpu'"),
        ({"device_map": {"": "disk"}}, "needs an offload folder"),
    ],
)
def test_bad_dispatch_options_get_clear_errors(llama_folder, options, message):
    with pytest.raises(hl.ConfigError, match=message.replace("(", r"\(")):
        load_model(llama_folder, **options)


def test_a_gpu_that_does_not_exist_is_named(llama_folder, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(hl.ConfigError, match="names GPU 0, but this machine has no usable CUDA"):
        load_model(llama_folder, device_map="auto", max_memory={0: "10GiB", "cpu": "1GiB"})
    with pytest.raises(hl.ConfigError, match="names GPU 1"):
        load_model(llama_folder, device_map={"": "cuda:1"})


def test_tied_weights_must_share_a_device(tmp_path, tokenizer):
    folder = save_tiny("gpt2", tmp_path / "model", tokenizer)
    plain, _ = load_model(folder)
    device_map = split_map(plain)
    device_map["transformer.wte"] = "cpu"  # its weight is lm_head's, which is on disk
    with pytest.raises(hl.ConfigError, match=r"splits tied weights \(lm_head.weight on 'disk'"):
        load_model(folder, device_map=device_map, offload_folder=tmp_path / "off")


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("cpu=2GiB,0=10GiB", {"cpu": 2 * 2**30, 0: 10 * 2**30}),
        ("cuda:1=1.5GB, cpu=512MiB", {1: 1_500_000_000, "cpu": 512 * 2**20}),
        ("cpu=1000", {"cpu": 1000}),
    ],
)
def test_max_memory_text(text, want):
    from headlab.memory import parse_max_memory

    assert parse_max_memory(text) == want


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cpu:2GiB", "not DEVICE=SIZE"),
        ("cpu=2XB", "not a number with a unit"),
        ("cpu=", "not DEVICE=SIZE"),
        ("cpu=1GiB,", "empty item"),
        ("gpu=1GiB", "device 'gpu' is unknown"),
        ("cpu=1GiB,cpu=2GiB", "names device 'cpu' twice"),
        ("0=1GiB,cuda:0=2GiB", "names device 0 twice"),
        ("cpu=1.5", "must be whole"),
        ("cpu=1=2", "not DEVICE=SIZE"),
    ],
)
def test_bad_max_memory_text(text, message):
    from headlab.memory import parse_max_memory

    with pytest.raises(ValueError, match=message):
        parse_max_memory(text)


def test_weights_read_by_analyses_are_read_in_where_offloaded(pair):
    """Steering reads W_O columns, the unembedding and the final norm's gain (on disk here)."""
    from headlab.analyses.steer.select import concept_dictionary, head_contributions

    _, plain, split = pair
    assert torch.equal(concept_dictionary(split, [5, 7, 9]), concept_dictionary(plain, [5, 7, 9]))
    b = batch(3, seed=6)
    b = hl.Batch(input_ids=b.input_ids, answer_pos=torch.tensor([SEQ - 1, 4, 7]))
    got, want = head_contributions(split, b), head_contributions(plain, b)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(p.device.type == "meta" for p in split.get_output_embeddings().parameters())


TWINS = [
    "sweep",
    "shift",
    "compare",
    "prune",
    "estimate",
    "cascade",
    "gate",
    "l0",
    "detect",
    "steer",
]


@pytest.mark.parametrize(
    ("name", "options"),
    [(n, {}) for n in TWINS]
    + [("attention", {"prompt": "a b c"}), ("attention", {"task": "induction"})],
)
def test_every_python_twin_passes_the_placement_on(name, options, tmp_path):
    """Each ``run_<cmd>`` takes device_map/max_memory/offload_folder and hands them to the
    model's load: ``--device cuda`` with a device map is refused there, before any work."""
    run = getattr(hl, f"run_{name}")
    with pytest.raises(hl.ConfigError, match="--device cuda and --device-map auto both say"):
        run(out=tmp_path / "x", model="/nowhere", device="cuda", device_map="auto", **options)
    assert not (tmp_path / "x").exists()
