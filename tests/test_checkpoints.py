"""Real diffusion checkpoint formats: Dream, LLaDA (both block types), LoRA adapters, model objects.

Every format is written to disk as the released checkpoints are, loaded without remote code,
decoded with :func:`cdlm_fast.generate` in float64, and its logits at every step compared with
an independent dense forward of the architecture (tests/diffusion_checkpoints.py).
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import cdlm_fast  # noqa: E402
from cdlm_fast import generate, load_student  # noqa: E402
from cdlm_fast.checkpoints import FAMILY_DEFAULTS, inspect_checkpoint  # noqa: E402
from cdlm_fast.decode import denoise_step, generate_block_causal_nocache  # noqa: E402
from cdlm_fast.student import BlockCausalStudent  # noqa: E402
from diffusion_checkpoints import (EOS_ID, MASK_ID, VOCAB, dense_forward, dream_config, dream_weights,  # noqa: E402
                                   layout, llada_config, llada_weights, merged, prompts, write_checkpoint,
                                   write_lora_adapter)

TOL = 1e-6
F64 = torch.float64

FORMATS = {
    "dream": lambda: ("dream", dream_config(), None),
    "llada-llama": lambda: ("llada", llada_config("llama"), None),
    "llada-llama-gqa-tied-qkvbias": lambda: ("llada", llada_config("llama", n_kv_heads=2, weight_tying=True,
                                                                   include_qkv_bias=True), None),
    "llada-sequential-fused": lambda: ("llada", llada_config("sequential", n_kv_heads=2, include_qkv_bias=True),
                                       None),
}


def make(tmp_path, name, seed=0, **write_kw):
    family, cfg, _ = FORMATS[name]()
    w = (dream_weights if family == "dream" else llada_weights)(cfg, seed)
    folder = write_checkpoint(str(tmp_path / name), cfg, w, dtype=F64, **write_kw)
    return family, cfg, w, folder


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def check_every_step(student, family, cfg, w, ids, mask, n_new, block_size, threshold=0.5, **kw):
    """Decode with generate; at each step the logits must match the dense block-causal forward."""
    rec = []
    out = generate(student, ids, n_new, block_size=block_size, threshold=threshold, attention_mask=mask,
                   stop_at_eos=False, logits_hook=lambda bi, st, x, lg: rec.append((bi, x.clone(), lg.clone())),
                   **kw)
    shift = 1 if student.shifted else 0
    p = ids.shape[1]
    assert rec
    worst = 0.0
    for bi, x, lg in rec:
        s, e = bi * block_size, min((bi + 1) * block_size, n_new)
        seq = torch.cat([ids, x[:, :e]], dim=1)
        vis, pos = layout(mask, seq.shape[1], block_size)
        ref = dense_forward(family, w, cfg, seq, vis, pos)[:, p + s - shift: p + e - shift]
        assert torch.isfinite(lg).all()
        worst = max(worst, rel(lg, ref))
    assert worst < TOL, f"worst relative error {worst:.2e}"
    assert not (out.tokens == student.mask_token_id).any()
    return out


@pytest.mark.parametrize("name", list(FORMATS))
def test_folder_decodes_with_logits_matching_dense_reference(tmp_path, name):
    family, cfg, w, folder = make(tmp_path, name)
    student = load_student(folder, dtype=F64, backend="torch")
    assert student.info.family == family and student.dtype == F64
    assert student.info.mask_token_id == MASK_ID and student.info.sources["mask_token_id"] == "config.json"
    assert student.shifted == (family == "dream")
    assert type(student.hf_model).__name__ == ("Qwen2ForCausalLM" if family == "dream" else "LlamaForCausalLM")
    ids, mask = prompts([6, 3])
    out = check_every_step(student, family, cfg, w, ids, mask, 10, 4)
    assert out.steps_per_block and max(out.steps_per_block) <= 4
    # bidirectional (vanilla) forward of the whole sequence matches the dense one too
    seq = torch.cat([ids, out.tokens], 1)
    vis, pos = layout(mask, seq.shape[1], None)
    got = student.full_forward(seq, mask, block_size=None)
    assert rel(got, dense_forward(family, w, cfg, seq, vis, pos)) < TOL


def test_sharded_checkpoint_and_dtype_device(tmp_path):
    family, cfg, w, folder = make(tmp_path, "llada-sequential-fused", shards=3)
    student = load_student(folder, dtype=F64, backend="torch")
    check_every_step(student, family, cfg, w, *prompts([5]), 4, 4)
    # default dtype: the checkpoint's torch_dtype (bfloat16 here), device as asked
    s16 = load_student(folder, device="cpu")
    assert s16.dtype == torch.bfloat16 and s16.device.type == "cpu"
    s32 = load_student(folder, dtype="float32")
    assert s32.dtype == torch.float32
    assert BlockCausalStudent(folder).info.family == "llada"  # the class takes a folder too
    with pytest.raises(TypeError, match="dtype"):
        load_student(folder, dtype="int8")


# ---------------------------------------------------------------- model objects
def _module_tree(weights):
    """An nn.Module whose state_dict has exactly ``weights``' names (Linear / Embedding leaves)."""
    root = torch.nn.Module()
    modules = {}
    for name in weights:
        mod, _, _ = name.rpartition(".")
        modules.setdefault(mod, {})[name.rpartition(".")[2]] = weights[name]
    for path, params in sorted(modules.items()):
        parent = root
        parts = path.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        wt = params["weight"]
        if wt.dim() == 2 and not path.endswith(("wte", "embed_tokens")):
            leaf = torch.nn.Linear(wt.shape[1], wt.shape[0], bias="bias" in params, dtype=wt.dtype)
        elif wt.dim() == 2:
            leaf = torch.nn.Embedding(wt.shape[0], wt.shape[1], dtype=wt.dtype)
        else:
            leaf = torch.nn.Module()
            leaf.weight = torch.nn.Parameter(torch.empty_like(wt))
        with torch.no_grad():
            for k, v in params.items():
                getattr(leaf, k).copy_(v)
        parent.add_module(parts[-1], leaf)
    return root


