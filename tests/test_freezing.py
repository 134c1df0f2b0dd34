"""Gradual freezing of B (method.md 3.2): the schedule, exactness under real optimizers, release, memory, errors;
and the LoRA-FA v2 gradient correction (method.md 2)."""

from __future__ import annotations

from decimal import Decimal

import pytest
import torch
from peft import get_peft_model

from lamda_peft import LamdaConfig, LamdaLayer, LoraFAConfig, attach_freezing, freeze_count
from lamda_peft.schedule import freeze_end_step, frozen_columns
from lamda_peft.tuners.lora_fa import LoraFALayer

from conftest import make_tiny_llama


def reference_count(t: int, T: int, r: int, ratio: str) -> int:
    """Largest k <= r with k * ratio * T <= r * t, in exact decimal arithmetic (independent of the implementation)."""
    if Decimal(ratio) == 0:
        return r
    return max(k for k in range(r + 1) if Decimal(k) * Decimal(ratio) * T <= r * t)


@pytest.mark.parametrize("ratio", ["0", "0.1", "0.3", "0.5", "0.7", "1"])
def test_schedule_matches_the_formula(ratio):
    for r in (1, 3, 8, 16):
        for T in (1, 7, 10, 100):
            counts = [freeze_count(t, T, r, float(ratio)) for t in range(T + 1)]
            assert counts == [reference_count(t, T, r, ratio) for t in range(T + 1)]
            assert counts == sorted(counts) and counts[-1] == r
            # freeze_end_step: the first step at which every column is frozen, for every rank alike
            assert freeze_end_step(T, float(ratio)) == counts.index(r)


def test_schedule_known_values():
    # r=8, T=100, ratio 0.3: one column every 3.75 steps, all frozen at t = 30 (the authors' code stops at 3)
    assert [freeze_count(t, 100, 8, 0.3) for t in (0, 3, 4, 29, 30, 100)] == [0, 0, 1, 7, 8, 8]
    # 0.1 is stored slightly above 1/10 as a float: floor(4 * 10 / (0.1 * 100)) must still be 4
    assert freeze_count(10, 100, 4, 0.1) == 4
    assert freeze_count(0, 10, 4, 0.0) == 4 and freeze_count(9, 10, 4, 1.0) == 3


def test_column_order():
    assert frozen_columns(3, 8, "largest_first") == slice(0, 3)
    assert frozen_columns(3, 8, "smallest_first") == slice(5, 8)
    with pytest.raises(ValueError, match="freeze_order"):
        frozen_columns(1, 8, "middle_first")


def lamda_model(**config):
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], freeze_ratio=0.5) | config
    return get_peft_model(make_tiny_llama(), LamdaConfig(**config))


def b_params(model):
    return {name: module.lamda_B["default"] for name, module in model.named_modules() if isinstance(module, LamdaLayer)}


def s_params(model):
    return {name: module.lamda_S["default"] for name, module in model.named_modules() if isinstance(module, LamdaLayer)}


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (2, 9), generator=g) for _ in range(n)]


RUNS = {
    "adamw_clip_accum": dict(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), clip=0.5, accum=2),
    "sgd_momentum_smallest_first": dict(optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=0.01),
                                        order="smallest_first"),
    "adamw_bf16_autocast": dict(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), bf16=True),
}


@pytest.mark.parametrize("run", RUNS)
def test_frozen_columns_are_bit_identical(run):
    """A real run with T=10, freeze_ratio=0.5, r=4: column j freezes after step ceil(1.25 (j+1)) and must never move."""
    spec = RUNS[run]
    T, accum = 10, spec.get("accum", 1)
    model = lamda_model(freeze_order=spec.get("order", "largest_first"))
    optimizer = spec["optimizer"](model.parameters())
    freezer = attach_freezing(model, optimizer, total_steps=T)
    history = [{n: b.detach().clone() for n, b in b_params(model).items()}]
    s_history = [{n: s.detach().clone() for n, s in s_params(model).items()}]
    data = batches(T * accum)
    for step in range(T):
        for ids in data[step * accum:(step + 1) * accum]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec.get("bf16", False)):
                loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
        k = freeze_count(step, T, 4, 0.5)
        for B in b_params(model).values():  # zeroed in backward already, so clipping never sees frozen columns
            assert k == 4 or not B.grad[:, frozen_columns(k, 4, spec.get("order", "largest_first"))].any()
        if "clip" in spec:
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec["clip"])
        optimizer.step()
        optimizer.zero_grad()
        history.append({n: b.detach().clone() for n, b in b_params(model).items()})
        s_history.append({n: s.detach().clone() for n, s in s_params(model).items()})
        assert freezer.step == step + 1
        assert freezer.frozen_columns == len(b_params(model)) * freeze_count(step + 1, T, 4, 0.5)

    order = spec.get("order", "largest_first")
    for name in b_params(model):
        for t in range(1, T + 1):
            k_before, k = freeze_count(t - 1, T, 4, 0.5), freeze_count(t, T, 4, 0.5)
            frozen = frozen_columns(k_before, 4, order)
            # columns frozen before step t did not move in step t (nor later, by induction)
            assert torch.equal(history[t][name][:, frozen], history[t - 1][name][:, frozen])
            # the others trained in step t
            free = [j for j in range(4) if j not in range(4)[frozen]]
            for j in free:
                assert not torch.equal(history[t][name][:, j], history[t - 1][name][:, j]), (name, t, j)
        # S trains to the end
        assert not torch.equal(s_history[T][name], s_history[T - 1][name])
    # after step ceil(0.5 * 10) = 5, B is fully frozen and released
    assert freezer.released and freezer.frozen_fraction == 1.0
    for B in b_params(model).values():
        assert not B.requires_grad and B.grad is None and B not in optimizer.state


