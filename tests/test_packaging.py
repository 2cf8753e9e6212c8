"""The configs and bundled assets ship inside the package: a non-editable install works elsewhere."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_non_editable_install_finds_configs_and_assets(tmp_path):
    wheels, site, elsewhere, src = (tmp_path / n for n in ("wheels", "site", "elsewhere", "src"))
    elsewhere.mkdir()
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info", "__pycache__", ".whl", "results"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)], check=True,
                   capture_output=True, timeout=300)
    wheel = next(wheels.glob("dlr-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = (
        "import dlr, json; from importlib import resources; "
        "from dlr.config import from_overrides; "
        "c = from_overrides('train', ['model=llama_130m', 'data=c4_sample']); "
        "print(json.dumps({'file': dlr.__file__, 'sizes': dlr.size_names(), 'hidden': c.model.hidden_size, "
        "'sample': resources.files('dlr.assets').joinpath('c4_sample').is_dir(), "
        "'task': sorted(p.name for p in resources.files('dlr.assets').joinpath('tasks', 'c4_cloze').iterdir())}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["file"].startswith(str(site))  # the installed copy, not the source tree
    assert "llama_7b" in info["sizes"] and info["hidden"] == 768 and info["sample"]
    assert {"c4_cloze.jsonl", "c4_cloze.yaml", "utils.py"} <= set(info["task"])  # the offline lm-eval task
    plan = subprocess.run([sys.executable, "-m", "dlr.cli.train", "model=llama_60m", "data=c4_sample", "dry_run=true"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert json.loads(plan.stdout[plan.stdout.index("{"):])["deploy_params"] == 42_770_944
    assert list(elsewhere.iterdir()) == []  # Hydra wrote nothing into the working directory
