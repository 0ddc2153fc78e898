"""Qwen2 in NNX against transformers' PyTorch Qwen2ForCausalLM (fp32, max abs diff <= 1e-4)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import merit_jax
from merit_jax.models import params as P
from merit_jax.models.generate import generate, left_pad
from merit_jax.sharding import make_mesh
from tests.hf_models import tiny_qwen2

TOL = 1e-4


def torch_logits(model, ids, mask=None):
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kw).logits.numpy()


@pytest.mark.parametrize("overrides", [
    dict(tie_word_embeddings=False, num_attention_heads=6, num_key_value_heads=2),
    dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=4),
    dict(num_attention_heads=4, num_key_value_heads=1),  # a single KV head
    dict(vocab_size=101, hidden_size=30, intermediate_size=37, num_attention_heads=3, num_key_value_heads=1,
         num_hidden_layers=3, rope_theta=1e6),  # odd sizes
    dict(num_hidden_layers=12, hidden_size=32, num_attention_heads=8, num_key_value_heads=2, vocab_size=128),
], ids=["untied-gqa3", "tied-mha", "single-kv", "odd-sizes", "deep-gqa4"])
def test_logits_match_transformers(tmp_path, overrides):
    ref = tiny_qwen2(tmp_path, **overrides)
    ours = merit_jax.load_hf(tmp_path)
    ids = np.random.RandomState(1).randint(0, ref.config.vocab_size, (3, 13))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), torch_logits(ref, ids), atol=TOL, rtol=0)


def test_right_padding_with_attention_mask(tmp_path):
    ref = tiny_qwen2(tmp_path)
    ours = merit_jax.load_hf(tmp_path)
    ids = np.random.RandomState(2).randint(0, 97, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    want = torch_logits(ref, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=TOL, rtol=0)


def test_packed_segments_equal_separate_runs(tmp_path):
    ref = tiny_qwen2(tmp_path)
    ours = merit_jax.load_hf(tmp_path)
    rng = np.random.RandomState(3)
    a, b = rng.randint(0, 97, 7), rng.randint(0, 97, 5)
    packed = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 7 + [2] * 5 + [0, 0]])
    positions = np.array([list(range(7)) + list(range(5)) + [0, 0]])
    got = np.asarray(ours(jnp.asarray(packed), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments)))
    np.testing.assert_allclose(got[0, :7], torch_logits(ref, a[None])[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(got[0, 7:12], torch_logits(ref, b[None])[0], atol=TOL, rtol=0)


def test_greedy_generate_matches_transformers(tmp_path):
    ref = tiny_qwen2(tmp_path, std=0.3)
    ours = merit_jax.load_hf(tmp_path)
    prompts = [[5, 17, 3, 8, 44], [9, 2, 61]]
    ids, mask = left_pad(prompts, pad_id=0)
    got = generate(ours, ids, mask, max_new_tokens=6)
    with torch.no_grad():
        want = ref.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                            do_sample=False, pad_token_id=0, eos_token_id=None)[:, ids.shape[1]:].numpy()
    np.testing.assert_array_equal(got, want)


def test_sampling_is_seeded(tmp_path):
    tiny_qwen2(tmp_path)
    ours = merit_jax.load_hf(tmp_path)
    ids, mask = left_pad([[1, 2, 3]])
    a = generate(ours, ids, mask, max_new_tokens=8, temperature=1.0, top_k=20, seed=4)
    b = generate(ours, ids, mask, max_new_tokens=8, temperature=1.0, top_k=20, seed=4)
    c = generate(ours, ids, mask, max_new_tokens=8, temperature=1.0, top_k=20, seed=5)
    greedy = generate(ours, ids, mask, max_new_tokens=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, greedy)
    assert a.min() >= 0 and a.max() < 97


@pytest.mark.parametrize("data,fsdp,tp", [(1, 4, 2), (2, 2, 2)])
def test_sharded_forward_equals_unsharded(tmp_path, data, fsdp, tp):
    tiny_qwen2(tmp_path, num_attention_heads=4, num_key_value_heads=2, hidden_size=32, vocab_size=96)
    ids = jnp.asarray(np.random.RandomState(5).randint(0, 96, (8, 12)))
    want = np.asarray(merit_jax.load_hf(tmp_path)(ids))
    mesh = make_mesh(data, fsdp, tp)
    model = merit_jax.load_hf(tmp_path, mesh=mesh)
    q = model.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tp")
    assert q.addressable_shards[0].data.shape == (32 // fsdp, 32 // tp)  # really split, not replicated
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    with jax.set_mesh(mesh):
        got = forward(state, jax.device_put(ids, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp")))))
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_create_sharded_places_each_param_in_its_shards():
    from merit_jax.models.config import ModelConfig
    from merit_jax.models.qwen2 import Qwen2ForCausalLM

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    mesh = make_mesh(1, 4, 2)
    model = P.create_sharded(lambda: Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), mesh)
    emb = model.model.embed_tokens.embedding[...]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("tp", "fsdp")
    assert emb.addressable_shards[0].data.shape == (32, 8)
    plain = Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0))
    # the same random values as an unsharded init (up to jit-vs-eager rounding of the scale multiply)
    np.testing.assert_allclose(np.asarray(emb), np.asarray(plain.model.embed_tokens.embedding[...]), rtol=1e-6)


def test_remat_and_bf16_policies_run(tmp_path):
    ref = tiny_qwen2(tmp_path)
    ids = np.random.RandomState(6).randint(0, 97, (2, 8))
    want = torch_logits(ref, ids)
    remat = merit_jax.load_hf(tmp_path, remat="full")
    np.testing.assert_allclose(np.asarray(remat(jnp.asarray(ids))), want, atol=TOL, rtol=0)
    bf16 = merit_jax.load_hf(tmp_path, compute_dtype="bfloat16")
    assert bf16.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.float32  # fp32 master weights
    np.testing.assert_allclose(np.asarray(bf16(jnp.asarray(ids))), want, atol=0.1, rtol=0)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type_is_named(tmp_path):
    tiny_qwen2(tmp_path)
    _edit_config(tmp_path, model_type="llama")
    with pytest.raises(ValueError, match=r"config.json: unsupported model_type 'llama'"):
        merit_jax.load_hf(tmp_path)


def test_missing_config_field_is_named(tmp_path):
    tiny_qwen2(tmp_path)
    _edit_config(tmp_path, hidden_size=None)
    with pytest.raises(ValueError, match=r"missing required config field\(s\) \['hidden_size'\]"):
        merit_jax.load_hf(tmp_path)


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    tiny_qwen2(tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(KeyError, match=r"model.layers.1.mlp.up_proj.weight"):
        merit_jax.load_hf(tmp_path)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((80, 47), np.float32)
    save_file(tensors, f)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(80, 47\)"):
        merit_jax.load_hf(tmp_path)


def test_no_weights_is_named(tmp_path):
    tiny_qwen2(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        merit_jax.load_hf(tmp_path)


def test_export_loads_in_transformers_and_decodes_the_same(tmp_path):
    from merit_jax.io.hf import save_hf

    ref = tiny_qwen2(tmp_path / "src", std=0.3, tie_word_embeddings=True, num_hidden_layers=12)
    ours = merit_jax.load_hf(tmp_path / "src")
    save_hf(ours, ref.config.to_dict(), tmp_path / "out", max_shard_bytes=20_000)  # several shards + index
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for (k, v), (k2, v2) in zip(sorted(ref.state_dict().items()), sorted(back.state_dict().items())):
        assert k == k2 and torch.equal(v, v2), k
    ids, mask = left_pad([[3, 4, 5, 6]])
    with torch.no_grad():
        want = back.generate(torch.tensor(ids), max_new_tokens=5, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[:, 4:].numpy()
    np.testing.assert_array_equal(generate(ours, ids, mask, max_new_tokens=5), want)