def test_release_is_structural_and_b_gets_no_gradient():
    model = lamda_model(freeze_ratio=0.0)  # B frozen from the start
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    freezer = attach_freezing(model, optimizer, total_steps=5)
    assert freezer.released and freezer.state()["frozen_fraction"] == 1.0
    model.set_adapter("default")
    model.disable_adapter_layers()
    model.enable_adapter_layers()
    with model.disable_adapter():
        pass
    ids = batches(1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    for name, B in b_params(model).items():
        assert not B.requires_grad and B.grad is None, name
    for S in s_params(model).values():
        assert S.requires_grad and S.grad is not None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lamda_S" in n for n in trainable)


def test_release_never_keeps_masking():
    model = lamda_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    freezer = attach_freezing(model, optimizer, total_steps=4, release="never")
    for t, ids in enumerate(batches(4), start=1):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if t == 2:  # fully frozen after step ceil(0.5 * 4) = 2
            frozen = {n: b.detach().clone() for n, b in b_params(model).items()}
    assert freezer.frozen_fraction == 1.0 and not freezer.released
    for name, B in b_params(model).items():
        assert B.requires_grad and B in optimizer.state  # still trainable and with AdamW state, yet constant
        assert torch.equal(B, frozen[name])


def test_skipped_scaler_step_does_not_advance_the_schedule():
    model = lamda_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = attach_freezing(model, optimizer, total_steps=4)
    scaler = torch.amp.GradScaler("cpu")
    ids = batches(1)[0]
    scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
    next(iter(s_params(model).values())).grad[0, 0] = float("inf")
    scaler.step(optimizer)
    scaler.update()
    assert freezer.step == 0
    optimizer.zero_grad()
    scaler.scale(model(input_ids=ids, labels=ids).loss).backward()
    scaler.step(optimizer)
    assert freezer.step == 1


def saved_activation_bytes(model, ids, embed):
    """Bytes autograd keeps for backward in one forward, counting each storage once, parameters and buffers excluded."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in owned:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(inputs_embeds=embed(ids), labels=ids)
    return sum(seen.values()), out.loss


def test_saved_activations_are_n_r_per_layer_in_both_phases():
    """Per adapted layer, the adapter path keeps exactly x A^T (n x r fp32) beyond what the frozen base keeps."""
    model = lamda_model(r=4)
    n_layers, n, r = len(b_params(model)), 2 * 9, 4
    embed = model.get_input_embeddings()
    ids = batches(1)[0]

    def embed_requiring_grad(ids):  # as inside a deeper network: the base's own activations are kept
        return embed(ids).detach().requires_grad_()

    with model.disable_adapter():
        base_bytes, _ = saved_activation_bytes(model, ids, embed_requiring_grad)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    freezer = attach_freezing(model, optimizer, total_steps=4)
    for phase in ("B training", "B partly frozen", "B released"):
        adapter_bytes, loss = saved_activation_bytes(model, ids, embed_requiring_grad)
        assert adapter_bytes - base_bytes == n_layers * n * r * 4, phase
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if phase == "B training":
            optimizer.step()  # one more step: k = 2 of 4
    assert freezer.released


def test_bad_input_errors():
    model = lamda_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        attach_freezing(model, optimizer, total_steps=0)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        attach_freezing(model, optimizer, total_steps=None)
    with pytest.raises(ValueError, match="release="):
        attach_freezing(model, optimizer, total_steps=5, release="sometimes")
    s_only = torch.optim.AdamW([p for n, p in model.named_parameters() if "lamda_S" in n], lr=1e-2)
    with pytest.raises(ValueError, match="optimizer does not hold .*lamda_B.default"):
        attach_freezing(model, s_only, total_steps=5)
    model.peft_config["default"].freeze_ratio = 1.5  # mutated after construction
    with pytest.raises(ValueError, match=r"freeze_ratio must be a number in \[0, 1\]"):
        attach_freezing(model, optimizer, total_steps=5)
    with pytest.raises(ValueError, match="freeze_ratio"):
        LamdaConfig(freeze_ratio=-0.1)
    with pytest.raises(TypeError, match="peft_config"):
        attach_freezing(make_tiny_llama(), optimizer, total_steps=5)


def lorafa_model(correction, r=4, alpha=8):
    config = LoraFAConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], grad_correction=correction)
    return get_peft_model(make_tiny_llama(), config)


def lorafa_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraFALayer)}


def test_lorafa_v2_gradient_correction_matches_float64_reference():
    plain, corrected = lorafa_model(False), lorafa_model(True)
    for m in (plain, corrected):  # B != 0 so that A's gradient path is non-trivial too
        torch.manual_seed(1)
        for layer in lorafa_layers(m).values():
            torch.nn.init.normal_(layer.lorafa_B["default"], std=0.1)
    ids = batches(1)[0]
    for m in (plain, corrected):
        m(input_ids=ids, labels=ids).loss.backward()
    s = 8 / 4
    for name, layer in lorafa_layers(corrected).items():
        A = layer.lorafa_A["default"].double()
        g = lorafa_layers(plain)[name].lorafa_B["default"].grad.double()
        expected = g @ torch.linalg.pinv(A @ A.T) / s**2
        torch.testing.assert_close(layer.lorafa_B["default"].grad.double(), expected, rtol=1e-5, atol=1e-9)


def test_lorafa_v2_correction_is_a_constant_for_orthonormal_a():
    plain, corrected = lorafa_model(False), lorafa_model(True)
    ids = batches(1)[0]
    corrected(input_ids=ids, labels=ids).loss.backward()  # computes and caches (A A^T)^+ for the random A
    corrected.zero_grad()
    torch.manual_seed(2)
    for name, layer in lorafa_layers(corrected).items():
        A = layer.lorafa_A["default"]
        Q = torch.linalg.qr(torch.randn(A.shape[1], A.shape[0])).Q.T  # (r, d_in) orthonormal rows
        for m in (plain, corrected):
            lorafa_layers(m)[name].lorafa_A["default"].copy_(Q)  # the cached pseudo-inverse must follow A
    for m in (plain, corrected):
        m(input_ids=ids, labels=ids).loss.backward()
    for name, layer in lorafa_layers(corrected).items():
        g = lorafa_layers(plain)[name].lorafa_B["default"].grad
        torch.testing.assert_close(layer.lorafa_B["default"].grad, g / 2.0**2, rtol=1e-5, atol=1e-8)


def test_lorafa_grad_correction_is_validated():
    with pytest.raises(ValueError, match="grad_correction"):
        LoraFAConfig(grad_correction="yes")


def test_lorafa_v2_correction_follows_a_new_adapter_under_the_same_name():
    """Audit (issue 13.1): delete_adapter + add_adapter under one name used a stale (A A^T)^+: the new A is often
    allocated at the freed address with the same version counter. Every cycle must match the float64 reference."""
    model = lorafa_model(True)
    config = LoraFAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], grad_correction=True)
    ids = batches(1)[0]
    s = 8 / 4
    for cycle in range(6):
        torch.manual_seed(100 + cycle)
        model.add_adapter("cycled", config)
        model.set_adapter("cycled")
        for layer in lorafa_layers(model).values():
            torch.nn.init.normal_(layer.lorafa_B["cycled"], std=0.1)
        model(input_ids=ids, labels=ids).loss.backward()  # computes (A A^T)^+ for this A
        model.zero_grad()
        for layer in lorafa_layers(model).values():  # the raw gradient, with the correction off for the reference
            layer.grad_correction["cycled"] = False
        model(input_ids=ids, labels=ids).loss.backward()
        raw = {n: layer.lorafa_B["cycled"].grad.double().clone() for n, layer in lorafa_layers(model).items()}
        model.zero_grad()
        for layer in lorafa_layers(model).values():
            layer.grad_correction["cycled"] = True
        model(input_ids=ids, labels=ids).loss.backward()
        for name, layer in lorafa_layers(model).items():
            A = layer.lorafa_A["cycled"].double()
            expected = raw[name] @ torch.linalg.pinv(A @ A.T) / s**2
            torch.testing.assert_close(layer.lorafa_B["cycled"].grad.double(), expected, rtol=1e-5, atol=1e-9,
                                       msg=lambda m: f"cycle {cycle}, {name}: {m}")
        model.zero_grad()
        model.set_adapter("default")
        model.delete_adapter("cycled")


@pytest.mark.parametrize("setting", [dict(freeze_ratio=0.0), dict(start_step=5)], ids=["freeze_ratio_0", "start_step"])
def test_freezing_a_deferred_init_snapshots_the_real_factors(tmp_path, setting):
    """Audit (issue 13.2): with a config read from disk the init is deferred to first use; attaching the schedule
    before that snapshotted the zero placeholders, and each step then restored the frozen columns to zero."""
    freeze_ratio = setting.get("freeze_ratio", 0.5)
    LamdaConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], freeze_ratio=freeze_ratio).save_pretrained(tmp_path)
    model = get_peft_model(make_tiny_llama(), LamdaConfig.from_pretrained(tmp_path))
    reference = get_peft_model(make_tiny_llama(), LamdaConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)
    attach_freezing(model, optimizer, total_steps=10, release="never", start_step=setting.get("start_step", 0))
    ids = batches(1)[0]
    before = model(input_ids=ids).logits.detach()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # lr 0: nothing may move
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)
    for name, B in b_params(model).items():
        torch.testing.assert_close(B, b_params(reference)[name], rtol=0, atol=0)
        assert B.abs().sum() > 0