def remote_like_model(family, cfg, weights):
    """A stand-in for the object the upstream remote code builds: its config class (model_type
    ``Dream`` / ``llada``) and its parameter names; the package only reads these."""
    model_type = cfg["model_type"]

    class UpstreamConfig(transformers.PretrainedConfig):
        pass

    UpstreamConfig.model_type = model_type
    model = _module_tree(weights)
    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")}
    model.config = UpstreamConfig(**fields)
    return model.eval()


@pytest.mark.parametrize("name", ["dream", "llada-llama", "llada-sequential-fused"])
def test_model_objects_decode_directly(tmp_path, name):
    family, cfg, w, folder = make(tmp_path, name)
    obj = remote_like_model(family, cfg, w)
    ids, mask = prompts([5, 4], seed=3)
    kw = dict(block_size=4, threshold=0.5, attention_mask=mask, stop_at_eos=False, backend="torch")
    from_obj = generate(obj, ids, 8, **kw)
    from_folder = generate(load_student(folder, dtype=F64), ids, 8, **kw)
    assert torch.equal(from_obj.tokens, from_folder.tokens)
    student = BlockCausalStudent(obj, backend="torch")
    assert student.info.family == family and student.mask_token_id == MASK_ID
    # the weights are shared with the object, not copied (row views for fused projections)
    src = obj.get_submodule({"dream": "model.layers.0.self_attn.q_proj", "llama": "model.transformer.blocks.0.q_proj",
                             "sequential": "model.transformer.blocks.0.att_proj"}[cfg.get("block_type", family)]).weight
    assert student.layers[0].self_attn.q_proj.weight.data_ptr() == src.data_ptr()
    check_every_step(student, family, cfg, w, ids, mask, 8, 4)


# ---------------------------------------------------------------- LoRA / PEFT
peft = pytest.importorskip("peft")


def _lora_factors(g, out_dim, in_dim, r):
    return torch.randn(r, in_dim, generator=g, dtype=F64) * 0.3, torch.randn(out_dim, r, generator=g, dtype=F64) * 0.3


