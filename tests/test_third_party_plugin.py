"""Install the example plugin package like a user would and use it through the entry point.

The package (``plugins/lowrank-rms-scaling``, module ``lowrank_rms``) ships the scaling ``rms`` and
the global allocator ``activation-energy``; both must be found by their entry point, run end to end
(a recipe, the CLI) and be written against the public API alone.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from properties.strategies import RATIOS, matrix_spectra
from tiny_models import build

import lowrank
from lowrank import Budget, MatrixSpectrum, breakeven_rank, stored_params

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "lowrank-rms-scaling"
SOURCE = PLUGIN / "lowrank_rms"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    # Build from a copy: setuptools writes build/ and *.egg-info into the tree it builds, and an
    # egg-info left in the source tree would register the plugin in any process that has that
    # folder on its path.
    source = tmp_path_factory.mktemp("src") / PLUGIN.name
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True)
    return target


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env.pop("LOWRANK_LOAD_PLUGINS", None)
    # Tiny matrices: one intra-op thread, immune to OpenMP busy-waiting on a loaded 2-core machine
    # (the SVDs of the tiny model take seconds instead of milliseconds without it).
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_listed_with_its_distribution(plugin_site):
    out = subprocess.run([sys.executable, "-m", "lowrank.cli", "plugins", "--json"], capture_output=True,
                         text=True, env=_env(plugin_site), check=True).stdout
    entries = {(e["kind"], e["name"]): e for e in json.loads(out)}
    assert entries[("scaling", "rms")]["distribution"] == "lowrank-rms-scaling"
    assert entries[("scaling", "whitening")]["distribution"] == "lowrank"
    allocator = entries[("allocator", "activation-energy")]
    assert allocator["distribution"] == "lowrank-rms-scaling"
    assert allocator["class"] == "lowrank_rms.allocator.ActivationEnergy"


def test_recipe_using_it_runs(plugin_site, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch, lowrank\n"
        f"sys.path.insert(0, {str(ROOT / 'tests')!r})\n"
        "from tiny_models import build, calibration\n"
        "model = build('llama')\n"
        "recipe = lowrank.Recipe.from_yaml('scalings: [{rms: {alpha: 1.0}}]\\nallocator: uniform\\nratio: 0.3\\n')\n"
        "report = lowrank.compress(model, recipe, calibration(), progress=False)\n"
        "assert torch.isfinite(model(calibration(2, 8)).logits).all()\n"
        "print(report.ratio_achieved, type(recipe.scalings[0]).__module__)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=_env(plugin_site))
    assert out.returncode == 0, out.stderr
    ratio, module = out.stdout.split()
    assert float(ratio) >= 0.3 and module == "lowrank_rms.scaling"


def test_load_plugins_env_blocks_it(plugin_site):
    env = _env(plugin_site)
    env["LOWRANK_LOAD_PLUGINS"] = ""
    out = subprocess.run([sys.executable, "-m", "lowrank.cli", "plugins", "--json"], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert "rms" not in {e["name"] for e in json.loads(out)}


# -- the activation-energy allocator, end to end through the CLI ------------------------------------


def _byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + EOS) built offline, in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """tests/tiny_models.py's llama with its vocabulary resized to a byte tokenizer, saved with it."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = _byte_tokenizer()
    model = build("llama")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    text = folder.parent / "calibration.txt"
    text.write_text((PLUGIN / "README.md").read_text(encoding="utf-8") * 2, encoding="utf-8")
    return folder, text, len(tokenizer)


def test_activation_energy_compresses_through_the_cli(plugin_site, tiny_model_dir, tmp_path):
    folder, text, vocab = tiny_model_dir
    out = tmp_path / "out"
    ratio = 0.3
    run = subprocess.run(
        [sys.executable, "-m", "lowrank.cli", "compress", str(folder), "--allocator", "activation-energy",
         "--calib", f"file:{text}", "--calib-windows", "4", "--seqlen", "32", "--eval", "none",
         "--ratio", str(ratio), "--device", "cpu", "--out", str(out), "--json"],
        capture_output=True, text=True, env=_env(plugin_site))
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["recipe"]["allocator"] == {"activation-energy": {"normalize": True, "min_rank": 1}}

    report = json.loads((out / "lowrank_report.json").read_text())
    before, after = report["target_params_before"], report["target_params_after"]
    assert after == sum(m["params_after"] for m in report["matrices"])
    assert after <= Budget(ratio, before).allowed_params          # within the budget ...
    assert report["ratio_achieved"] == pytest.approx(result["ratio_achieved"])
    assert ratio <= report["ratio_achieved"] < ratio + 0.01        # ... and it spends it
    for m in report["matrices"]:                                   # exact accounting, rank >= 1 or dense
        rows, cols = m["shape"]
        assert m["params_after"] == stored_params(rows, cols, m["rank"])
        assert m["rank"] is None or 1 <= m["rank"] <= breakeven_rank(rows, cols)
    assert len({m["rank"] for m in report["matrices"]}) > 1         # not one rank for every matrix

    # The checkpoint loads without the plugin: a fresh process that loads the built-ins only
    # (LOWRANK_LOAD_PLUGINS="", whatever this machine happens to have installed). Only its recipe,
    # which names the plugin's allocator, is left off, with a warning that says so.
    script = (
        "import warnings, torch, lowrank\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        f"    model = lowrank.load({str(out)!r})\n"
        f"ids = torch.randint(0, {vocab}, (2, 16), generator=torch.Generator().manual_seed(0))\n"
        "with torch.no_grad():\n"
        "    logits = model(ids).logits\n"
        f"assert logits.shape == (2, 16, {vocab}) and torch.isfinite(logits).all()\n"
        "print(getattr(model, 'lowrank_recipe', None) is None)\n"
        "print(' | '.join(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)))\n"
    )
    env = {**_env(plugin_site), "LOWRANK_LOAD_PLUGINS": ""}
    load = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert load.returncode == 0, load.stderr
    recipe_dropped, warned = load.stdout.splitlines()
    assert recipe_dropped == "True"
    assert "unknown allocator 'activation-energy'" in warned


