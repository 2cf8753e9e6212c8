"""The model directory: round trip, atomic writes, and one-line errors for every bad input."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dlr.artifacts.model_dir import TOKENIZER_MARKERS
import torch

import dlr
from dlr.artifacts.model_dir import load_model_dir, read_config, read_meta, save_model_dir
from dlr.errors import ConfigError


def tiny(method="dlr", **kw) -> dlr.DlrLlamaForCausalLM:
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", method=method, **kw)
    with torch.no_grad():  # random B, so that B + sR differs visibly from B
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    model = tiny(expand="random_reuse", seed=3)
    d = save_model_dir(model, tok, tmp_path_factory.mktemp("ck") / "final", extra={"step": 7})
    return d, model


X = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(1))


def test_round_trip_is_exact_and_self_describing(ckpt):
    d, model = ckpt
    names = set(os.listdir(d))
    assert {"config.json", "model.safetensors", "spiece.model", "dlr_checkpoint.json",
            "configuration_dlr.py", "lowrank.py", "modeling_dlr.py"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)  # no pickle anywhere
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "dlr_llama" and cfg["auto_map"]["AutoModelForCausalLM"]
    for k, v in dict(dlr_size="llama_tiny", dlr_method="dlr", dlr_rank=16, dlr_activation="silu", dlr_alpha=1.0,
                     dlr_expand="random_reuse", dlr_seed=3, dlr_scope="all", dlr_folded=False).items():
        assert cfg[k] == v
    assert read_meta(d)["extra"] == {"step": 7}
    loaded, tok = load_model_dir(d)
    assert tok.vocab_size == 32000 and not loaded.training
    # The random_reuse index travels in the safetensors with the weights.
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert any(k.endswith("dlr_index") for k in lsd)
    for k in sd:
        assert torch.equal(sd[k], lsd[k]), k
    with torch.no_grad():
        assert torch.equal(model(X).logits, loaded(X).logits)


def test_load_in_bf16_keeps_the_index_integer(ckpt):
    loaded, _ = load_model_dir(ckpt[0], dtype=torch.bfloat16)
    up = loaded.model.layers[0].mlp.up_proj
    assert up.A.weight.dtype == torch.bfloat16 and up.dlr_index.dtype == torch.long


def test_folded_dir_has_the_lowrank_layout(tmp_path, ckpt, tok):
    model, _ = load_model_dir(ckpt[0])
    assert dlr.fold_model(model) == 14
    d = save_model_dir(model, tok, tmp_path / "folded")
    assert read_config(d).dlr_folded is True
    loaded, _ = load_model_dir(d)
    assert not any(k.endswith("dlr_index") for k in loaded.state_dict())
    with torch.no_grad():
        ref = ckpt[1](X).logits
        assert (loaded(X).logits - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_sharded_save_loads(tmp_path, tok, monkeypatch):
    import dlr.artifacts.model_dir as ck

    monkeypatch.setattr(ck, "MAX_SHARD_SIZE", "2MB")
    model = tiny("lowrank")
    d = save_model_dir(model, tok, tmp_path / "m")
    assert (d / "model.safetensors.index.json").is_file()
    loaded, _ = load_model_dir(d)
    with torch.no_grad():
        assert torch.equal(model(X).logits, loaded(X).logits)


def test_save_is_atomic_and_replaces(tmp_path, tok):
    out = tmp_path / "m"
    save_model_dir(tiny("lowrank"), tok, out)
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="tokenizer"):
        save_model_dir(tiny("full"), None, out)
    assert (out / "model.safetensors").read_bytes() == before  # the old dir is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left behind
    save_model_dir(tiny("full"), tok, out)
    assert read_config(out).dlr_method == "full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _truncate(d: Path, keep_meta: bool) -> None:
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    if not keep_meta:  # then only safetensors' own header check can notice
        (d / "dlr_checkpoint.json").unlink()


def _edit_meta(d: Path, **changes) -> None:
    meta = json.loads((d / "dlr_checkpoint.json").read_text())
    meta.update(changes)
    (d / "dlr_checkpoint.json").write_text(json.dumps(meta))


def _append(f: Path, text: str) -> None:
    f.write_text(f.read_text() + text)


def _nan(d: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(str(d / "model.safetensors"))
    sd["model.norm.weight"][0] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "dlr_checkpoint.json").unlink()


BAD = {
    "missing": (lambda d: shutil.rmtree(d), "does not exist"),
    "a file": (lambda d: (shutil.rmtree(d), d.write_text("x")), "not a directory"),
    "no config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "bad json": (lambda d: (d / "config.json").write_text("{oops"), "not valid JSON"),
    "not dlr": (lambda d: _edit_config(d, model_type="llama"), "model_type='llama'"),
    "bad method": (lambda d: _edit_config(d, dlr_method="sparse"), "dlr_method='sparse'"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), "no weights"),
    "pickled": (lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(b"x")), "pickled"),
    "truncated": (lambda d: _truncate(d, True), "truncated"),
    "truncated, no size record": (lambda d: _truncate(d, False), "truncated or corrupted"),
    "garbage header": (lambda d: ((d / "model.safetensors").write_bytes(b"\xff" * 64),
                                  (d / "dlr_checkpoint.json").unlink()), "truncated or corrupted"),
    "rank mismatch": (lambda d: _edit_config(d, dlr_rank=8), "shape"),
    "method mismatch": (lambda d: _edit_config(d, dlr_method="full", dlr_rank=None), "does not have"),
    "folded flag lies": (lambda d: _edit_config(d, dlr_folded=True), "does not have"),
    "nan weights": (_nan, "NaN"),
    "no metadata": (lambda d: (d / "dlr_checkpoint.json").unlink(), "has no dlr_checkpoint.json"),
    "older format": (lambda d: _edit_meta(d, format_version=1), "format_version=1; this dlr reads format_version=3"),
    "bad metadata": (lambda d: (d / "dlr_checkpoint.json").write_text("[1]"), "not a JSON object"),
    "code changed": (lambda d: _append(d / "lowrank.py", "\nprint('hello')\n"), "lowrank.py' does not match its sha256"),
    "code added": (lambda d: (d / "extra_code.py").write_text("import os\n"), "extra_code.py' is not listed"),
    "code removed": (lambda d: (d / "modeling_dlr.py").unlink(), "modeling_dlr.py' is missing"),
    # Every tokenizer file (spiece.model and its AutoTokenizer twin, tokenizer.json + tokenizer_config.json).
    "no tokenizer": (lambda d: [p.unlink() for p in d.iterdir() if p.name in TOKENIZER_MARKERS], "no tokenizer"),
}


RECORD_CASES = ("no metadata", "older format", "bad metadata", "code changed", "code added", "code removed")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_give_one_line_errors(tmp_path, ckpt, case):
    d = _copy(ckpt[0], tmp_path / "ck")
    damage, needle = BAD[case]
    damage(d)
    # The record's own cases with verify; every other case changes a recorded file, which verify
    # would refuse first (tests/test_model_dir_record.py), so its own check runs without verify.
    verify = case in RECORD_CASES
    with pytest.raises(ConfigError) as e:
        load_model_dir(d, verify=verify)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg
    assert str(d) in msg  # names the path


def test_the_record_covers_every_file_a_loader_reads_and_verify_false_skips_the_hashes(tmp_path, ckpt):
    d = _copy(ckpt[0], tmp_path / "ck")
    meta = read_meta(d)
    assert meta["format_version"] == 3
    files = sorted(p.name for p in d.iterdir() if p.name not in ("README.md", "dlr_checkpoint.json"))
    assert sorted(meta["files"]) == files and {"config.json", "generation_config.json", "tokenizer.json",
                                               "lowrank.py", "model.safetensors"} <= set(files)
    assert all(len(e["sha256"]) == 64 and e["bytes"] == (d / n).stat().st_size for n, e in meta["files"].items())
    _append(d / "lowrank.py", "\n# edited\n")
    (d / "dlr_checkpoint.json").unlink()
    model, _ = load_model_dir(d, verify=False)  # a trusted copy: loads unchecked
    with torch.no_grad():
        assert torch.equal(model(X).logits, ckpt[1](X).logits)


def test_a_loaded_model_ignores_the_shipped_code_and_cli_refuses_changed_code(tmp_path, ckpt, capsys):
    from dlr.cli.evaluate import main as eval_main

    d = _copy(ckpt[0], tmp_path / "ck")
    _append(d / "modeling_dlr.py", "\nraise SystemExit('ran')\n")
    with pytest.raises(SystemExit) as e:
        eval_main([f"ckpt={d}", "data=c4_sample", "eval_tokens=512", "progress=false"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "modeling_dlr.py' does not match its sha256" in err


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unprivileged user+mount namespaces (unshare -rm) for a tiny tmpfs")
def test_dlr_fold_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, ckpt):
    """A real full disk: a 1 MiB tmpfs, in a private mount namespace, as dlr-fold's out=."""
    disk = tmp_path / "disk"
    disk.mkdir()
    fold = f"{sys.executable} -m dlr.cli.fold ckpt={ckpt[0]} out={disk / 'folded'}"
    script = f"mount -t tmpfs -o size=1m none {disk} && {fold}; code=$?; echo left: $(ls -A {disk}); exit $code"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          env=env, cwd=tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert err.startswith("dlr-fold: error: ") and "No space left on device" in err and "\n" not in err, err
    assert proc.stdout.strip().endswith("left:"), proc.stdout  # no half-written directory, no temporary