@pytest.mark.parametrize("name", ["llada-sequential-fused", "llada-llama", "dream"])
@pytest.mark.parametrize("merge", [False, True])
def test_adapter_folder_over_base_folder(tmp_path, name, merge):
    family, cfg, w, base = make(tmp_path, name)
    g = torch.Generator().manual_seed(7)
    r, alpha = 4, 8
    if family == "llada":
        mods = ["att_proj", "attn_out", "ff_proj", "ff_out"] if cfg["block_type"] == "sequential" else \
            ["q_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]
        prefix = "model.transformer.blocks."
    else:
        mods = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
        prefix = "model.layers."
    lora = {}
    for i in range(2):
        for m in mods:
            wt = w[f"{prefix}{i}.{m}.weight"]
            lora[f"{prefix}{i}.{m}"] = _lora_factors(g, wt.shape[0], wt.shape[1], r)
    targets = sorted({m.rpartition(".")[2] for m in mods})
    # the base named by path relative to the adapter (as PEFT writes it when saved side by side)
    adapter = write_lora_adapter(str(tmp_path / "adapter"), "../" + os.path.basename(base), lora, r=r, alpha=alpha,
                                 target_modules=targets)
    student = load_student(adapter, dtype=F64, backend="torch", merge_adapter=merge)
    assert student.info.adapter == ("lora (merged)" if merge else "lora")
    assert isinstance(student.model, peft.PeftModel) != merge
    check_every_step(student, family, cfg, merged(w, lora, r, alpha), *prompts([6, 4], seed=5), 8, 4)
    # explicit base= gives the same student
    again = load_student(adapter, base=base, dtype=F64, backend="torch", merge_adapter=merge)
    ids, mask = prompts([4], seed=6)
    assert torch.equal(generate(again, ids, 4, block_size=4).tokens, generate(student, ids, 4, block_size=4).tokens)


def _tiny_llama():
    from tiny_models import tiny_model

    model, _ = tiny_model("llama", seed=3, twin=False)
    return model.double()


def test_peft_model_used_without_permanent_merge():
    from tiny_models import EOS_ID as T_EOS, MASK_ID as T_MASK, prompts as t_prompts

    model = _tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj"],
                          init_lora_weights=False)
    pm = peft.get_peft_model(model, cfg).eval()
    base_w = pm.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    ids, mask = t_prompts([6, 4], seed=2)
    kw = dict(block_size=4, threshold=0.5, attention_mask=mask, mask_token_id=T_MASK, eos_token_id=T_EOS,
              stop_at_eos=False, backend="torch")
    rec_p, rec_m = [], []
    out_p = generate(pm, ids, 8, logits_hook=lambda *a: rec_p.append(a[3].clone()), **kw)
    # the PEFT model is untouched: LoRA layers still separate, base weight unchanged
    q = pm.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q, peft.tuners.lora.LoraLayer)
    assert torch.equal(q.base_layer.weight, base_w)
    student = BlockCausalStudent(pm, mask_token_id=T_MASK, eos_token_id=T_EOS, backend="torch")
    assert student.info.adapter == "lora"
    # LoRA matters: without it the tokens or logits differ
    with pm.disable_adapter():
        rec_b = []
        generate(pm.get_base_model(), ids, 8, logits_hook=lambda *a: rec_b.append(a[3].clone()), **kw)
    assert rel(rec_b[0], rec_p[0]) > 1e-3
    # merged on request: same logits as the unmerged LoRA
    merged_student = load_student(pm, merge_adapter=True, mask_token_id=T_MASK, eos_token_id=T_EOS, backend="torch")
    assert merged_student.info.adapter == "lora (merged)"
    assert not isinstance(merged_student.model, peft.PeftModel)
    out_m = generate(merged_student, ids, 8, logits_hook=lambda *a: rec_m.append(a[3].clone()), **kw)
    assert torch.equal(out_p.tokens, out_m.tokens)
    assert max(rel(a, b) for a, b in zip(rec_p, rec_m)) < 1e-10


