"""``import lamda_peft`` and the ``lamda-peft`` command's first steps import no torch, transformers or peft (issue 27,
items 4 and 9), and the LAMDA / LORAFA registration with PEFT still follows ``import lamda_peft`` whichever is
imported first. Each case runs in a fresh interpreter: what ``sys.modules`` holds afterwards is the proof (nothing is
timed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = ("torch", "transformers", "peft")
REPORT_HEAVY = "import json, sys; print(json.dumps(sorted(m for m in sys.modules if m in %r)))" % (HEAVY,)


def python(code: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter; its last stdout line is what it reports."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def last_json(proc: subprocess.CompletedProcess):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- the package


def test_import_lamda_peft_imports_no_torch_transformers_or_peft():
    assert last_json(python(f"import lamda_peft\n{REPORT_HEAVY}")) == []


REGISTERED = """
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from lamda_peft.tuners.lamda import LamdaConfig, LamdaModel
from lamda_peft.tuners.lora_fa import LoraFAConfig, LoraFAModel
print(json.dumps([PEFT_TYPE_TO_CONFIG_MAPPING.get("LAMDA") is LamdaConfig,
                  PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType["LAMDA"]) is LamdaModel,
                  PEFT_TYPE_TO_CONFIG_MAPPING.get("LORAFA") is LoraFAConfig,
                  PEFT_TYPE_TO_TUNER_MAPPING.get(PeftType["LORAFA"]) is LoraFAModel]))
"""


@pytest.mark.parametrize("first", [
    "import lamda_peft\nimport peft",  # the import hook registers them when peft is imported
    "import peft\nimport lamda_peft",  # peft is there: registered at once
    "import lamda_peft\nfrom lamda_peft import LamdaConfig",  # the public name's import registers both
    "import lamda_peft.cli.spectrum",  # peft imported by a lamda_peft module: registered once that import finished
    "import lamda_peft.memory",
])
def test_lamda_and_lorafa_are_registered_whichever_is_imported_first(first):
    code = f"import json\n{first}\n"
    # what is checked reads peft's mappings before importing our tuners (which would register them anyway)
    checks = ("import peft.mapping, peft.utils\n"
              "print(json.dumps(['LAMDA' in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, "
              "'LORAFA' in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, 'LAMDA' in peft.utils.PeftType.__members__]))\n")
    assert last_json(python(code + checks)) == [True, True, True]
    assert last_json(python(code + REGISTERED)) == [True, True, True, True]


def test_peft_keeps_its_own_loader_and_the_hook_goes_away():
    code = """
    import json, sys, importlib.machinery
    import lamda_peft
    import peft
    from lamda_peft._peft_hook import PeftImportHook
    print(json.dumps([isinstance(peft.__loader__, importlib.machinery.SourceFileLoader),
                      peft.__spec__.loader is peft.__loader__,
                      any(isinstance(f, PeftImportHook) for f in sys.meta_path)]))
    """
    assert last_json(python(code)) == [True, True, False]


def test_an_old_path_still_warns_at_its_importer_before_peft_is_imported(tmp_path):
    """The import hook's loader wraps lamda_peft's modules until peft is there; the deprecated old paths (issue 26)
    keep their own, so their DeprecationWarning still names the importing file."""
    script = tmp_path / "importer.py"
    script.write_text("import json, sys, warnings\n"
                      "with warnings.catch_warnings(record=True) as caught:\n"
                      "    warnings.simplefilter('always')\n"
                      "    import lamda_peft.models\n"
                      "print(json.dumps([w.filename for w in caught if issubclass(w.category, DeprecationWarning)]))\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert last_json(proc) == [str(script)]


def test_peft_config_from_pretrained_after_import_lamda_peft_alone(tmp_path):
    """A LaMDA adapter folder, read by PEFT's generic entry points in a process that only did ``import lamda_peft``."""
    write = f"""
    import torch
    from peft import get_peft_model
    from transformers import BertConfig, BertModel
    from lamda_peft import LamdaConfig
    torch.manual_seed(0)
    base = BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16))
    get_peft_model(base, LamdaConfig(r=2, lora_alpha=4, target_modules=["query", "value"])).save_pretrained(
        {str(tmp_path)!r})
    """
    assert python(write).returncode == 0
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LAMDA"
    read = f"""
    import json
    import lamda_peft
    from peft import PeftConfig
    config = PeftConfig.from_pretrained({str(tmp_path)!r})
    print(json.dumps([type(config).__module__ + "." + type(config).__name__, config.r]))
    """
    assert last_json(python(read)) == ["lamda_peft.tuners.lamda.config.LamdaConfig", 2]


