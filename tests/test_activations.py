"""LamdaConfig(init="activations") + initialize_from_activations: the math against float64 references, the refusals."""

import pytest
import torch
from peft import PeftModel, get_peft_model

from lamda_peft import LamdaConfig, LamdaLayer, attach_freezing, initialize_from_activations, lamda_param_groups
from lamda_peft.tuners.delta import weight_as_out_in

from conftest import make_tiny_gpt2, make_tiny_llama

R, ALPHA = 4, 8


def _batches(n=3, seed=5):
    """Batches with padding (attention_mask 0 on the last positions of some rows), as a collator gives them."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128, (3, 10), generator=gen)
        mask = torch.ones(3, 10, dtype=torch.long)
        mask[1, 6:] = 0
        mask[2, 3:] = 0
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids})
    return out


def _model(make=make_tiny_llama, init="activations", **kw):
    return get_peft_model(make(), LamdaConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init=init, **kw))


def train_steps(model, optimizer, batches) -> None:
    """One optimizer step per batch, in train mode."""
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, LamdaLayer)}


def _reference_grams(model, batches):
    """X^T X of each layer's input in float64, from hooks on the *base* layers, real tokens only."""
    grams, masks = {}, {}

    def hook(name):
        def fn(module, args):
            x = args[0].double()[masks["m"]]
            grams[name] = grams.get(name, 0) + x.T @ x
        return fn

    handles = [m.get_base_layer().register_forward_pre_hook(hook(n)) for n, m in _layers(model).items()]
    with torch.no_grad(), model.disable_adapter():
        for b in batches:
            masks["m"] = b["attention_mask"].bool()
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    for h in handles:
        h.remove()
    return grams


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2])
def test_factors_match_a_float64_eigendecomposition_and_step_0_is_exact(make):
    model = _model(make).eval()
    batches = _batches()
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    with torch.no_grad(), model.disable_adapter():
        base_out = model(input_ids=ids, attention_mask=mask).logits
    grams = _reference_grams(model, batches)
    initialize_from_activations(model, batches, num_batches=len(batches), show_progress_bar=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base_out)  # the delta is exactly zero
    s = ALPHA / R
    for name, layer in _layers(model).items():
        eigenvalues, eigenvectors = torch.linalg.eigh(grams[name])
        Q = eigenvectors[:, -R:]  # (d_in, r): top-r principal directions of the real tokens' inputs
        A = layer.lamda_A["default"].double()
        B0S0 = layer.lamda_B0S0["default"].double()
        # A's rows span exactly the top-r eigenspace (projectors agree), and are orthogonal
        assert torch.allclose(torch.linalg.pinv(A) @ A, Q @ Q.T, atol=1e-5)
        gram_A = A @ A.T
        assert torch.allclose(gram_A, torch.diag(torch.diagonal(gram_A)), atol=1e-5)
        # s B0 S0 A is W0 restricted to that subspace, with B0's and A's rows scaled alike (balanced split)
        W = weight_as_out_in(layer.get_base_layer()).double()
        assert torch.allclose(s * B0S0 @ A, W @ Q @ Q.T, atol=1e-5)
        assert torch.allclose(B0S0.norm(dim=0), A.norm(dim=1), atol=1e-5)
        assert torch.equal(layer.lamda_S["default"], torch.eye(R))
        assert torch.equal(layer.lamda_B["default"], layer.lamda_B0S0["default"])
        norms = A.norm(dim=1)
        assert torch.all(norms[:-1] >= norms[1:] - 1e-6)  # B's columns by decreasing sigma': freeze_order holds


def test_padding_is_left_out():
    """The same batch with padding tokens replaced by other tokens gives the same init (they never count)."""
    batches = _batches()
    changed = [dict(b, input_ids=torch.where(b["attention_mask"].bool(), b["input_ids"], 7)) for b in batches]
    factors = []
    for data in (batches, changed):
        model = _model()
        initialize_from_activations(model, data, num_batches=3, show_progress_bar=False)
        factors.append({n: m.lamda_A["default"].clone() for n, m in _layers(model).items()})
    # LLaMA's attention is causal and the padding is at the end: real tokens never see it
    for name in factors[0]:
        assert torch.allclose(factors[0][name], factors[1][name], atol=1e-5), name


