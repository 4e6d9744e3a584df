"""Adapter arithmetic: ``add_weighted_adapter`` against the weighted sum written out here, and against HF peft.

* The exact types (``cat``, ``svd`` at full rank) give ``sum_i w_i s_i B_i A_i`` on every layer of the
  union of targets, for adapters of different ranks, targets, rsLoRA scales and negative weights;
  ``svd`` at a lower rank gives the best approximation of that rank (Eckart-Young, checked with a full
  SVD in the test).
* peft's factor-wise types (``linear``, ``ties``, ``magnitude_prune``) equal peft's own results, and
  ``cat`` / full-rank ``svd`` equal peft's deltas; DARE is reproducible with a seed.
* (IA)^3 combines as ``1 + sum_i w_i (l_i - 1)`` (peft's sum where weights add up to 1).
* What cannot be combined is refused before anything changes.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import deltatune as dt

peft = pytest.importorskip("peft")

KIND = "llama_lm"
A_CFG = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
B_CFG = {"r": 3, "lora_alpha": 3, "target_modules": ["v_proj", "down_proj"], "use_rslora": True, "init_lora_weights": False}
WEIGHTS = [0.7, -0.4]


def two_loras(make_model, a_cfg=A_CFG, b_cfg=B_CFG) -> dt.DeltaModel:
    torch.manual_seed(1)
    model = dt.get_delta_model(make_model(KIND), dt.LoraConfig(**a_cfg), "a")
    model.add_adapter("b", dt.LoraConfig(**b_cfg))
    return model


def lora_layers(model: dt.DeltaModel) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.base_model.named_modules() if isinstance(m, dt.methods.lora.LoraLayer)}


def expected_delta(layer, weights=WEIGHTS, names=("a", "b")) -> torch.Tensor:
    """sum_i w_i * s_i * B_i @ A_i, with s_i read from the layer (alpha / r, or alpha / sqrt(r) for rsLoRA)."""
    total = torch.zeros(layer.out_features, layer.in_features)
    for name, w in zip(names, weights):
        if name in layer.lora_A:
            total += w * layer.scaling[name] * layer.lora_B[name].weight.detach() @ layer.lora_A[name].weight.detach()
    return total


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_exact_types_equal_the_weighted_sum(make_model, output_of, kind: str) -> None:
    model = two_loras(make_model)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=kind)
    layers = lora_layers(model)
    union = {p for p, m in layers.items() if "a" in m.lora_A or "b" in m.lora_A}
    assert {p for p, m in layers.items() if "mix" in m.lora_A} == union
    assert model.peft_config["mix"].r == 5 and model.peft_config["mix"].lora_alpha == 5
    for path in union:
        torch.testing.assert_close(layers[path].row_major_delta("mix"), expected_delta(layers[path]), atol=1e-6, rtol=1e-5)
    # The model with the combination equals the base with the weighted deltas added by hand.
    inputs = make_model.inputs(KIND)
    model.set_adapter("mix")
    reference = make_model(KIND)
    with torch.no_grad():
        for path in union:
            reference.get_submodule(path).weight += expected_delta(layers[path])
    torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), atol=1e-5, rtol=0)


def test_svd_low_rank_is_the_best_approximation(make_model) -> None:
    model = two_loras(make_model)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix2", combination_type="svd", svd_rank=2)
    for layer in lora_layers(model).values():
        if "mix2" not in layer.lora_A:
            continue
        full = expected_delta(layer).double()
        u, s, vh = torch.linalg.svd(full)
        best = (u[:, :2] * s[:2]) @ vh[:2]  # Eckart-Young: the best rank-2 approximation
        torch.testing.assert_close(layer.row_major_delta("mix2").double(), best, atol=1e-5, rtol=1e-4)


def test_svd_never_forms_the_full_matrix() -> None:
    """The re-factorisation of a 4096 x 4096 rank-8 delta touches (4096, 8) and (8, 8) matrices only."""
    from deltatune.methods.lora.combine import low_rank_svd

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 4096, generator=gen), torch.randn(4096, 8, generator=gen)
    new_a, new_b = low_rank_svd(a, b, 8)
    probe = torch.randn(4096, 3, generator=gen)
    torch.testing.assert_close(new_b @ (new_a @ probe), b @ (a @ probe), atol=1e-3, rtol=1e-4)


def peft_twin(model: dt.DeltaModel, tmp_path, make_model, names=("a", "b")):
    model.save_pretrained(tmp_path, selected_adapters=list(names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_model(KIND), str(tmp_path / names[0]), adapter_name=names[0])
        for name in names[1:]:
            theirs.load_adapter(str(tmp_path / name), adapter_name=name)
    return theirs


def peft_layers(theirs) -> dict[str, torch.nn.Module]:
    return {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_exact_types_match_peft_deltas(make_model, tmp_path, kind: str) -> None:
    model = two_loras(make_model)
    theirs = peft_twin(model, tmp_path, make_model)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=kind, svd_rank=5)
    mine, other = lora_layers(model), peft_layers(theirs)
    for path, layer in mine.items():
        if "mix" in layer.lora_A:
            torch.testing.assert_close(layer.delta_weight("mix"), other[path].get_delta_weight("mix"), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "ties", "magnitude_prune"])
def test_factor_wise_types_match_peft(make_model, tmp_path, kind: str) -> None:
    same_rank = {**B_CFG, "r": 2, "target_modules": ["q_proj", "down_proj"]}
    model = two_loras(make_model, A_CFG, same_rank)
    theirs = peft_twin(model, tmp_path, make_model)
    options = {"density": 0.5} if kind != "linear" else {}
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=kind, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.add_weighted_adapter(["a", "b"], WEIGHTS, "mix", combination_type=kind, **options)
    mine, other = lora_layers(model), peft_layers(theirs)
    compared = 0
    for path, layer in mine.items():
        if "mix" in layer.lora_A:
            torch.testing.assert_close(layer.lora_A["mix"].weight, other[path].lora_A["mix"].weight, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(layer.lora_B["mix"].weight, other[path].lora_B["mix"].weight, atol=1e-6, rtol=1e-5)
            compared += 1
    assert compared == 6
    if kind == "linear":  # the cross terms: peft's "linear" is not the weighted sum where both adapters act
        layer = mine["model.layers.0.self_attn.q_proj"]
        assert not torch.allclose(layer.row_major_delta("mix"), expected_delta(layer), atol=1e-4)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties"])
def test_dare_is_reproducible_with_a_seed(make_model, kind: str) -> None:
    same_rank = {**B_CFG, "r": 2}
    model = two_loras(make_model, A_CFG, same_rank)
    for name, seed in (("x", 3), ("y", 3), ("z", 4)):
        model.add_weighted_adapter(["a", "b"], WEIGHTS, name, combination_type=kind, density=0.5, seed=seed)
    layer = lora_layers(model)["model.layers.1.self_attn.v_proj"]
    assert torch.equal(layer.lora_A["x"].weight, layer.lora_A["y"].weight)
    assert torch.equal(layer.lora_B["x"].weight, layer.lora_B["y"].weight)
    assert not torch.equal(layer.lora_A["x"].weight, layer.lora_A["z"].weight)
    # density 1 keeps every entry: dare_linear is then peft's factor-wise linear combination
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "full", combination_type=kind, density=1.0)
    model.add_weighted_adapter(["a", "b"], WEIGHTS, "lin", combination_type="linear")
    if kind == "dare_linear":
        torch.testing.assert_close(layer.lora_A["full"].weight, layer.lora_A["lin"].weight)


def test_ia3_linear_combination(make_model, tmp_path) -> None:
    targets = {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"],
               "init_ia3_weights": False}
    torch.manual_seed(2)
    model = dt.get_delta_model(make_model(KIND), dt.IA3Config(**targets), "a")
    model.add_adapter("b", dt.IA3Config(**targets))
    model.add_weighted_adapter(["a", "b"], [1.5, -0.5], "neg", combination_type="linear")
    model.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix", combination_type="linear")
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    l_a, l_b = layer.ia3_l["a"].detach(), layer.ia3_l["b"].detach()
    torch.testing.assert_close(layer.ia3_l["neg"].detach(), 1 + 1.5 * (l_a - 1) - 0.5 * (l_b - 1))
    model.save_pretrained(tmp_path, selected_adapters=["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(make_model(KIND), str(tmp_path / "a"), adapter_name="a")
        theirs.load_adapter(str(tmp_path / "b"), adapter_name="b")
        theirs.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix")
    theirs_l = dict(theirs.named_parameters())
    for name, p in model.named_parameters():
        if name.endswith("ia3_l.mix"):
            torch.testing.assert_close(p, theirs_l[name.replace("base_model.", "base_model.model.", 1)], atol=1e-6, rtol=0)


def test_refusals_leave_the_model_unchanged(make_model) -> None:
    model = two_loras(make_model)
    before = set(model.peft_config)
    with pytest.raises(dt.ConfigError, match="same rank"):
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "m", combination_type="linear")
    with pytest.raises(dt.ConfigError, match="one finite weight per adapter"):
        model.add_weighted_adapter(["a", "b"], [1.0], "m")
    with pytest.raises(dt.ConfigError, match="not one of"):
        model.add_weighted_adapter(["a", "b"], WEIGHTS, "m", combination_type="average")
    with pytest.raises(dt.ConfigError, match="needs density"):
        model.add_weighted_adapter(["a", "a"], WEIGHTS, "m", combination_type="ties")
    model.add_adapter("c", dt.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(dt.ConfigError, match="different methods"):
        model.add_weighted_adapter(["a", "c"], WEIGHTS, "m")
    model.add_adapter("d", dt.LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="DoRA"):
        model.add_weighted_adapter(["a", "d"], WEIGHTS, "m")
    model.add_adapter("e", dt.BottleneckConfig(bottleneck_size=2, target_modules=["down_proj"]))
    with pytest.raises(dt.ConfigError, match="cannot be combined"):
        model.add_weighted_adapter(["e"], [1.0], "m")
    assert set(model.peft_config) == before | {"c", "d", "e"}
    assert not any("m" in getattr(m, "adapter_names", []) for m in model.modules())


def test_cli_combine_writes_the_weighted_sum_and_refuses_another_base(tmp_path, capsys) -> None:
    from _train_tiny import save_tiny
    from transformers import AutoModelForCausalLM

    from deltatune.cli import main

    base_dir, other_dir = save_tiny("llama", tmp_path / "base"), save_tiny("llama", tmp_path / "other", seed=1)

    def adapter(folder, base, seed: int, targets: list[str]) -> None:
        torch.manual_seed(seed)
        model = dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base), dt.LoraConfig(
            r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False, task_type="CAUSAL_LM"))
        model.save_pretrained(folder)

    adapter(tmp_path / "a", base_dir, 1, ["q_proj"])
    adapter(tmp_path / "b", base_dir, 2, ["q_proj", "v_proj"])
    adapter(tmp_path / "c", other_dir, 3, ["q_proj"])
    code = main(["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "0.7", "0.3", "--type", "svd",
                 "--rank", "4", "--model", str(base_dir), "--out", str(tmp_path / "mix")])
    assert code == 0 and "combined adapter written" in capsys.readouterr().out
    loaded = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "mix")
    loaded.load_adapter(tmp_path / "a", "a")
    loaded.load_adapter(tmp_path / "b", "b")
    layers = lora_layers(loaded)
    for layer in layers.values():
        if "default" in layer.lora_A:
            torch.testing.assert_close(layer.row_major_delta("default"), expected_delta(layer, [0.7, 0.3]),
                                       atol=1e-6, rtol=1e-5)
    code = main(["combine", str(tmp_path / "a"), str(tmp_path / "c"), "--weights", "1", "1", "--model", str(base_dir),
                 "--out", str(tmp_path / "bad")])
    assert code == 2 and "different base model" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_combine_errors_name_the_folders(tmp_path, capsys) -> None:
    """Two adapters that each train a task head cannot be weighted; the error names the user's folders."""
    from _train_tiny import save_tiny
    from transformers import AutoModelForCausalLM

    from deltatune.cli import main

    base_dir = save_tiny("llama", tmp_path / "base")
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        dt.get_delta_model(AutoModelForCausalLM.from_pretrained(base_dir), dt.LoraConfig(
            r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], task_type="CAUSAL_LM")).save_pretrained(
            tmp_path / name)
    code = main(["combine", str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1", "1", "--model", str(base_dir),
                 "--out", str(tmp_path / "mix")])
    err = capsys.readouterr().err
    assert code == 2 and "each train their own copy of ['lm_head']" in err
    assert repr(str(tmp_path / "a")) in err and repr(str(tmp_path / "b")) in err and "adapter1" not in err
    assert not (tmp_path / "mix").exists()