def test_peft_model_over_llada_object(tmp_path):
    family, cfg, w, _ = make(tmp_path, "llada-sequential-fused")
    obj = remote_like_model(family, cfg, w)
    lcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["att_proj", "ff_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(obj, lcfg).eval()
    lora = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer):
            key = name.replace("base_model.model.", "", 1)
            lora[key] = (mod.lora_A["default"].weight.detach().double(), mod.lora_B["default"].weight.detach().double())
    student = load_student(pm, backend="torch")
    assert student.info.adapter == "lora" and student.info.family == "llada"
    check_every_step(student, family, cfg, merged(w, lora, 2, 4), *prompts([5, 3], seed=8), 8, 4)


# ---------------------------------------------------------------- settings, errors
def test_settings_from_generation_config_then_table(tmp_path):
    family, cfg, w, folder = make(tmp_path, "dream")
    info = inspect_checkpoint(folder)
    assert (info.family, info.logits_alignment, info.block_size, info.threshold) == ("dream", "shifted", 32, 0.9)
    assert info.sources["block_size"] == "table" and info.eos_token_id == EOS_ID
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [EOS_ID, EOS_ID + 1], "mask_token_id": MASK_ID, "block_length": 8,
                   "threshold": 0.7}, f)
    student = load_student(folder, dtype=F64, backend="torch")
    assert (student.info.block_size, student.info.threshold, student.info.eot_token_id) == (8, 0.7, EOS_ID + 1)
    assert student.info.sources["block_size"] == "generation_config.json"
    ids, _ = prompts([5])
    out = generate(student, ids, 16, stop_at_eos=False)  # block_size and threshold from the checkpoint
    assert len(out.steps_per_block) == 2
    # no mask id in the checkpoint: the family table (LLaDA-8B's), which does not fit a tiny vocab
    lcfg = llada_config("llama")
    del lcfg["mask_token_id"]
    lfolder = write_checkpoint(str(tmp_path / "nomask"), lcfg, llada_weights(lcfg))
    info = inspect_checkpoint(lfolder)
    assert info.mask_token_id == FAMILY_DEFAULTS["llada"].mask_token_id == 126336
    assert info.sources["mask_token_id"] == "table" and info.logits_alignment == "unshifted"
    with pytest.raises(ValueError, match=r"mask_token_id 126336 \(from table\) is outside the vocabulary of 320"):
        load_student(lfolder)
    assert load_student(lfolder, mask_token_id=MASK_ID).mask_token_id == MASK_ID


def test_wrong_mask_id_is_a_clear_error(tmp_path):
    family, cfg, w, folder = make(tmp_path, "dream")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        load_student(folder, mask_token_id=VOCAB + 5)
    with pytest.raises(ValueError, match="must differ"):
        load_student(folder, mask_token_id=EOS_ID)
    student = load_student(folder)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate(student, prompts([3])[0], 4, mask_token_id=VOCAB)


