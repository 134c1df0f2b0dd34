"""LaMDA++ (method.md 3.3): the greedy max-min allocation against brute force, its bounds and errors, and the
integration with the tuner (rank_pattern, one SVD per module, save/reload without recomputation, export)."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lamda_peft
from lamda_peft import LamdaConfig, export_lora, spectral
from lamda_peft.allocation import (
    allocate_ranks,
    check_allocation_bounds,
    energy_curve,
    lamda_parameter_counts,
    rank_pattern_key,
)
from lamda_peft.spectral import spectral_factors, top_svd
from lamda_peft.tuners.delta import weight_as_out_in


# -- the allocation itself --------------------------------------------------------------------------------------
def _random_curves(rng: random.Random, modules: int, r_max: int) -> list[list[float]]:
    """E_l(0..r_max) from random singular values (float64 reference: cumulative sigma^2 / total)."""
    curves = []
    for _ in range(modules):
        sigma = sorted((rng.random() ** rng.choice([0.5, 1, 3]) for _ in range(r_max + rng.randint(0, 3))), reverse=True)
        total = sum(s * s for s in sigma)
        curves.append([sum(s * s for s in sigma[:k]) / total for k in range(r_max + 1)])
    return curves


def _brute_force_maxmin(curves, budget, r_min, r_max) -> float:
    return max(
        min(curve[r] for curve, r in zip(curves, ranks))
        for ranks in itertools.product(range(r_min, r_max + 1), repeat=len(curves))
        if sum(ranks) == budget
    )


def test_greedy_maximizes_the_minimum_energy_like_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        modules, r_max = rng.randint(1, 4), rng.randint(1, 6)
        r_min = rng.randint(1, r_max)
        curves = _random_curves(rng, modules, r_max)
        budget = rng.randint(r_min * modules, r_max * modules)
        ranks = allocate_ranks(curves, budget, r_min, r_max)
        assert sum(ranks) == budget and all(r_min <= r <= r_max for r in ranks)
        greedy_min = min(curve[r] for curve, r in zip(curves, ranks))
        assert greedy_min == pytest.approx(_brute_force_maxmin(curves, budget, r_min, r_max), abs=1e-15)


def test_ties_go_to_the_first_module_and_the_result_is_deterministic():
    same = [0.0, 0.5, 0.7, 0.8]
    assert allocate_ranks([same, same, same], budget=4, r_min=1, r_max=3) == [2, 1, 1]
    assert allocate_ranks([same, same, same], budget=5, r_min=1, r_max=3) == [2, 2, 1]
    # the lower-energy module gets units first, until it overtakes the other
    low, high = [0.0, 0.1, 0.2, 0.9], [0.0, 0.5, 0.6, 0.7]
    assert allocate_ranks([high, low], budget=4, r_min=1, r_max=3) == [1, 3]
    rng = random.Random(1)
    curves = _random_curves(rng, 20, 8)
    assert allocate_ranks(curves, 100, 2, 8) == allocate_ranks(curves, 100, 2, 8)


def test_budget_at_the_bounds_gives_all_min_or_all_max():
    curves = _random_curves(random.Random(2), 5, 6)
    assert allocate_ranks(curves, 5 * 2, 2, 6) == [2] * 5
    assert allocate_ranks(curves, 5 * 6, 2, 6) == [6] * 5


@pytest.mark.parametrize(
    "budget, r_min, r_max, message",
    [
        (3, 2, 4, r"budget 3 cannot be met .* \[4, 8\]"),
        (9, 2, 4, r"budget 9 cannot be met"),
        (4, 0, 4, r"1 <= r_min <= r_max"),
        (4, 3, 2, r"1 <= r_min <= r_max"),
        (4, 1, 5, r"r_max=5 exceeds min\(d_in, d_out\)=4 of module 'b'"),
    ],
)
def test_allocation_errors_name_the_problem(budget, r_min, r_max, message):
    with pytest.raises(ValueError, match=message):
        check_allocation_bounds(["a", "b"], [8, 4], budget, r_min, r_max)


def test_energy_curve_matches_svdvals():
    w = torch.randn(12, 20, generator=torch.Generator().manual_seed(0))
    sigma2 = torch.linalg.svdvals(w.double()).square()
    expected = (sigma2.cumsum(0) / sigma2.sum())[:5].tolist()
    svd = top_svd(w, 5)
    curve = energy_curve(svd.S, svd.total_energy, 5)
    assert curve[0] == 0.0
    assert curve[1:] == pytest.approx(expected, rel=1e-5)


# -- config -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rank_allocation="adaptive"), "rank_allocation"),
        (dict(r_min=2), "only applies to rank_allocation='energy'"),
        (dict(rank_allocation="energy", r_min=0), "r_min must be a positive integer"),
        (dict(rank_allocation="energy", r_min=6, r_max=4), "r_min=6 is larger than r_max=4"),
        (dict(rank_allocation="energy", r_min=10), "default rank budget"),
    ],
)
def test_config_rejects_bad_allocation_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LamdaConfig(r=8, **kwargs)


def test_config_defaults_are_half_and_double_r():
    assert LamdaConfig(r=8, rank_allocation="energy").rank_bounds == (4, 16)
    assert LamdaConfig(r=1, rank_allocation="energy").rank_bounds == (1, 2)


# -- the tuner --------------------------------------------------------------------------------------------------
def _energy_config(**kwargs) -> LamdaConfig:
    return LamdaConfig(**{**dict(r=4, lora_alpha=8, target_modules="all-linear", rank_allocation="energy"), **kwargs})


def _linear_weights(model) -> dict[str, torch.Tensor]:
    """Targets of all-linear on the tiny LLaMA: every Linear but the output head."""
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}


def _naive_greedy(curves, budget, r_min, r_max):
    """Independent O(budget * L) version: repeatedly give a unit to the first module of lowest energy."""
    ranks = [r_min] * len(curves)
    for _ in range(budget - r_min * len(curves)):
        open_ = [l for l in range(len(curves)) if ranks[l] < r_max]
        l = min(open_, key=lambda i: (curves[i][ranks[i]], i))
        ranks[l] += 1
    return ranks


def test_energy_ranks_match_a_reference_from_svdvals(tiny_llama):
    model = get_peft_model(tiny_llama(0), _energy_config(r_max=6, rank_budget=50))
    config = model.peft_config["default"]
    weights = _linear_weights(tiny_llama(0))
    curves = []
    for w in weights.values():
        sigma2 = torch.linalg.svdvals(w.double()).square()
        curves.append([0.0] + (sigma2.cumsum(0) / sigma2.sum())[:6].tolist())
    expected = _naive_greedy(curves, 50, 2, 6)
    assert config.rank_pattern == {rank_pattern_key(n): r for n, r in zip(weights, expected)}
    assert (config.r_min, config.r_max, config.rank_budget) == (2, 6, 50)
    # each layer got its own rank, and counts use it (independent: numel of the trainable tensors)
    counts = lamda_parameter_counts(model)
    assert sorted(counts.ranks.values()) == sorted(expected)
    assert counts.while_b_trains == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.after_b_frozen == sum(r * r for r in expected)


def test_conv1d_modules_and_a_second_adapter(tiny_gpt2, input_ids):
    model = get_peft_model(tiny_gpt2(0), _energy_config(target_modules=["c_attn", "c_fc"]))
    base = tiny_gpt2(0)
    weights = {n: m.weight for n, m in base.named_modules() if n.endswith(("c_attn", "c_fc"))}  # (d_in, d_out)
    curves = []
    for w in weights.values():  # singular values do not depend on the storage layout
        sigma2 = torch.linalg.svdvals(w.double()).square()
        curves.append([0.0] + (sigma2.cumsum(0) / sigma2.sum())[:8].tolist())
    expected = _naive_greedy(curves, 4 * len(weights), 2, 8)
    assert list(lamda_parameter_counts(model).ranks.values()) == expected
    torch.testing.assert_close(model(input_ids).logits, base(input_ids).logits)  # delta form: step 0 is exact
    model.add_adapter("second", _energy_config(r=2, target_modules=["c_fc"]))
    assert sum(lamda_parameter_counts(model, "second").ranks.values()) == 2 * 2
    assert list(lamda_parameter_counts(model).ranks.values()) == expected  # the first adapter is untouched


def test_each_weight_is_decomposed_once_and_reused_for_the_init(tiny_llama, monkeypatch):
    calls = []
    real = spectral._exact_top_svd
    monkeypatch.setattr(spectral, "_exact_top_svd", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = get_peft_model(tiny_llama(0), _energy_config())
    base = tiny_llama(0)
    assert len(calls) == len(_linear_weights(base))
    # an exact SVD truncated to r_l is the top-r_l SVD: the init equals a fresh decomposition at rank r_l
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    r = layer.r["default"]
    fresh = spectral_factors(top_svd(weight_as_out_in(base.model.layers[1].mlp.down_proj), r), layer.scaling["default"])
    # (up to the sign of each singular pair, and float32 vs float64 Gram rounding: spectral._exact_top_svd)
    reused = layer.lamda_B0S0["default"] @ layer.lamda_A["default"]
    torch.testing.assert_close(reused, fresh.B0 @ fresh.A, rtol=1e-4, atol=1e-5)


def test_callers_config_receives_the_allocation(tiny_llama):
    config = _energy_config()
    first = get_peft_model(tiny_llama(0), config)
    assert first.peft_config["default"] is config and config.rank_pattern  # PEFT's convention (issue 25)
    second = get_peft_model(tiny_llama(1), config)  # the object now holds an allocation, reused as a saved one is
    assert lamda_parameter_counts(second).ranks == lamda_parameter_counts(first).ranks
    fresh = get_peft_model(tiny_llama(1), _energy_config())  # another model's own allocation: a fresh config
    assert fresh.peft_config["default"].rank_pattern != config.rank_pattern


def test_save_reload_keeps_the_ranks_without_any_svd(tiny_llama, input_ids, tmp_path, monkeypatch):
    model = get_peft_model(tiny_llama(0), _energy_config(svd_method="randomized"))
    with torch.no_grad():  # move S away from I so the reloaded outputs test the loaded factors
        for name, p in model.named_parameters():
            if "lamda_S" in name:
                p.add_(0.05 * torch.randn_like(p))
    expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == model.peft_config["default"].rank_pattern

    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    reloaded = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    torch.testing.assert_close(reloaded(input_ids).logits, expected)
    assert calls == []
    assert lamda_parameter_counts(reloaded).ranks == lamda_parameter_counts(model).ranks

    # a saved config given to get_peft_model reproduces the ranks without allocating again
    again = get_peft_model(tiny_llama(0), LamdaConfig.from_pretrained(tmp_path))
    assert lamda_parameter_counts(again).ranks == lamda_parameter_counts(model).ranks


def test_a_hand_written_rank_pattern_with_energy_allocation_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="leave rank_pattern empty"):
        get_peft_model(tiny_llama(0), _energy_config(rank_pattern={"q_proj": 2}))


def test_r_max_above_a_module_dimension_names_it(tiny_llama):
    # k_proj/v_proj of the tiny LLaMA are 32 -> 16
    with pytest.raises(ValueError, match=r"r_max=20 exceeds min\(d_in, d_out\)=16 of module 'model.layers.0.self_attn.k_proj'"):
        get_peft_model(tiny_llama(0), _energy_config(r=10))


def test_export_lora_reproduces_per_module_ranks(tiny_llama, input_ids, tmp_path):
    model = get_peft_model(tiny_llama(0), _energy_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lamda_S" in name:
                p.add_(0.05 * torch.randn_like(p))
    expected = model(input_ids).logits
    export_lora(model, tmp_path)
    lora = PeftModel.from_pretrained(tiny_llama(0), tmp_path)
    assert isinstance(lora.peft_config["default"], LoraConfig)
    lora_ranks = {n: m.r["default"] for n, m in lora.named_modules() if hasattr(m, "lora_A")}
    assert lora_ranks == lamda_parameter_counts(model).ranks
    torch.testing.assert_close(lora(input_ids).logits, expected, rtol=1e-5, atol=1e-5)


# -- real weights -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_budget_and_bounds_on_smollm2(smollm2_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    # randomized SVD and 4 of the 30 layers (28 modules) keep this to seconds; the ranks still move
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LamdaConfig(r=8, target_modules=projections, rank_allocation="energy", svd_method="randomized",
                         layers_to_transform=[0, 1, 28, 29])
    model = get_peft_model(base, config)
    ranks = lamda_parameter_counts(model).ranks
    assert len(ranks) == 28
    assert sum(ranks.values()) == 8 * 28
    assert min(ranks.values()) >= 4 and max(ranks.values()) <= 16
    assert len(set(ranks.values())) > 1  # real spectra differ across modules (method.md 3.3)
    assert lamda_peft.allocation.lamda_parameter_counts(model).after_b_frozen == sum(r * r for r in ranks.values())
