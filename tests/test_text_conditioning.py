"""PathLDM's text and class conditioners: the 154-token CLIP pass, truncation, MiniLM offline, saving."""

from __future__ import annotations

import json
import socket
import warnings

import pytest
import torch
import torch.nn.functional as F

from histosynth.conditions.text import (
    CONFIG_NAME,
    ClassConditioner,
    Conditioning,
    PromptTruncatedWarning,
    TextConditioner,
    load_conditioner,
    minilm_model_path,
)
from histosynth.errors import HistosynthError

VOCAB, BOS, EOS = 100, 98, 99


def tiny_clip_config(attn: str = "eager"):
    from transformers import CLIPTextConfig

    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                         pad_token_id=EOS, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    cfg._attn_implementation = attn
    return cfg


def tiny_clip(attn: str = "eager", seed: int = 0):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    model = CLIPTextModel(tiny_clip_config(attn)).eval()
    with torch.no_grad():  # random but not tiny weights, so that every part of the pass matters
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def reference_forward(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PathLDM's long-prompt pass computed by hand from the weights: token + cyclic position embeddings,
    pre-LN transformer layers with a causal + key-padding mask over the whole sequence, final layer norm."""
    tower = model
    while not hasattr(tower, "embeddings"):
        tower = tower.text_model
    cfg = model.config
    b, t = ids.shape
    d, heads = cfg.hidden_size, cfg.num_attention_heads
    hd = d // heads
    emb = tower.embeddings
    positions = torch.arange(t) % cfg.max_position_embeddings  # 0..76, 0..76
    x = emb.token_embedding.weight[ids] + emb.position_embedding.weight[positions][None]
    allowed = torch.ones(t, t, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    bias = torch.zeros(b, 1, t, t).masked_fill(~allowed, float("-inf"))

    def linear(layer, h):
        return h @ layer.weight.T + layer.bias

    for layer in tower.encoder.layers:
        h = F.layer_norm(x, (d,), layer.layer_norm1.weight, layer.layer_norm1.bias, cfg.layer_norm_eps)
        att = layer.self_attn
        q, k, v = (linear(p, h).view(b, t, heads, hd).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
        weights = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + bias, dim=-1)
        x = x + linear(att.out_proj, (weights @ v).transpose(1, 2).reshape(b, t, d))
        h = F.layer_norm(x, (d,), layer.layer_norm2.weight, layer.layer_norm2.bias, cfg.layer_norm_eps)
        h = linear(layer.mlp.fc1, h)
        h = h * torch.sigmoid(1.702 * h)  # quick_gelu
        x = x + linear(layer.mlp.fc2, h)
    return F.layer_norm(x, (d,), tower.final_layer_norm.weight, tower.final_layer_norm.bias, cfg.layer_norm_eps)


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, BOS, (batch, length), generator=g)
    ids[:, 0] = BOS
    return ids


# ------------------------------------------------------------------------------------ the 154-token CLIP pass

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_long_prompt_matches_step_by_step_computation(attn):
    model = tiny_clip(attn)
    cond = TextConditioner(model, max_tokens=154)
    ids = random_ids(3, 154)
    mask = torch.ones_like(ids)
    mask[1, 120:] = 0  # a padded prompt
    mask[2, 40:] = 0  # a short prompt: the whole second half is padding
    out = cond.encode_ids(ids, mask)
    assert out.embeddings.shape == (3, 154, 32) and out.attention_mask.shape == (3, 154)
    assert torch.equal(out.attention_mask, mask)
    with torch.no_grad():
        expected = reference_forward(model, ids, mask)
    torch.testing.assert_close(out.embeddings, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_first_half_equals_plain_77_token_run_and_second_half_depends_on_it(attn):
    model = tiny_clip(attn)
    cond = TextConditioner(model, max_tokens=154)
    ids = random_ids(2, 154)
    out = cond.encode_ids(ids).embeddings
    with torch.no_grad():
        plain = model(input_ids=ids[:, :77]).last_hidden_state
    # causal mask: the first 77 outputs are exactly the ordinary CLIP outputs of the first 77 tokens
    torch.testing.assert_close(out[:, :77], plain, rtol=1e-5, atol=1e-6)
    # the second half is not an independent 77-token run (it attends to the first half) ...
    with torch.no_grad():
        alone = model(input_ids=ids[:, 77:]).last_hidden_state
    assert (out[:, 77:] - alone).abs().max() > 1e-3
    # ... changing a first-half token changes every second-half output, and nothing before it
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % BOS
    out2 = cond.encode_ids(changed).embeddings
    torch.testing.assert_close(out2[:, :10], out[:, :10], rtol=0, atol=1e-6)
    assert ((out2[:, 77:] - out[:, 77:]).abs().amax(dim=-1) > 1e-6).all()
    # changing a second-half token leaves everything before it untouched (causality across the halves)
    changed = ids.clone()
    changed[:, 100] = (changed[:, 100] + 1) % BOS
    out3 = cond.encode_ids(changed).embeddings
    torch.testing.assert_close(out3[:, :100], out[:, :100], rtol=0, atol=1e-6)
    assert (out3[:, 100] - out[:, 100]).abs().max() > 1e-6


def test_position_ids_restart_at_zero_in_the_second_half():
    model = tiny_clip()
    cond = TextConditioner(model, max_tokens=154)
    # the same 77 tokens twice: both halves get identical input embeddings (cyclic positions) ...
    half = random_ids(1, 77)
    ids = torch.cat([half, half], dim=1)
    tower = model
    embeds = [tower.embeddings(input_ids=ids[:, s:s + 77]) for s in (0, 77)]
    torch.testing.assert_close(embeds[0], embeds[1], rtol=0, atol=0)
    # ... and the pass matches the reference built on positions t % 77
    with torch.no_grad():
        torch.testing.assert_close(cond.encode_ids(ids).embeddings, reference_forward(model, ids, torch.ones_like(ids)),
                                   rtol=1e-4, atol=1e-5)


def test_max_tokens_77_is_plain_clip():
    model = tiny_clip("sdpa")
    cond = TextConditioner(model, max_tokens=77)
    ids = random_ids(2, 77)
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(cond.encode_ids(ids).embeddings, plain, rtol=1e-5, atol=1e-6)


def test_bad_lengths():
    model = tiny_clip()
    with pytest.raises(HistosynthError, match="multiple of the CLIP context length 77"):
        TextConditioner(model, max_tokens=100)
    cond = TextConditioner(model, max_tokens=154)
    with pytest.raises(ValueError, match="exceed max_tokens"):
        cond.encode_ids(random_ids(1, 155))


def test_frozen_and_null_condition_without_tokenizer():
    model = tiny_clip()
    cond = TextConditioner(model, max_tokens=154)
    assert not any(p.requires_grad for p in cond.parameters())
    cond.train()
    assert not cond.encoder.training  # stays in eval mode
    null = cond.null_condition(4)
    assert null.embeddings.shape == (4, 154, 32)
    assert null.attention_mask[:, :2].eq(1).all() and null.attention_mask[:, 2:].eq(0).all()
    torch.testing.assert_close(null.embeddings[0], null.embeddings[3])
    both = Conditioning.cat([cond.encode_ids(random_ids(4, 154)), null])
    assert both.embeddings.shape == (8, 154, 32) and both.attention_mask.shape == (8, 154)


# ------------------------------------------------------------------------------------ a local CLIP folder

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-character table (a tiny character-level CLIP vocabulary is built on it)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A PLIP-like local folder: a full (random, tiny) CLIPModel checkpoint + a character-level CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPModel

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder = tmp_path_factory.mktemp("clip-folder")
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=16)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def test_from_local_clip_folder_truncation_warning_and_round_trip(clip_folder, tmp_path):
    cond = TextConditioner.from_pretrained(clip_folder, max_tokens=154, local_files_only=True)
    assert cond.kind == "clip" and cond.hidden_size == 32 and cond.max_tokens == 154
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a short prompt warns nothing
        short = cond.encode(["high tumor; low til; ductal carcinoma"])
    assert short.embeddings.shape == (1, 154, 32)
    n_tokens = len("hightumor;lowtil;ductalcarcinoma") + 2  # char-level vocabulary, spaces dropped, + bos/eos
    assert int(short.attention_mask.sum()) == n_tokens
    long_prompt = "a" * 200  # 202 tokens with <bos>/<eos>
    with pytest.warns(PromptTruncatedWarning, match=r"202 tokens, 48 dropped"):
        out = cond.encode([long_prompt, "x"])
    assert out.embeddings.shape == (2, 154, 32)
    assert out.attention_mask[0].sum() == 154 and out.attention_mask[1].sum() == 3
    # the padded, tokenized pass equals the ids pass
    ids, mask = cond.tokenize(["high tumor; low til"])
    torch.testing.assert_close(cond.encode(["high tumor; low til"]).embeddings, cond.encode_ids(ids, mask).embeddings)
    # the null condition is the empty caption
    torch.testing.assert_close(cond.null_condition(2).embeddings[1], cond.encode([""]).embeddings[0])

    saved = cond.save_pretrained(tmp_path / "cond")
    assert json.loads((saved / CONFIG_NAME).read_text())["max_tokens"] == 154
    again = load_conditioner(saved)
    assert isinstance(again, TextConditioner) and again.kind == "clip" and again.max_tokens == 154
    torch.testing.assert_close(again.encode(["low tumor; high til"]).embeddings,
                               cond.encode(["low tumor; high til"]).embeddings)
    # a diffusers pipeline folder (text_encoder/ + tokenizer/) loads too
    (saved / CONFIG_NAME).unlink()
    pipe = TextConditioner.from_pretrained(saved)
    torch.testing.assert_close(pipe.encode(["x"]).embeddings, cond.encode(["x"]).embeddings)
    # a config-only save refers back to the source folder
    light = TextConditioner.from_pretrained(cond.save_pretrained(tmp_path / "light", save_encoder=False))
    assert not (tmp_path / "light" / "text_encoder").exists()
    torch.testing.assert_close(light.encode(["x"]).embeddings, cond.encode(["x"]).embeddings)


def test_missing_encoder_folder_is_named(tmp_path, loopback_only):
    missing = tmp_path / "no-such-encoder"
    with pytest.raises(HistosynthError, match="no-such-encoder"):
        TextConditioner.from_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistosynthError, match="config.json is missing"):
        TextConditioner.from_pretrained(tmp_path / "empty")
    with pytest.raises(HistosynthError, match="'histosynth-test/no-such-encoder' \\(hub id"):
        TextConditioner.from_pretrained("histosynth-test/no-such-encoder", local_files_only=True)


# ------------------------------------------------------------------------------------ MiniLM, offline

@pytest.fixture
def loopback_only(monkeypatch):
    """Fail any connection to an address other than the loopback interface."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"test tried to reach the network: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_minilm_loads_offline_from_the_pypi_package(loopback_only):
    folder = minilm_model_path()
    assert (folder / "model.safetensors").is_file()
    cond = TextConditioner.from_pretrained("minilm", max_tokens=154)
    assert cond.kind == "bert" and cond.hidden_size == 384
    prompts = ["high tumor; low til; invasive ductal carcinoma, grade 3, lymphovascular invasion present",
               "low tumor; high til; benign breast tissue with fibrocystic change"]
    out = cond.encode(prompts)
    assert out.embeddings.shape == (2, 154, 384)
    assert out.attention_mask.shape == (2, 154) and 0 < out.attention_mask[1].sum() < out.attention_mask[0].sum()

    def pooled(c, i):
        m = c.attention_mask[i].bool()
        return c.embeddings[i][m].mean(0)

    cos = F.cosine_similarity(pooled(out, 0), pooled(out, 1), dim=0)
    assert cos < 0.95  # different prompts, different embeddings
    alone = cond.encode(prompts[:1])  # a prompt's encoding does not depend on its batch
    torch.testing.assert_close(alone.embeddings[0], out.embeddings[0], rtol=1e-4, atol=1e-5)
    assert cond.null_condition(3).embeddings.shape == (3, 154, 384)
    with pytest.raises(HistosynthError, match="exceeds the 512 positions"):
        TextConditioner(cond.encoder, cond.tokenizer, max_tokens=600)


# ------------------------------------------------------------------------------------ class conditioner

def test_class_conditioner(tmp_path):
    torch.manual_seed(0)
    cc = ClassConditioner(4, 16, class_names=["low tumor; low til", "low tumor; high til",
                                                "high tumor; low til", "high tumor; high til"])
    out = cc(torch.tensor([0, 3, 4]))
    assert out.embeddings.shape == (3, 1, 16) and out.attention_mask.eq(1).all()
    null = cc.null_condition(2)
    torch.testing.assert_close(null.embeddings[0, 0], cc.embedding.weight[4])
    torch.testing.assert_close(out.embeddings[2], null.embeddings[0])
    assert out.embeddings.requires_grad  # trained with the U-Net
    with pytest.raises(ValueError, match="0..4"):
        cc(torch.tensor([5]))
    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(1000, dtype=torch.long)
    dropped = cc.drop_labels(labels, 0.3, generator=g)
    assert set(dropped.tolist()) == {0, 4} and 200 < int((dropped == 4).sum()) < 400
    assert cc.drop_labels(labels, 0.0).eq(0).all() and cc.drop_labels(labels, 1.0).eq(4).all()

    cc.save_pretrained(tmp_path / "cls")
    again = load_conditioner(tmp_path / "cls")
    assert isinstance(again, ClassConditioner) and again.class_names == cc.class_names
    torch.testing.assert_close(again.embedding.weight, cc.embedding.weight)
    with pytest.raises(HistosynthError, match="not 'text'"):
        TextConditioner.from_pretrained(tmp_path / "cls")
