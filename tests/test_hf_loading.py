"""Saved directories load with plain transformers (remote code, dlr never imported) and
give dlr's logits; identity checkpoints export to a dense LlamaForCausalLM. Every kind of
directory (final/, folded/, dense export) also works with AutoTokenizer and
pipeline("text-generation"), with the tokenizer giving the ids dlr trained on."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dlr
from dlr.artifacts.model_dir import load_model_dir, save_model_dir
from dlr.data import load_tokenizer
from dlr.errors import ConfigError
from dlr.artifacts.export import export_dense, save_dense_dir

X = torch.randint(2, 32000, (2, 20), generator=torch.Generator().manual_seed(2))


def tiny(**kw) -> dlr.DlrLlamaForCausalLM:
    torch.manual_seed(0)
    model = dlr.build_model("llama_tiny", method="dlr", **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


PROMPT = "The weather in Missoula today is"


def run_plain_transformers(dirs: list, out, trust_remote_code: bool) -> None:
    """Load each dir with AutoModelForCausalLM, AutoTokenizer and pipeline("text-generation")
    in a fresh interpreter that never imports dlr."""
    save_file({"x": X}, str(out / "x.safetensors"))
    code = textwrap.dedent(f"""
        import sys, torch
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        x = load_file({str(out / 'x.safetensors')!r})["x"]
        res = {{}}
        for i, d in enumerate({[str(d) for d in dirs]!r}):
            m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code={trust_remote_code}).eval()
            with torch.no_grad():
                res[f"logits{{i}}"] = m(x).logits.contiguous()
            g = m.generate(x[:, :5], max_new_tokens=4, do_sample=False)
            assert g.shape == (2, 9), g.shape
            res[f"cls{{i}}"] = torch.tensor([ord(c) for c in type(m).__name__])
            tok = AutoTokenizer.from_pretrained(d, trust_remote_code={trust_remote_code})
            res[f"ids{{i}}"] = torch.tensor(tok({PROMPT!r})["input_ids"])
            res[f"vocab{{i}}"] = torch.tensor([len(tok), tok.eos_token_id, tok.pad_token_id])
            gen = pipeline("text-generation", model=d, trust_remote_code={trust_remote_code}, device="cpu")
            # Only word-initial pieces ("\u2581the"), so that every new token must bring its space.
            words = [i for t, i in tok.get_vocab().items() if not t.startswith("\u2581")]
            text = gen({PROMPT!r}, max_new_tokens=6, do_sample=False, suppress_tokens=words)[0]["generated_text"]
            # The pipeline's text is generate() plus decode: transformers 5 decodes the new tokens
            # alone, and the saved decoder keeps the first one's space ("is the", not "isthe").
            ids = tok({PROMPT!r}, return_tensors="pt")["input_ids"]
            full = m.generate(ids, max_new_tokens=6, do_sample=False, suppress_tokens=words)[0]
            assert text.startswith({PROMPT!r} + " ") and len(text.split()) == len({PROMPT!r}.split()) + 6, text
            assert " " + text == tok.decode(full, skip_special_tokens=True), text  # SentencePiece's leading space
        assert not any(k == "dlr" or k.startswith("dlr.") for k in sys.modules), "dlr was imported"
        save_file(res, {str(out / 'res.safetensors')!r})
    """)
    # cwd=out: the dlr source tree must not be importable by accident.
    proc = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_unfolded_and_folded_dirs_load_with_trust_remote_code(tmp_path):
    tok = load_tokenizer("t5")
    model = tiny(expand="random_reuse", seed=5)
    final = save_model_dir(model, tok, tmp_path / "final")
    loaded, _ = load_model_dir(final)
    dlr.fold_model(loaded)
    folded = save_model_dir(loaded, tok, tmp_path / "folded")
    run_plain_transformers([final, folded], tmp_path, trust_remote_code=True)
    res = load_file(str(tmp_path / "res.safetensors"))
    with torch.no_grad():
        own_final = load_model_dir(final)[0](X).logits
        own_folded = load_model_dir(folded)[0](X).logits
    assert torch.equal(res["logits0"], own_final)
    assert torch.equal(res["logits1"], own_folded)
    assert (own_final - own_folded).abs().max() <= 1e-5 * own_final.abs().max()
    check_tokenizer(res, 2)


def check_tokenizer(res: dict, n: int) -> None:
    """AutoTokenizer gives SentencePiece's ids (no EOS appended) and the model's vocab/specials."""
    want = load_tokenizer("t5").encode_batch([PROMPT])[0]
    for i in range(n):
        assert res[f"ids{i}"].tolist() == want
        assert res[f"vocab{i}"].tolist() == [32000, 1, 0]


def test_identity_exports_to_a_plain_dense_llama(tmp_path):
    model = tiny(activation="identity", expand="random_reuse")  # unfolded: export uses B + sR
    dense = export_dense(model)
    assert type(dense).__name__ == "LlamaForCausalLM" and dense.config.model_type == "llama"
    assert not any(k.startswith("dlr_") for k in dense.config.to_dict())
    d = save_dense_dir(dense, load_tokenizer("t5"), tmp_path / "dense")
    assert not (d / "modeling_dlr.py").exists()
    run_plain_transformers([d], tmp_path, trust_remote_code=False)
    res = load_file(str(tmp_path / "res.safetensors"))
    assert "".join(map(chr, res["cls0"].tolist())) == "LlamaForCausalLM"
    with torch.no_grad():
        ref = model(X).logits
    assert (res["logits0"] - ref).abs().max() <= 1e-4 * ref.abs().max()
    check_tokenizer(res, 1)


def test_silu_dense_export_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="activation=identity.*'silu'.*not a linear map"):
        export_dense(tiny())


SHIPPED = ["configuration_dlr.py", "lowrank.py", "modeling_dlr.py"]


def test_the_shipped_code_is_small_and_imports_only_torch_transformers_and_the_stdlib(tmp_path):
    import ast

    d = save_model_dir(tiny(), load_tokenizer("t5"), tmp_path / "d")
    files = sorted(d.glob("*.py"))
    assert [f.name for f in files] == SHIPPED
    assert sum(len(f.read_text().splitlines()) for f in files) <= 300
    for f in [*files, Path(dlr.hf.__file__)]:  # dlr.hf: nothing from the rest of dlr either
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module}.py" in SHIPPED, (f.name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    top = name.split(".")[0]
                    assert top in ("torch", "transformers", "__future__") or top in sys.stdlib_module_names, (f.name, name)


def test_with_dlr_imported_a_dir_loads_without_remote_code_and_auto_model_is_the_factorized_base(tmp_path):
    from transformers import AutoModel, AutoModelForCausalLM

    model = tiny(expand="random_reuse", seed=5)
    d = save_model_dir(model, load_tokenizer("t5"), tmp_path / "final")
    auto_map = json.loads((d / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_dlr.DlrLlamaConfig", "AutoModel": "modeling_dlr.DlrLlamaModel",
                        "AutoModelForCausalLM": "modeling_dlr.DlrLlamaForCausalLM"}
    hf = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=False).eval()
    assert type(hf) is dlr.DlrLlamaForCausalLM  # the installed class, not the directory's code
    base = AutoModel.from_pretrained(d, trust_remote_code=False).eval()
    assert type(base).__name__ == "DlrLlamaModel"
    assert isinstance(base.layers[0].mlp.down_proj, dlr.LowRankLinear) and base.layers[0].mlp.down_proj.has_residual
    with torch.no_grad():
        own = load_model_dir(d)[0](X).logits
        assert torch.equal(hf(X).logits, own)
        assert torch.equal(base(X).last_hidden_state, hf.model(X).last_hidden_state)


def test_auto_tokenizer_loads_with_no_prompt_and_no_warning(tmp_path):
    d = save_model_dir(tiny(), load_tokenizer("t5"), tmp_path / "d")
    code = textwrap.dedent(f"""
        import dlr.hf  # the registration with transformers' Auto classes
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained({str(d)!r})
        print(tok({PROMPT!r})["input_ids"])
    """)
    # stdin closed: a remote-code prompt would fail; any warning would reach stderr.
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL, env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert json.loads(proc.stdout) == load_tokenizer("t5").encode_batch([PROMPT])[0]