def test_public_names_resolve_lazily_and_unknown_ones_are_attribute_errors():
    code = """
    import json
    import lamda_peft
    from lamda_peft import LamdaConfig, export_lora, initialize, lamda_param_groups
    import lamda_peft.tuners.lamda as tuner
    try:
        lamda_peft.no_such_name
        error = ""
    except AttributeError as err:
        error = str(err)
    names = sorted(lamda_peft.__all__)
    print(json.dumps([LamdaConfig is tuner.LamdaConfig, callable(export_lora), callable(initialize),
                      all(hasattr(lamda_peft, n) for n in names), set(names) <= set(dir(lamda_peft)),
                      lamda_peft.__version__, error, lamda_peft.optim.LAMDA_LR_S_MULTIPLIER]))
    """
    assert last_json(python(code)) == [True, True, True, True, True, "0.1.0",
                                       "module 'lamda_peft' has no attribute 'no_such_name'", 5.0]


# ---------------------------------------------------------------------------------------------------- the command

MAIN = """
import json, sys
from lamda_peft.cli import main
try:
    code = main({argv!r})
except SystemExit as exit:
    code = exit.code
print(json.dumps([code, sorted(m for m in sys.modules if m in {heavy!r})]), file=sys.stderr)
"""


def run_main(argv: list[str], cwd: Path) -> tuple[int, list[str], str, str]:
    """(exit code, heavy modules imported, stdout, stderr without the report line)."""
    proc = python(MAIN.format(argv=argv, heavy=HEAVY), cwd=cwd)
    *err, report = proc.stderr.strip().splitlines()
    code, heavy = json.loads(report)
    return code, heavy, proc.stdout, "\n".join(err)


@pytest.mark.parametrize("argv, shown", [
    (["--help"], "fine-tuning tools"),
    (["train", "--help"], "--lr-scheduler"),
    (["eval", "--help"], "--predictions"),
    (["spectrum", "--help"], "--rank"),
    (["report", "--help"], "MODEL_OR_CONFIG"),
    (["export", "--help"], "--for-vllm"),
    (["merge", "--help"], "--output-dir"),
])
def test_help_imports_nothing_heavy(argv, shown, tmp_path):
    code, heavy, out, _ = run_main(argv, tmp_path)
    assert (code, heavy) == (0, []) and shown in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "x", "--train-file", "y", "--lr", "0"],
     "lamda-peft: error: --lr must be a positive finite number, got 0; pass e.g. --lr 1e-3, or leave --lr out for the "
     "default (1e-3 for adapters, 5e-5 for full)"),
    (["train", "--method", "nope"], "lamda-peft: error: unknown --method 'nope'; choose one of lamda, lamda++, "
                                    "lora-fa, lora, full"),
    (["train", "--method", "lora", "--lr-S", "1e-3"],
     "lamda-peft: error: --lr-S apply to --method lamda, lamda++ and lora-fa only (got --method lora)"),
    (["train", "--epochs", "1", "--max-steps", "5"], "lamda-peft: error: give --epochs or --max-steps, not both"),
    (["eval", "--adapter", "a", "--batch-size", "0"], "lamda-peft: error: --batch-size must be a positive integer"),
    (["eval", "--adapter", "a", "--predictions", "p.txt"], "lamda-peft: error: --predictions p.txt: the extension "
                                                           "says the format"),
    (["spectrum", "m", "--rank", "0"], "lamda-peft: error: --rank must be a positive integer, got 0"),
    (["report", "llama-2-7b", "--freeze-ratio", "2"], "lamda-peft: error: --freeze-ratio must be in [0, 1], got 2.0"),
    (["export", "no-such-adapter", "--output-dir", "out"], "lamda-peft: error: no-such-adapter: no adapter_config.json"),
    (["train", "--bogus"], "lamda-peft: error: unrecognized arguments: --bogus"),  # argparse's own
    (["train", "--lr", "abc"], "lamda-peft train: error: argument --lr: invalid float value: 'abc'"),
])
def test_option_errors_are_one_line_before_anything_heavy(argv, message, tmp_path):
    code, heavy, _, err = run_main(argv, tmp_path)
    assert (code, heavy) == (2, []), err
    assert message in err and "Traceback" not in err and not (tmp_path / "out").exists()