# -- the allocator as a unit ------------------------------------------------------------------------


def _load_allocator_module():
    """lowrank_rms/allocator.py from the source tree, without putting the package on sys.path
    (which would register its entry point in this process)."""
    spec = importlib.util.spec_from_file_location("_lowrank_rms_allocator_under_test", SOURCE / "allocator.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ALLOCATOR = _load_allocator_module()


def test_allocator_contract():
    cls = ALLOCATOR.ActivationEnergy
    assert issubclass(cls, lowrank.Allocator) and cls.name == "activation-energy" and cls.scope == "global"
    assert cls().config_dict() == {"normalize": True, "min_rank": 1}
    assert cls.Config.__doc__ and cls.__doc__
    with pytest.raises(lowrank.RecipeError, match="min_rank"):
        cls(min_rank=0)


def test_allocator_prefers_concentrated_energy():
    """Normalised: the matrix whose energy sits in few components gives them up last."""
    flat = MatrixSpectrum("flat", (32, 32), torch.ones(32, dtype=torch.float64))
    peaked = MatrixSpectrum("peaked", (32, 32), torch.tensor([10.0, *[0.01] * 31], dtype=torch.float64))
    selections = ALLOCATOR.ActivationEnergy().allocate([flat, peaked], Budget(0.6, 2 * 32 * 32))
    # 819 parameters allowed, 64 per component: the floors (1 + 1) and then 10 more, all flat's
    assert [s.rank for s in selections] == [11, 1]


@given(spectra=matrix_spectra(), ratio=RATIOS, normalize=st.booleans(), min_rank=st.integers(1, 3))
def test_allocator_never_exceeds_the_budget(spectra, ratio, normalize, min_rank):
    """Within ``allowed_params`` (counted as the engine stores it), prefixes of at least min_rank
    components or dense; and the budget is spent: no factored matrix could take its next component
    (of nonzero energy) with what is left."""
    allocator = ALLOCATOR.ActivationEnergy(normalize=normalize, min_rank=min_rank)
    budget = Budget(ratio, sum(s.dense_params for s in spectra))
    floors = [min(min_rank, s.full_rank) for s in spectra]
    floor_params = sum(stored_params(*s.shape, k) for s, k in zip(spectra, floors))
    if floor_params > budget.allowed_params:
        event("even min_rank components do not fit")
        with pytest.raises(lowrank.CompressionError, match="lower the ratio"):
            allocator.allocate(spectra, budget)
        return
    event("allocated")
    selections = allocator.allocate(spectra, budget)
    assert len(selections) == len(spectra)
    spent = sum(sel.params(s.shape) for s, sel in zip(spectra, selections))
    assert spent <= budget.allowed_params
    left = budget.allowed_params - spent
    for s, sel, floor in zip(spectra, selections, floors):
        m, n = s.shape
        if sel.is_dense:
            continue
        assert sel.is_prefix and sel.rescale is None and floor <= sel.rank <= breakeven_rank(m, n)
        energy = ALLOCATOR.component_energies(s, normalize)
        if sel.rank < s.full_rank and energy[sel.rank] > 0:
            assert stored_params(m, n, sel.rank + 1) - stored_params(m, n, sel.rank) > left


# -- the package is a third party: public names only ------------------------------------------------


def test_package_uses_only_the_public_api():
    """No ``lowrank._private`` anywhere in its source; every ``lowrank.X`` / ``from lowrank import X``
    names something in ``lowrank.__all__`` (or the public ``lowrank.data``)."""
    import lowrank.data

    public = set(lowrank.__all__) | {"data"}

    def ours(module: str) -> bool:
        return module == "lowrank" or module.startswith("lowrank.")
    files = sorted(SOURCE.rglob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "scaling.py", "allocator.py"}
    for path in files:
        source = path.read_text(encoding="utf-8")
        assert "lowrank._" not in source, path
        for node in ast.walk(ast.parse(source, str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if ours(alias.name):
                        assert alias.name in ("lowrank", "lowrank.data"), (path, alias.name)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and ours(node.module or ""):
                assert node.module in ("lowrank", "lowrank.data"), (path, node.module)
                names = public if node.module == "lowrank" else set(lowrank.data.__all__)
                assert {a.name for a in node.names} <= names, (path, node.module)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "lowrank":
                assert node.attr in public, (path, node.attr)
