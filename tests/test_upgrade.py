"""A format_version 2 model directory (factors as bare tensors) is refused in one line naming the
conversion, and `dlr-fold upgrade=true` converts it: same bytes under the new names, same logits."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import dlr
from dlr.cli.fold import main as fold_cli
from dlr.errors import ConfigError
from dlr.artifacts.model_dir import load_model_dir, read_meta, save_model_dir, sha256_file

X = torch.randint(0, 32000, (2, 24), generator=torch.Generator().manual_seed(1))
V2_NAMES = {".A.weight": ".A", ".B.weight": ".B", ".B.bias": ".bias"}


def as_version_2(d):
    """Rewrite a current directory in place as format_version 2 wrote it: `<proj>.A`, `.B`, `.bias`."""
    f = d / "model.safetensors"
    tensors = load_file(str(f))
    v2 = {}
    for name, t in tensors.items():
        suffix = next((s for s in V2_NAMES if name.endswith(s)), None)
        v2[name.removesuffix(suffix) + V2_NAMES[suffix] if suffix else name] = t
    save_file(v2, str(f), metadata={"format": "pt"})
    meta = read_meta(d)
    meta.update(format_version=2, sha256={f.name: sha256_file(f)}, weight_files={f.name: f.stat().st_size})
    (d / "dlr_checkpoint.json").write_text(json.dumps(meta))
    return v2


def call(args, capsys):
    with pytest.raises(SystemExit) as e:
        fold_cli([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.fixture(scope="module")
def v2(tmp_path_factory, tok):
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", method="dlr", expand="random_reuse", seed=3, bias=True).eval()
    d = save_model_dir(model, tok, tmp_path_factory.mktemp("v2") / "final", extra={"step": 7})
    with torch.no_grad():
        logits = model(X).logits
    return d, as_version_2(d), logits


def test_a_version_2_directory_is_refused_in_one_line_naming_the_conversion(v2, tmp_path, capsys):
    d = v2[0]
    with pytest.raises(ConfigError) as e:
        load_model_dir(d)
    msg = str(e.value)
    assert "format_version=2" in msg and f"dlr-fold ckpt={d} upgrade=true out=" in msg and "\n" not in msg
    code, _, err = call([f"ckpt={d}", f"out={tmp_path / 'f'}"], capsys)  # folding it is refused the same way
    assert code == 2 and "upgrade=true" in err and not (tmp_path / "f").exists()


def test_upgrade_renames_the_tensors_keeps_their_bytes_and_the_logits(v2, tmp_path, capsys):
    d, old, logits = v2
    before = sorted(os.listdir(d)), sha256_file(d / "model.safetensors")
    code, out, _ = call([f"ckpt={d}", "upgrade=true", f"out={tmp_path / 'new'}"], capsys)
    assert code == 0 and "wrote" in out
    assert (sorted(os.listdir(d)), sha256_file(d / "model.safetensors")) == before  # the input is untouched
    new = load_file(str(tmp_path / "new" / "model.safetensors"))
    renamed = {k.replace(".A", ".A.weight").replace(".B", ".B.weight").replace("_proj.bias", "_proj.B.bias"): t
               for k, t in old.items()}
    assert sorted(new) == sorted(renamed) and any(k.endswith(".B.bias") for k in new)
    for k, t in renamed.items():
        assert torch.equal(new[k], t) and new[k].dtype == t.dtype, k
    meta = read_meta(tmp_path / "new")
    assert meta["format_version"] == 3 and meta["extra"]["step"] == 7 and meta["extra"]["upgraded_from"] == d.name
    model, _ = load_model_dir(tmp_path / "new")
    with torch.no_grad():
        assert torch.equal(model(X).logits, logits)
    # A current directory is not converted again.
    code, _, err = call([f"ckpt={tmp_path / 'new'}", "upgrade=true", f"out={tmp_path / 'again'}"], capsys)
    assert code == 2 and "converts format_version=2 only" in err and not (tmp_path / "again").exists()
