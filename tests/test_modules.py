"""Shared building blocks: masks, positional encodings, attention + KV cache, encoders."""

import math

import pytest
import torch

from cosy.modules import (Encoder, EncoderConfig, KVCache, MultiHeadAttention, RelPositionalEncoding,
                          RelPositionMultiHeadAttention, RotaryEmbedding, causal_mask, chunk_mask, lengths_to_mask,
                          padding_and_chunk_mask, rename_espnet_encoder_key)

ATOL = 1e-5  # float32 reordering noise for these tiny widths


def tiny(**kw) -> EncoderConfig:
    base = dict(input_size=12, d_model=16, n_heads=2, ffn_dim=32, n_layers=2, dropout=0.0,
                positional_dropout=0.0, max_len=64)
    base.update(kw)
    return EncoderConfig(**base)


def test_lengths_to_mask():
    mask = lengths_to_mask(torch.tensor([3, 1, 0]), 4)
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False], [False] * 4]


def test_chunk_mask_follows_the_rule():
    for size, c, left in [(7, 1, -1), (9, 3, -1), (10, 4, -1), (9, 2, 1), (9, 3, 0)]:
        mask = chunk_mask(size, c, left)
        for i in range(size):
            for j in range(size):
                visible = j < (i // c + 1) * c and (left < 0 or j >= max(i // c - left, 0) * c)
                assert bool(mask[i, j]) == visible, (size, c, left, i, j)
    assert torch.equal(causal_mask(5), torch.ones(5, 5, dtype=torch.bool).tril())


def test_padding_and_chunk_mask_combines_and_keeps_rows_finite():
    mask = padding_and_chunk_mask(torch.tensor([3, 0]), 4, chunk_size=2)
    assert mask[0, 0].tolist() == [True, True, False, False]
    assert mask[0, 3].tolist() == [True, True, True, False]
    assert mask[1].all()  # an empty item gets visible rows instead of NaN
    assert padding_and_chunk_mask(torch.tensor([2]), 3)[0].tolist() == [[True, True, False]] * 3


def test_rel_positional_table_matches_formula():
    d = 8
    pe = RelPositionalEncoding(d, max_len=10)
    x = torch.ones(1, 4, d)
    scaled, table = pe(x)
    assert torch.allclose(scaled, x * math.sqrt(d))
    assert table.shape == (1, 7, d)
    for row, r in enumerate(range(3, -4, -1)):
        for m in range(d // 2):
            w = math.exp(-2 * m * math.log(10000.0) / d)
            assert table[0, row, 2 * m].item() == pytest.approx(math.sin(r * w), abs=1e-6)
            assert table[0, row, 2 * m + 1].item() == pytest.approx(math.cos(r * w), abs=1e-6)
    assert torch.equal(pe.table(4), table)


def direct_rel_attention(attn: RelPositionMultiHeadAttention, x, mask, table):
    """The fixtures-README formula evaluated logit by logit."""
    h, dk = attn.n_heads, attn.head_dim
    batch, t, _ = x.shape
    q = attn.linear_q(x).view(batch, t, h, dk)
    k = attn.linear_k(x).view(batch, t, h, dk)
    v = attn.linear_v(x).view(batch, t, h, dk)
    p = attn.linear_pos(table[0]).view(-1, h, dk)  # row index = (t - 1) - r
    out = torch.zeros(batch, t, h, dk)
    for b in range(batch):
        for head in range(h):
            for i in range(t):
                logits = torch.full((t,), float("-inf"))
                for j in range(t):
                    if mask[b, i, j]:
                        qi = q[b, i, head]
                        pij = p[(t - 1) - (i - j), head]
                        logits[j] = ((qi + attn.pos_bias_u[head]) @ k[b, j, head]
                                     + (qi + attn.pos_bias_v[head]) @ pij) / math.sqrt(dk)
                out[b, i, head] = torch.softmax(logits, 0) @ v[b, :, head]
    return attn.linear_out(out.reshape(batch, t, h * dk))


@torch.no_grad()
def test_rel_attention_matches_direct_formula():
    torch.manual_seed(0)
    attn = RelPositionMultiHeadAttention(16, 2).eval()
    x = torch.randn(2, 6, 16)
    table = RelPositionalEncoding(16, max_len=20).table(6)
    for mask in [padding_and_chunk_mask(torch.tensor([6, 4]), 6), padding_and_chunk_mask(torch.tensor([6, 4]), 6, 1)]:
        assert torch.allclose(attn(x, mask, table), direct_rel_attention(attn, x, mask, table), atol=ATOL)


@torch.no_grad()
@pytest.mark.parametrize("rel", [False, True])
def test_cached_attention_steps_equal_full_causal_pass(rel):
    torch.manual_seed(1)
    t, d, h = 9, 16, 4
    if rel:
        attn = RelPositionMultiHeadAttention(d, h).eval()
        table_full = RelPositionalEncoding(d, max_len=32).table(t)
        table_step = RelPositionalEncoding(d, max_len=256).table(200)  # 399 rows
        kw_full, kw_step = {"pos_emb": table_full}, {"pos_emb": table_step}
    else:
        attn = MultiHeadAttention(d, h, head_dim=8, rotary=RotaryEmbedding(8)).eval()
        kw_full = kw_step = {}
    x = torch.randn(2, t, d)
    full = attn(x, causal_mask(t)[None], **kw_full)
    cache = KVCache(2, h, 16, attn.head_dim)
    storage = cache.k.data_ptr()
    steps = []
    for i in range(t):
        pos = cache.fill[:, None]
        mask = torch.arange(i + 1)[None, None] <= pos[:, :, None]
        steps.append(attn(x[:, i:i + 1], mask, positions=pos, cache=cache, **kw_step))
        cache.advance(1)
    assert torch.allclose(torch.cat(steps, 1), full, atol=ATOL)
    assert cache.k.data_ptr() == storage  # filled in place, never reallocated
    assert cache.fill.tolist() == [t, t]
    if rel:  # only a band of the table around r = 0..t was projected, not all 399 rows
        lo, hi = cache.pos_band
        assert hi - lo < 200 and lo <= 199 - (t - 1) and hi > 199


def test_kv_cache_full_raises():
    cache = KVCache(1, 1, 2, 4)
    with pytest.raises(ValueError, match="full"):
        cache.write(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4), torch.arange(3)[None])


def test_rotary_scores_depend_on_distance_only():
    torch.manual_seed(2)
    rope = RotaryEmbedding(8, theta=100.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        return (rope(q, torch.tensor([i])) * rope(k, torch.tensor([j]))).sum().item()

    assert score(5, 2) == pytest.approx(score(13, 10), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)
    assert torch.allclose(rope(q, torch.tensor([0])), q)


def test_attention_inner_width_may_differ():
    attn = MultiHeadAttention(12, 3, head_dim=8, qkv_bias=False)
    assert attn.linear_q.weight.shape == (24, 12) and attn.linear_q.bias is None
    assert attn(torch.randn(2, 5, 12)).shape == (2, 5, 12)


@torch.no_grad()
@pytest.mark.parametrize("pos_enc,layer,input_layer", [
    ("rel_pos", "transformer", "linear_legacy"), ("rel_pos", "conformer", "linear"),
    ("rotary", "transformer", "none"), ("abs", "conformer", "linear")])
def test_encoder_step_equals_full_pass_with_ragged_batch(pos_enc, layer, input_layer):
    torch.manual_seed(3)
    cfg = tiny(pos_enc=pos_enc, layer=layer, input_layer=input_layer, causal=True,
               input_size=16 if input_layer == "none" else 12)
    enc = Encoder(cfg).eval()
    lengths = torch.tensor([8, 5])
    x = torch.randn(2, 8, cfg.input_size)
    full, out_len = enc(x, lengths)
    assert out_len.tolist() == [8, 5]
    # prefill 3 frames of row 0 and 2 of row 1 (right-padded), then one frame at a time
    cache = enc.new_cache(2, 32)
    prefill = enc.forward_step(x[:, :3], cache, torch.tensor([3, 2]))
    assert torch.allclose(prefill[0], full[0, :3], atol=ATOL)
    assert torch.allclose(prefill[1, :2], full[1, :2], atol=ATOL)
    got = [[], []]
    for i in range(5):
        frame = torch.stack([x[0, 3 + i], x[1, min(2 + i, 7)]])[:, None]
        y = enc.forward_step(frame, cache)
        got[0].append(y[0, 0])
        got[1].append(y[1, 0])
    assert torch.allclose(torch.stack(got[0]), full[0, 3:8], atol=ATOL)
    assert torch.allclose(torch.stack(got[1])[:3], full[1, 2:5], atol=ATOL)


@torch.no_grad()
@pytest.mark.parametrize("layer,chunk", [("transformer", 0), ("conformer", 0), ("conformer", 2)])
def test_encoder_padding_does_not_change_valid_outputs(layer, chunk):
    torch.manual_seed(4)
    cfg = tiny(layer=layer, macaron=layer == "conformer", conv_module=layer == "conformer",
               conv_kernel=3, chunk_size=chunk)
    enc = Encoder(cfg).eval()
    x = torch.randn(2, 7, 12)
    batched, _ = enc(x, torch.tensor([7, 4]))
    alone, _ = enc(x[1:, :4], torch.tensor([4]))
    assert torch.allclose(batched[1, :4], alone[0], atol=ATOL)


@torch.no_grad()
@pytest.mark.parametrize("kind", ["conv2d", "conv1d"])
@pytest.mark.parametrize("factor", [2, 4])
def test_conv_subsampling_lengths(kind, factor):
    torch.manual_seed(5)
    enc = Encoder(tiny(input_layer=f"{kind}{factor}", layer="conformer", n_layers=1)).eval()
    lengths = torch.tensor([13, 8, 1])
    y, out_len = enc(torch.randn(3, 13, 12), lengths)
    expected = [math.ceil(n / factor) for n in lengths.tolist()]
    assert out_len.tolist() == expected
    assert y.shape == (3, expected[0], 16)
    x = torch.randn(2, 13, 12)
    batched, _ = enc(x, torch.tensor([13, 8]))
    alone, _ = enc(x[1:, :8], torch.tensor([8]))
    assert torch.allclose(batched[1, :expected[1]], alone[0], atol=ATOL)


def test_encoder_rejects_bad_sizes_and_step_on_conv_layers():
    with pytest.raises(ValueError, match="divisible"):
        Encoder(tiny(n_heads=3))
    with pytest.raises(ValueError, match="input_size == d_model"):
        Encoder(tiny(input_layer="none"))
    for conv in ("conv2d2", "conv1d2"):
        enc = Encoder(tiny(input_layer=conv))
        with pytest.raises(ValueError, match="convolutional input"):
            enc.forward_step(torch.randn(1, 2, 12), enc.new_cache(1, 8))
    with pytest.raises(ValueError, match="max_len"):
        enc.new_cache(1, 65)


def test_espnet_names_map_onto_encoder():
    enc = Encoder(tiny(layer="conformer"))
    names = set(enc.state_dict())
    for old in ["embed.out.0.weight", "embed.out.1.bias", "encoders.1.self_attn.pos_bias_u",
                "encoders.0.feed_forward.w_1.weight", "encoders.0.norm_mha.weight", "after_norm.weight"]:
        assert rename_espnet_encoder_key(old) in names
    assert rename_espnet_encoder_key("encoders.0.norm1.bias") == "layers.0.norm_attn.bias"
    assert rename_espnet_encoder_key("encoders.0.norm2.bias") == "layers.0.norm_ff.bias"
