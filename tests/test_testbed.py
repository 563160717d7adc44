"""The testbed family: a tiny family built once per session, loaded back with transformers, checked for
determinism, caching, tokenizer round-trips, task scoring and the bf16-rounded GRPO checkpoint."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers
from safetensors import safe_open
from tokenizers import Tokenizer

from distmerge.testbed import TASKS, build_family, eval_prompts, evaluate, extract_answer, score
from distmerge.testbed.config import family_settings, settings_hash
from distmerge.testbed.evaluate import generate_text
from distmerge.testbed.family import MANIFEST_NAME, model_names
from distmerge.testbed.grpo import group_advantages
from distmerge.testbed.tasks import is_held_out, sample_train
from distmerge.testbed.tokenizer import ALPHABET, build_tokenizer
from distmerge.testbed.training import DataMix, ModelShape, TrainSettings, make_model, train_supervised

CHECKPOINT_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                    "tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny_family(testbed_tiny):
    return testbed_tiny


def read_tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_tiny_family_layout_and_manifest(tiny_family):
    manifest = tiny_family
    settings = family_settings("tiny", 0)
    names = model_names(settings)
    assert names == ["base", "sft-reversal", "sft-uppercase", "sft-weak-reversal", "grpo-reversal"]
    assert sorted(manifest.models) == sorted(names)
    for name in names:
        assert all((manifest.path(name) / f).exists() for f in CHECKPOINT_FILES), name
    on_disk = json.loads((manifest.root / MANIFEST_NAME).read_text())
    assert on_disk["settings_hash"] == settings_hash(settings) == manifest.settings_hash
    parents = {name: record["parent"] for name, record in manifest.models.items()}
    assert parents == {"base": None, "sft-reversal": "base", "sft-uppercase": "base",
                       "sft-weak-reversal": "base", "grpo-reversal": "sft-weak-reversal"}
    for record in manifest.models.values():
        assert set(record["accuracy"]) == set(manifest.tasks)
        assert all(0.0 <= value <= 1.0 for value in record["accuracy"].values())
    assert manifest.grpo["before"] == manifest.accuracy("sft-weak-reversal")["reversal"]
    assert manifest.grpo["after"] == manifest.accuracy("grpo-reversal")["reversal"]
    assert {c["name"] for c in manifest.gate["clauses"]} >= {"grpo-reversal > sft-weak-reversal on reversal"}
    assert manifest.gate["passed"] == all(c["passed"] for c in manifest.gate["clauses"])


def test_every_checkpoint_loads_and_generates(tiny_family):
    manifest = tiny_family
    for name in manifest.models:
        folder = manifest.path(name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        assert model.config.model_type == "qwen2" and not model.config.tie_word_embeddings
        assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM's minimum
        inputs = tokenizer(["rev:abcdef=", "up:hello="], return_tensors="pt", padding=True)
        output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert output.shape[1] > inputs["input_ids"].shape[1]
        assert all(isinstance(text, str) for text in tokenizer.batch_decode(output, skip_special_tokens=True))
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            assert all(handle.get_slice(key).get_dtype() == "F32" for key in handle.keys())


def test_our_greedy_decoder_matches_transformers_generate(tiny_family):
    manifest = tiny_family
    model = transformers.AutoModelForCausalLM.from_pretrained(manifest.path("sft-reversal")).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(manifest.path("sft-reversal"))
    prompts = [e["prompt"] for e in eval_prompts("reversal", 6, seed=3) + eval_prompts("uppercase", 6, seed=3)]
    ours = generate_text(model, prompts, max_new_tokens=10)
    for prompt, text in zip(prompts, ours, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        reference = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert tokenizer.decode(reference[0, ids.shape[1]:], skip_special_tokens=True) == text
    assert evaluate(manifest.path("sft-reversal"), list(manifest.tasks), 64, 0) == manifest.accuracy("sft-reversal")


def test_cache_hit_skips_training(tiny_family):
    manifest = tiny_family
    before = {p: p.stat().st_mtime_ns for p in manifest.root.rglob("*") if p.is_file()}
    again = build_family(manifest.root, size="tiny", seed=0, progress=False)
    assert again.settings_hash == manifest.settings_hash and again.to_dict() == manifest.to_dict()
    assert {p: p.stat().st_mtime_ns for p in manifest.root.rglob("*") if p.is_file()} == before


def test_grpo_checkpoint_is_bf16_rounded_and_moved(tiny_family):
    manifest = tiny_family
    grpo = read_tensors(manifest.path("grpo-reversal"))
    weak = read_tensors(manifest.path("sft-weak-reversal"))
    for tensors in (grpo, weak):
        assert all(torch.equal(t, t.to(torch.bfloat16).float()) for t in tensors.values())
    changed = sum(int(((grpo[n] - weak[n]).abs() > 1e-5).sum()) for n in grpo)
    total = sum(t.numel() for t in grpo.values())
    assert changed > 0
    assert changed / total == pytest.approx(manifest.grpo["delta"]["changed_fraction"])
    assert max(manifest.grpo["mean_reward_per_step"]) > 0  # GRPO saw rewards to learn from


def test_tokenizer_round_trip(tiny_family):
    manifest = tiny_family
    tokenizer = transformers.AutoTokenizer.from_pretrained(manifest.path("base"))
    reference = build_tokenizer()
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    text = "add:23+58= 81\nXYZ-" + ALPHABET
    ids = tokenizer(text)["input_ids"]
    assert ids == reference(text)["input_ids"]  # transformers 5 swaps in Qwen2Tokenizer: same encoding
    assert ids == Tokenizer.from_file(str(manifest.path("base") / "tokenizer.json")).encode(text).ids
    assert ids[0] == tokenizer.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for example in eval_prompts("reversal", 5, 0):
        pair = example["prompt"] + example["answer"]
        assert tokenizer.decode(tokenizer(pair)["input_ids"][1:]) == pair


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tasks_are_deterministic_held_out_and_correct(task):
    first, again, other = eval_prompts(task, 50, 0), eval_prompts(task, 50, 0), eval_prompts(task, 50, 1)
    assert first == again and first != other
    assert len({e["prompt"] for e in first}) == 50 and all(is_held_out(e["prompt"]) for e in first)
    rng_a, rng_b = random.Random(7), random.Random(7)
    train = [sample_train(task, level, rng_a) for level in ("easy", "hard") * 50]
    assert train == [sample_train(task, level, rng_b) for level in ("easy", "hard") * 50]
    assert not any(is_held_out(e["prompt"]) for e in train)
    for example in first + train:
        body = example["prompt"].split(":", 1)[1].rstrip("=")
        expected = {"addition": lambda b: str(sum(int(x) for x in b.split("+"))), "reversal": lambda b: b[::-1],
                    "sorting": lambda b: "".join(sorted(b)), "uppercase": str.upper}[task](body)
        assert example["answer"] == expected


def test_answer_extraction_and_scoring():
    assert eval_prompts("addition", 1, 0)[0]["prompt"].startswith("add:")
    assert extract_answer("81<eos>junk") == "81" and extract_answer(" 81\n82") == "81"
    assert score("81", "81") and score("81<eos>", "81") and not score("811", "81") and not score("", "81")


def test_group_advantages_are_normalised_per_group():
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]), num_samples=4)
    assert torch.allclose(advantages[:4].mean(), torch.tensor(0.0), atol=1e-6)
    assert advantages[0] > 0 > advantages[1]
    assert torch.equal(advantages[4:], torch.zeros(4))  # no variance, no signal


def test_training_is_deterministic():
    shape = ModelShape(hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    states = []
    for _ in range(2):
        model = make_model(shape, seed=5)
        train_supervised(model, DataMix(tasks=("reversal",)), TrainSettings(steps=3, lr=1e-3, batch_size=8), seed=5)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_unknown_size_is_rejected():
    with pytest.raises(ValueError, match="tiny"):
        family_settings("huge", 0)


@pytest.mark.slow
def test_tiny_family_rebuild_is_bitwise_identical(tiny_family, tmp_path):
    manifest = tiny_family
    rebuilt = build_family(tmp_path / "again", size="tiny", seed=0, progress=False)
    for name in manifest.models:
        first, second = read_tensors(manifest.path(name)), read_tensors(rebuilt.path(name))
        assert all(torch.equal(first[k], second[k]) for k in first), name
        assert rebuilt.models[name]["accuracy"] == manifest.models[name]["accuracy"]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~10 min on an idle 2-core machine; much longer on a busy one
def test_small_family_builds_and_grpo_helps(tmp_path):
    manifest = build_family(tmp_path / "small", size="small", seed=0, progress=False)
    assert manifest.grpo["after"] > manifest.grpo["before"]
    assert manifest.models["base"]["train"]["steps"] == 600
