"""Install the example plugin package like a user would and use it through the entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "plugins" / "lowrank-rms-scaling"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(PLUGIN)], check=True)
    return target


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env.pop("LOWRANK_LOAD_PLUGINS", None)
    return env


def test_listed_with_its_distribution(plugin_site):
    out = subprocess.run([sys.executable, "-m", "lowrank.cli", "plugins", "--json"], capture_output=True,
                         text=True, env=_env(plugin_site), check=True).stdout
    entries = {(e["kind"], e["name"]): e for e in json.loads(out)}
    assert entries[("scaling", "rms")]["distribution"] == "lowrank-rms-scaling"
    assert entries[("scaling", "whitening")]["distribution"] == "lowrank"


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
    assert float(ratio) >= 0.3 and module == "lowrank_rms"


def test_load_plugins_env_blocks_it(plugin_site):
    env = _env(plugin_site)
    env["LOWRANK_LOAD_PLUGINS"] = ""
    out = subprocess.run([sys.executable, "-m", "lowrank.cli", "plugins", "--json"], capture_output=True,
                         text=True, env=env, check=True).stdout
    assert "rms" not in {e["name"] for e in json.loads(out)}