def test_folder_of_something_else_names_missing_and_unexpected_keys(tmp_path):
    family, cfg, w, _ = make(tmp_path, "llada-llama")
    w = dict(w)
    w["model.transformer.blocks.0.extra_proj.weight"] = w.pop("model.transformer.blocks.1.up_proj.weight")
    folder = write_checkpoint(str(tmp_path / "bad"), cfg, w)
    with pytest.raises(ValueError, match=r"missing keys \[model\.layers\.1\.mlp\.up_proj\.weight\]; unexpected keys "
                                         r"\[model\.transformer\.blocks\.0\.extra_proj\.weight\]"):
        load_student(folder)
    # a Dream config over LLaDA weights
    dcfg = dream_config()
    folder = write_checkpoint(str(tmp_path / "mixed"), dcfg, llada_weights(llada_config("llama")))
    with pytest.raises(ValueError, match="missing keys .*model.embed_tokens.weight.*unexpected keys .*transformer"):
        load_student(folder)
    # unsupported model type, no config, a file
    folder = write_checkpoint(str(tmp_path / "gpt2"), {"model_type": "gpt2"}, {"x.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="model_type is 'gpt2'"):
        load_student(folder)
    with pytest.raises(ValueError, match="neither config.json"):
        load_student(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_student(str(tmp_path / "missing"))
    # an upstream option with no stock equivalent
    folder = write_checkpoint(str(tmp_path / "alibi"), llada_config("llama", rope=False, alibi=True),
                              llada_weights(llada_config("llama")))
    with pytest.raises(ValueError, match="no stock Llama equivalent: no RoPE"):
        load_student(folder)


# ---------------------------------------------------------------- the decoding rule
def boost_mask(logits, gap=1.0):
    """``logits`` with the [MASK] logit set ``gap`` below the best other token (a new tensor)."""
    others = torch.cat([logits[..., :MASK_ID], logits[..., MASK_ID + 1:]], dim=-1)
    out = logits.clone()
    out[..., MASK_ID] = others.max(-1).values - gap
    return out


def upstream_decode(family, w, cfg, ids, n_new, block_size, threshold, mask_id):
    """Dense re-implementation of the upstream rule (Fast-dLLM ``get_transfer_index``, greedy):
    recompute prompt + blocks so far under the block-causal mask every step; ``x0 = argmax``
    over all logits; confidence = softmax(logits in float64)[x0]; fix the top-1 masked position
    and every masked position with confidence >= threshold."""
    b, p = ids.shape
    x = torch.full((b, n_new), mask_id, dtype=torch.long)
    shift = 1 if family == "dream" else 0
    for s in range(0, n_new, block_size):
        e = min(s + block_size, n_new)
        while (x[:, s:e] == mask_id).any():
            seq = torch.cat([ids, x[:, :e]], 1)
            vis, pos = layout(torch.ones_like(ids), seq.shape[1], block_size)
            logits = dense_forward(family, w, cfg, seq, vis, pos)[:, p + s - shift: p + e - shift]
            logits = boost_mask(logits)
            x0 = logits.argmax(-1)
            assert not (x0 == mask_id).any(), "test setup: [MASK] must not be the top-1 (upstream would loop)"
            conf = torch.softmax(logits.double(), -1).gather(-1, x0[..., None])[..., 0]
            masked = x[:, s:e] == mask_id
            x0 = torch.where(masked, x0, x[:, s:e])  # fixed positions keep their token
            conf = torch.where(masked, conf, torch.tensor(-float("inf"), dtype=F64))
            take = masked & (conf >= threshold)
            take[torch.arange(b), conf.argmax(-1)] = True
            x[:, s:e] = torch.where(take, x0, x[:, s:e])
    return x


@pytest.mark.parametrize("name", ["dream", "llada-sequential-fused"])
def test_default_rule_is_upstream_token_for_token(tmp_path, name):
    family, cfg, w, folder = make(tmp_path, name, seed=11)
    student = load_student(folder, dtype=F64, backend="torch")
    ids, _ = prompts([6, 6], seed=12)
    n_new, bs, thr = 12, 4, 0.6

    def boost_probe(bi, st, x, lg):
        # record the [MASK] mass the boosted logits give
        mass.append(float(torch.softmax(lg, -1)[..., MASK_ID].max()))

    # boost the [MASK] logit of the student's output (a forward hook on its lm_head) so that it
    # carries real probability mass: 1.0 below the best other token at every position
    student.lm_head.register_forward_hook(lambda mod, inp, out: boost_mask(out))
    mass = []
    kw = dict(block_size=bs, threshold=thr, stop_at_eos=False, confidence_dtype=F64)
    ours = generate(student, ids, n_new, logits_hook=boost_probe, **kw)
    renorm = generate(student, ids, n_new, confidence="mask_renormalized", **kw)
    ref = upstream_decode(family, w, cfg, ids, n_new, bs, thr, MASK_ID)
    assert min(mass) > 0.1, "test setup: the boost must give [MASK] real probability"
    assert torch.equal(ours.tokens, ref), "the default rule must equal upstream token for token"
    # the renormalised confidence ignores the [MASK] mass: more tokens per step, other tokens
    assert not torch.equal(renorm.tokens, ours.tokens) and renorm.num_steps < ours.num_steps


def test_denoise_step_rules_differ_only_by_mask_mass():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 20, generator=g, dtype=F64) * 3
    mask_id = 19
    logits[..., mask_id] = logits.max(-1).values - 0.5  # [MASK] is the runner-up everywhere
    b_full, b_ren = torch.full((2, 6), mask_id), torch.full((2, 6), mask_id)
    a_full, _ = denoise_step(logits, b_full, mask_token_id=mask_id, threshold=0.4, confidence_dtype=F64)
    a_ren, _ = denoise_step(logits, b_ren, mask_token_id=mask_id, threshold=0.4, confidence_dtype=F64,
                            confidence="mask_renormalized")
    p = torch.softmax(logits, -1)
    top = p[..., :mask_id].max(-1).values
    assert torch.equal(a_full, (top >= 0.4) | (top == top.max(-1, keepdim=True).values))
    ren = top / (1 - p[..., mask_id])
    assert torch.equal(a_ren, (ren >= 0.4) | (ren == ren.max(-1, keepdim=True).values))
    assert a_ren.sum() > a_full.sum()
    # [MASK] is never chosen even when it is the top-1
    logits[..., mask_id] = 100.0
    blk = torch.full((2, 6), mask_id)
    denoise_step(logits, blk, mask_token_id=mask_id, threshold=0.9)
    assert (blk != mask_id).sum(1).tolist() == [1, 1]
    with pytest.raises(ValueError, match="confidence must be one of"):
        denoise_step(logits, blk, mask_token_id=mask_id, threshold=0.9, confidence="other")


def test_nocache_baseline_accepts_folders_and_same_tokens(tmp_path):
    family, cfg, w, folder = make(tmp_path, "llada-llama")
    ids, mask = prompts([5, 2], seed=4)
    kw = dict(block_size=4, threshold=0.5, attention_mask=mask, stop_at_eos=False)
    a = generate(folder, ids, 8, **kw)
    b = generate_block_causal_nocache(folder, ids, 8, **kw)
    assert torch.equal(a.tokens, b.tokens)
    assert cdlm_fast.load_student is load_student


# ---------------------------------------------------------------- command line
def run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cdlm_fast", *args], capture_output=True, text=True, timeout=600)


def test_cli_generate_and_check_model_every_format(tmp_path):
    from diffusion_checkpoints import write_tokenizer

    _, _, _, dream = make(tmp_path, "dream")
    write_tokenizer(dream)
    family, cfg, w, llada = make(tmp_path, "llada-sequential-fused")
    g = torch.Generator().manual_seed(1)
    lora = {f"model.transformer.blocks.{i}.att_proj": _lora_factors(g, w[f"model.transformer.blocks.{i}.att_proj."
                                                                        "weight"].shape[0], cfg["d_model"], 2)
            for i in range(2)}
    adapter = write_lora_adapter(str(tmp_path / "adapter"), "unused/elsewhere", lora, r=2, alpha=4,
                                 target_modules=["att_proj"])
    r = run_cli("generate", "--model", dream, "w5 w6 w7", "--max-new-tokens", "8", "--json", "--raw")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model"]["family"] == "dream" and len(data["tokens"]) == 8 and isinstance(data["text"], str)
    for model_args in (["--model", adapter, "--base", llada, "--merge-adapter"],):
        r = run_cli("generate", *model_args, "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--block-size", "4",
                    "--json")
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["model"]["family"] == "llada" and len(data["tokens"]) == 8
        assert MASK_ID not in data["tokens"] and len(data["steps_per_block"]) == 2
        want = "lora (merged)" if "--merge-adapter" in model_args else ("lora" if adapter in model_args else None)
        assert data["model"]["adapter"] == want
    r = run_cli("check-model", adapter, "--base", llada, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert (data["family"], data["block_type"], data["adapter"], data["mask_token_id"], data["logits_alignment"]) == \
        ("llada", "sequential", "lora", MASK_ID, "unshifted")
    bad = write_checkpoint(str(tmp_path / "bad"), cfg, {k: v for k, v in w.items() if "blocks.1." not in k})
    r = run_cli("check-model", bad)
    assert r.returncode == 2 and "missing keys" in r.stderr and r.stderr.count("\n") == 1, r.stderr