def test_training_or_saving_before_the_init_is_refused(tmp_path):
    model = _model()
    batch = _batches(1)[0]
    model.train()
    with pytest.raises(RuntimeError, match=r"lamda_peft.initialize\(model, dataloader\)"):
        model(**batch).loss.backward()
    with pytest.raises(RuntimeError, match=r"lamda_peft.initialize\(model, dataloader\)"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    with torch.no_grad():  # inference on the placeholders is the base model: allowed
        model.eval()(**batch)
    initialize_from_activations(model, _batches(), num_batches=2, show_progress_bar=False)
    assert model.training is False  # the caller's mode is restored
    model.train()
    model(**batch).loss.backward()
    model.save_pretrained(tmp_path / "a")


def test_trains_with_freezing_and_reloads_exactly(tmp_path):
    torch.manual_seed(0)
    model = _model()
    initialize_from_activations(model, _batches(), num_batches=3, show_progress_bar=False)
    optimizer = torch.optim.AdamW(lamda_param_groups(model, 1e-2), lr=1e-2)
    freezer = attach_freezing(model, optimizer, total_steps=4)
    train_steps(model, optimizer, _batches(4, seed=9))
    freezer.detach()
    model.eval()
    batch = _batches(1, seed=11)[0]
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a").eval()
    assert not any(m.awaiting_calibration for m in _layers(reloaded).values())  # factors came from the checkpoint
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


def test_bad_calls_are_refused():
    with pytest.raises(ValueError, match="init='activations'"):
        initialize_from_activations(_model(init="spectral"), _batches(), show_progress_bar=False)
    with pytest.raises(ValueError, match="no batch"):
        initialize_from_activations(_model(), [], show_progress_bar=False)
    with pytest.raises(ValueError, match="num_batches"):
        initialize_from_activations(_model(), _batches(), num_batches=0)
    with pytest.raises(ValueError, match="fewer than its rank"):  # 1 sequence of 2 real tokens < r = 4
        one = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 0]])}
        initialize_from_activations(_model(), [one], show_progress_bar=False)
    with pytest.raises(ValueError, match="PEFT model"):
        initialize_from_activations(make_tiny_llama(), _batches())


def test_a_second_call_after_training_or_on_a_loaded_adapter_is_refused(tmp_path):
    """It would reset A, B, S to a fresh init, silently throwing the training away (logits back to the base)."""
    model = _model()
    initialize_from_activations(model, _batches(), num_batches=3, show_progress_bar=False)
    train_steps(model, torch.optim.AdamW(lamda_param_groups(model, 1e-2), lr=1e-2), _batches(3, seed=9))
    model.eval()
    batch = _batches(1, seed=11)[0]
    with torch.no_grad():
        trained = model(**batch).logits
    with pytest.raises(ValueError, match="already initialized .*reset A, B and S"):
        initialize_from_activations(model, _batches(), num_batches=3, show_progress_bar=False)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, trained)  # nothing was touched
    model.save_pretrained(tmp_path / "a")
    reloaded = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    with pytest.raises(ValueError, match="from a checkpoint"):
        initialize_from_activations(reloaded, _batches(), num_batches=3, show_progress_bar=False)


def _tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return BartForConditionalGeneration(config).eval()


def test_seq2seq_calibration_sees_the_decoder_inputs_of_training_and_its_own_padding():
    """BART, source and target of the same padded length (so masks cannot be told apart by shape): the second
    moments over a padded batch equal those over each example run alone without any padding, with its labels as
    the decoder's input (every encoder row, every decoder row, cross-attention reading the encoder's rows)."""
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (3, 7), generator=gen)
    labels = torch.randint(3, 64, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    labels[0, 4:] = -100  # target padding differs from the source's
    labels[2, 6:] = -100
    ids[mask == 0] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    model = get_peft_model(_tiny_bart(), LamdaConfig(r=2, lora_alpha=4, init="activations",
                                                     target_modules=["q_proj", "k_proj", "v_proj", "fc1"]))
    layers = _layers(model)
    assert any("encoder_attn" in n for n in layers) and any(".encoder." in n for n in layers)
    from lamda_peft.tuners.lamda.activations import input_second_moments

    modes = {name: m.training for name, m in model.named_modules()}  # PeftModel "training", its base in eval
    grams, counts = input_second_moments(model, layers, [batch], num_batches=1, show_progress_bar=False)
    assert {name: m.training for name, m in model.named_modules()} == modes  # each module's own mode restored
    expected, rows = {}, {}

    def hook(name):
        def fn(module, args):
            x = args[0].double().reshape(-1, args[0].shape[-1])
            expected[name] = expected.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]
        return fn

    handles = [m.get_base_layer().register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    with torch.no_grad(), model.disable_adapter():
        for i in range(3):
            source, target = ids[i, mask[i].bool()], labels[i, labels[i] != -100]
            model(input_ids=source[None], labels=target[None])
    for h in handles:
        h.remove()
    assert counts == rows
    for name in layers:
        torch.testing.assert_close(grams[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
def test_data_parallel_ranks_get_the_same_factors_as_one_process_on_all_batches():
    """Each of 2 ranks calibrates on its own batches: the grams are summed over ranks, rank 0's factors broadcast,
    so A and B0S0 are identical on both and equal (sign-free: s B0S0 A) to one process seeing every batch."""
    from pathlib import Path

    from conftest import run_two_ranks

    result = run_two_ranks(Path(__file__).resolve().parent / "activations_dist_worker.py", port=29661, timeout=240)
    assert result["layers"] == 14 and result["ranks_equal"]
    assert result["max_diff_to_single_process"] < 1e-5
