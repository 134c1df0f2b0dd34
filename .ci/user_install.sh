#!/usr/bin/env bash
# What a user installs, not the developers' environment: a wheel built from this checkout, in a fresh venv with
# torch==2.13.0 and the core dependencies only (no extras: no SciPy, no bitsandbytes, no TRL, no DeepSpeed).
# Checks: the package data is in the wheel, `import lamda_peft`, `lamda-peft --help`, the README's API snippet end
# to end (examples/quickstart.py: LaMDA, LaMDA++, LoRA-FA, the activation init, freezing, save/load, export, merge),
# the CLI's spectrum and report, and the one-line error of each optional extra's feature.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=1

pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo"
python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet torch==2.13.0
"$py" -m pip install --quiet "$work"/dist/lamda_peft-*.whl
cd "$work"  # away from the checkout: everything below imports the installed wheel

for absent in scipy threadpoolctl bitsandbytes trl deepspeed tensorboard sklearn; do
    if "$py" -c "import $absent" 2>/dev/null; then echo "the core install pulled in $absent" >&2; exit 1; fi
done
"$py" - <<'EOF'
import importlib.resources, lamda_peft
configs = importlib.resources.files("lamda_peft") / "configs"
names = sorted(p.name for p in configs.iterdir() if p.name.endswith(".json"))
assert names == ["bart-large.json", "deberta-v3-base.json", "llama-2-7b.json"], names
assert lamda_peft.__file__.startswith("$work") or "site-packages" in lamda_peft.__file__, lamda_peft.__file__
print("wheel: package data present,", lamda_peft.__file__)
EOF
"$work/venv/bin/lamda-peft" --help > /dev/null
"$py" "$repo/examples/quickstart.py" --output-dir "$work/quickstart"
"$work/venv/bin/lamda-peft" spectrum "$work/quickstart/base" --rank 4 --output-dir "$work/spectrum" > /dev/null
test -s "$work/spectrum/spectrum.csv"
"$work/venv/bin/lamda-peft" report llama-2-7b --r 8 > /dev/null
"$work/venv/bin/lamda-peft" report "$work/quickstart/base" --r 4 --batch 2 --seq 16 > /dev/null

# Each optional extra's feature, used without the extra: exit 2 (or an ImportError) and one line naming the extra.
expect_extra() {  # expect_extra EXTRA COMMAND...
    local extra="$1"; shift
    set +e; out="$("$@" 2>&1)"; code=$?; set -e
    if [ "$code" = 0 ] || ! grep -q "pip install .*lamda-peft\[$extra\]" <<<"$out"; then
        echo "without [$extra], '$*' did not name the extra (exit $code):" >&2; tail -5 <<<"$out" >&2; exit 1
    fi
}
train=("$work/venv/bin/lamda-peft" train --model "$work/quickstart/base" --max-steps 1)
expect_extra quant "${train[@]}" --load-in-4bit --output-dir "$work/q4"
expect_extra tensorboard "${train[@]}" --report-to tensorboard --output-dir "$work/tb"
expect_extra trl "$py" "$repo/examples/trl_sft.py"
expect_extra deepspeed "$py" "$repo/examples/zero3_trainer.py"
expect_extra quant "$py" "$repo/examples/qlora_4bit.py"
echo "user install: every check passed"
