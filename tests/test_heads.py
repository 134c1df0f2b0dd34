"""The regression head's bias starts at the training labels' mean (the STS-B collapse fix), for every method."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                          RobertaConfig, RobertaForSequenceClassification)

from lamda_peft import LamdaConfig
from lamda_peft.heads import apply_regression_bias, init_regression_bias, regression_output_layer

LABELS = [0.0, 1.25, 2.5, 5.0, 3.8, 4.2, 0.4]


def tiny(cls, config_cls, **kw):
    torch.manual_seed(0)
    config = config_cls(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=1, pad_token_id=0, **kw)
    return cls(config).eval()


def bert():
    return tiny(BertForSequenceClassification, BertConfig)


def predictions(model):
    ids = torch.randint(1, 64, (5, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(input_ids=ids).logits.squeeze(-1)


@pytest.mark.parametrize("wrap", [None, "lora", "lamda"])
def test_bias_at_label_mean_shifts_every_prediction_by_the_mean(wrap):
    model = bert()
    before = predictions(model)
    mean = init_regression_bias(model, LABELS)
    assert mean == pytest.approx(sum(LABELS) / len(LABELS), abs=1e-12)
    common = dict(r=2, lora_alpha=4, target_modules=["query", "value"], task_type=TaskType.SEQ_CLS)
    if wrap == "lora":
        model = get_peft_model(model, LoraConfig(**common))
    elif wrap == "lamda":
        model = get_peft_model(model, LamdaConfig(**common))
    # the head's old bias (0 in BERT's init) is replaced by the mean, so every prediction moves by exactly the mean
    torch.testing.assert_close(predictions(model), before + mean, rtol=0, atol=1e-5)
    if wrap is not None:  # the trained (and saved) copy of the head holds it
        assert float(model.base_model.model.classifier.modules_to_save["default"].bias) == pytest.approx(mean)


def test_head_inside_a_classifier_block_and_head_without_bias():
    roberta = tiny(RobertaForSequenceClassification, RobertaConfig)
    assert regression_output_layer(roberta) is roberta.classifier.out_proj
    init_regression_bias(roberta, [2.0, 4.0])
    assert float(roberta.classifier.out_proj.bias) == 3.0 and float(roberta.classifier.dense.bias.abs().max()) == 0
    torch.manual_seed(0)
    llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                       num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                       pad_token_id=0))
    assert "no bias" in apply_regression_bias(llama, "regression", LABELS, None)  # default: a note, nothing done
    with pytest.raises(ValueError, match="no bias.*--regression-bias zero"):
        apply_regression_bias(llama, "regression", LABELS, "label-mean")


def test_choices_and_bad_input():
    model = bert()
    assert apply_regression_bias(model, "regression", LABELS, "zero") is None
    assert float(model.classifier.bias) == 0.0
    assert "2.45" in apply_regression_bias(model, "regression", LABELS, None)
    with pytest.raises(ValueError, match="regression tasks only"):
        apply_regression_bias(bert(), "classification", LABELS, "label-mean")
    assert apply_regression_bias(bert(), "classification", LABELS, None) is None
    with pytest.raises(ValueError, match="finite"):
        init_regression_bias(bert(), [1.0, float("nan")])
    with pytest.raises(ValueError, match="no 1-output regression head"):
        init_regression_bias(tiny(BertForSequenceClassification, BertConfig).bert, LABELS)
