"""PEFT's own generic tuner tests, as PEFT ships them, run on LaMDA, LaMDA++ and LoRA-FA (tests/peft_generic).

The test bodies come from the source release of the installed PEFT version (downloaded once with pip into the
lamda_peft cache, or LAMDA_PEFT_SDIST=path/to/peft-X.tar.gz); only the tables of methods and models are ours, and the
Hub models are built offline. All of it runs by default (about 45 s on 2 CPU cores); on its own:

    python -m pytest tests/test_peft_generic.py          # or -m peft_generic / -m "not peft_generic"
"""

from __future__ import annotations

import pytest

from peft_generic import models, tables
from peft_generic.adapt import Swap, reparametrized
from peft_generic.upstream import Unavailable, import_module

pytestmark = pytest.mark.peft_generic


def _classes() -> list[type]:
    custom = import_module("test_custom_models")
    decoder = import_module("test_decoder_models")
    seq_cls = import_module("test_seq_classifier")
    config = import_module("test_config")
    # the Hub LoRA adapter config that test_config reads with every config class: its offline stand-in (models.py)
    config.PEFT_MODELS_TO_TEST[:] = [(str(models.local_path(models.LORA_CONFIG_REPO)), "test")]
    custom_swaps = [Swap(custom.TEST_CASES, tables.CUSTOM_MODEL_CASES, True),
                    Swap(custom.ALL_PEFT_CONFIG_CLASSES, tables.CONFIG_CLASSES, True),
                    Swap(custom.MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES, tables.MULTIPLE_ADAPTER_CASES, True),
                    Swap(custom.MIXED_ADAPTER_TEST_CASES, tables.MIXED_BATCH_CASES, True)]
    decoder_swaps = [Swap(decoder.ALL_CONFIGS, tables.DECODER_CASES, True),
                     Swap(decoder.PEFT_DECODER_MODELS_TO_TEST, tables.DECODER_MODELS, False)]
    seq_cls_swaps = [Swap(seq_cls.ALL_CONFIGS, tables.SEQ_CLS_CASES, True),
                     Swap(seq_cls.PEFT_SEQ_CLS_MODELS_TO_TEST, tables.SEQ_CLS_MODELS, False)]
    config_swaps = [Swap(config.ALL_CONFIG_CLASSES, tables.CONFIG_CASES, True),
                    Swap(config.LAYER_INDEXING_CONFIG_CLASSES, tables.CONFIG_CASES, True)]
    return [
        reparametrized(custom.TestPeftCustomModel, custom_swaps),
        reparametrized(custom.TestMultipleActiveAdapters, custom_swaps),
        reparametrized(custom.TestMixedAdapterBatches, custom_swaps),
        reparametrized(decoder.TestDecoderModels, decoder_swaps),
        reparametrized(seq_cls.TestSequenceClassificationModels, seq_cls_swaps),
        reparametrized(config.TestPeftConfig, config_swaps),
    ]


try:
    globals().update({cls.__name__: cls for cls in _classes()})
except Unavailable as err:
    pytest.skip(f"PEFT's test sources are not available: {err}", allow_module_level=True)


@pytest.fixture(autouse=True, scope="module")
def _offline_tiny_models():
    """The Hub models PEFT's tests name, built offline (models.py), and no Hub access at all: a test that still
    reached for the Hub fails at once instead of waiting on the network."""
    import huggingface_hub.constants

    models.build_all()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, when huggingface_hub loads
        yield
