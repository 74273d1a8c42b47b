import math

import pytest
import torch

from cosy.errors import CosyError
from cosy.tokenizer.quantize import FSQ, VQ, QuantizerConfig, build_quantizer, codebook_usage


def test_fsq_default_has_6561_codes_and_every_code_round_trips():
    fsq = build_quantizer(QuantizerConfig(kind="fsq"), dim=16)
    assert fsq.codebook_size == 3 ** 8
    all_codes = torch.arange(fsq.codebook_size).view(1, -1)
    h = fsq._index_to_digits(all_codes)
    assert set(h.unique().tolist()) == {-1.0, 0.0, 1.0}
    assert fsq._digits_to_index(h).equal(all_codes)
    # the straight-through rounding reproduces each grid point, so encode(point) = its code
    torch.testing.assert_close(fsq._round(torch.atanh(0.9 * h)), h, rtol=0, atol=0)


def test_fsq_index_formula_matches_sum_of_powers_of_three():
    fsq = FSQ(dim=4, levels=[3, 3, 3, 3])
    h = torch.tensor([[[-1.0, 0.0, 1.0, 1.0]]])
    # sum_j (h_j + 1) * 3^j = 0*1 + 1*3 + 2*9 + 2*27
    assert fsq._digits_to_index(h).item() == 3 + 18 + 54


@pytest.mark.parametrize("levels", [[3, 3, 3], [8, 5, 5], [2, 4]])
def test_fsq_general_levels_reach_every_code_and_round_trip(levels):
    torch.manual_seed(0)
    dim = len(levels)
    fsq = FSQ(dim=dim, levels=levels)
    with torch.no_grad():
        fsq.down.weight.copy_(torch.eye(dim))
        fsq.down.bias.zero_()
    codes = fsq.encode(3 * torch.randn(1, 20_000, dim))
    assert codes.dtype == torch.long
    assert codes.unique().tolist() == list(range(math.prod(levels)))
    all_codes = torch.arange(fsq.codebook_size)
    assert fsq._digits_to_index(fsq._index_to_digits(all_codes)).equal(all_codes)
    # every code decodes to a distinct vector
    grid = fsq.decode(all_codes.view(1, -1))[0]
    assert torch.cdist(grid, grid).add(torch.eye(len(grid)) * 1e3).min() > 1e-4


def test_fsq_straight_through_gradient_reaches_input():
    torch.manual_seed(0)
    fsq = build_quantizer(QuantizerConfig(kind="fsq"), dim=8)
    x = torch.randn(2, 5, 8, requires_grad=True)
    q, codes, losses = fsq(x)
    assert q.shape == x.shape and codes.shape == (2, 5) and losses == {}
    q.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert fsq.down.weight.grad.abs().sum() > 0


def test_fsq_forward_codes_equal_encode():
    torch.manual_seed(1)
    fsq = build_quantizer(QuantizerConfig(kind="fsq"), dim=8)
    x = torch.randn(3, 7, 8)
    assert fsq(x)[1].equal(fsq.encode(x))


def test_fsq_standardises_projection_so_nearly_constant_inputs_spread_over_codes():
    """An encoder output that barely varies between frames, and whose mean drifts as it
    trains, must not collapse to one code (it did without the standardisation)."""
    torch.manual_seed(2)
    fsq = build_quantizer(QuantizerConfig(kind="fsq", levels=[3, 3, 3, 3]), dim=16).train()
    x = 5 * torch.randn(16) + 0.1 * torch.randn(4, 50, 16)
    mask = torch.ones(4, 50, dtype=torch.bool)
    mask[1, 30:] = False
    x[1, 30:] = 100.0  # padding must not enter the statistics
    z = fsq._project(x, mask)[mask]
    torch.testing.assert_close(z.mean(0), torch.zeros(4), atol=1e-3, rtol=0)
    torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(4), atol=1e-2, rtol=0)
    codes = fsq(x, mask)[1][mask]
    assert codebook_usage(codes, fsq.codebook_size)["used_fraction"] > 0.4
    # a drift of the encoder's mean does not move the codes
    assert fsq(x + 3 * torch.randn(16), mask)[1][mask].equal(codes)
    # eval mode uses running statistics: after enough batches it gives the training codes
    for _ in range(300):
        fsq(x, mask)
    agree = (fsq.eval()(x, mask)[1][mask] == codes).float().mean()
    assert agree > 0.9 and fsq.encode(x)[mask].equal(fsq(x, mask)[1][mask])


def test_fsq_whitening_decorrelates_digits_and_spreads_codes():
    """Digits driven by one shared factor each look uniform yet use few combinations;
    whitening the projection removes the correlation and spreads the codes."""
    torch.manual_seed(3)
    levels = [3] * 6
    shared = torch.randn(8, 200, 1)
    x = shared + 0.3 * torch.randn(8, 200, 6)  # every dim ~ the same factor: corr ~ 0.9
    mask = torch.ones(8, 200, dtype=torch.bool)
    mask[2, 150:] = False
    x[2, 150:] = 50.0  # padding must not enter the statistics
    usage = {}
    for whiten in (False, True):
        torch.manual_seed(4)
        fsq = FSQ(dim=6, levels=levels, whiten=whiten).train()
        with torch.no_grad():
            fsq.down.weight.copy_(torch.eye(6))
            fsq.down.bias.zero_()
        z = fsq._project(x, mask)[mask]
        usage[whiten] = codebook_usage(fsq(x, mask)[1][mask], fsq.codebook_size)["used_fraction"]
        if whiten:
            torch.testing.assert_close(torch.cov(z.T, correction=0), torch.eye(6), atol=2e-3, rtol=0)
    assert usage[True] > 3 * usage[False]
    # gradients pass through the whitening; eval mode uses the running estimate
    fsq.zero_grad()
    fsq(x, mask)[0].pow(2).sum().backward()
    assert fsq.down.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for _ in range(300):
            fsq(x, mask)
        codes = fsq(x, mask)[1][mask]
        agree = (fsq.eval()(x, mask)[1][mask] == codes).float().mean()
    assert agree > 0.9 and fsq.encode(x)[mask].equal(fsq(x, mask)[1][mask])


def test_vq_straight_through_and_commitment_loss():
    torch.manual_seed(0)
    vq = build_quantizer(QuantizerConfig(kind="vq", codebook_size=16, beta=0.5), dim=4)
    x = torch.randn(2, 6, 4, requires_grad=True)
    q, codes, losses = vq(x)
    expected = 0.5 * (x - vq.embed[codes]).pow(2).mean()
    torch.testing.assert_close(losses["commit"], expected, rtol=1e-5, atol=1e-6)
    (q.sum() + losses["commit"]).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_vq_ema_moves_codes_toward_data():
    torch.manual_seed(0)
    vq = VQ(dim=2, cfg=QuantizerConfig(kind="vq", codebook_size=4, decay=0.8, dead_after=10_000))
    centres = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [5.0, -5.0], [-5.0, -5.0]])
    data = (centres.repeat(50, 1) + 0.1 * torch.randn(200, 2)).view(1, 200, 2)
    before = torch.cdist(centres, vq.embed).min(-1).values.mean()
    vq.train()
    for _ in range(30):
        vq(data)
    after = torch.cdist(centres, vq.embed).min(-1).values.mean()
    assert after < before * 0.5
    # codes that received data sit close to the mean of what they received
    codes = vq.encode(data)[0]
    for c in codes.unique():
        torch.testing.assert_close(vq.embed[c], data[0][codes == c].mean(0), rtol=0, atol=0.5)


def test_vq_masked_frames_do_not_move_the_codebook():
    torch.manual_seed(0)
    vq = VQ(dim=2, cfg=QuantizerConfig(kind="vq", codebook_size=4, dead_after=10_000))
    vq.train()
    before = vq.embed.clone()
    vq(torch.randn(1, 5, 2), mask=torch.zeros(1, 5, dtype=torch.bool))
    # decay applies to every code, but with no data the smoothed means stay where they were
    torch.testing.assert_close(vq.embed, before, rtol=1e-4, atol=1e-4)


def test_vq_dead_codes_are_reinitialised_from_recent_inputs():
    torch.manual_seed(0)
    vq = VQ(dim=2, cfg=QuantizerConfig(kind="vq", codebook_size=8, dead_after=3))
    vq.train()
    data = torch.full((1, 10, 2), 100.0) + torch.randn(1, 10, 2)  # far from every initial code
    for _ in range(3):
        vq(data)
    # after 3 updates every code that never won was replaced by one of the input vectors
    flat = data[0]
    dist_to_data = torch.cdist(vq.embed, flat).min(-1).values
    assert (dist_to_data < 1e-4).sum() >= 7
    assert (vq.unused_steps == 0).all()


def test_vq_l2_normalised_codes_have_unit_norm_and_projection():
    torch.manual_seed(0)
    cfg = QuantizerConfig(kind="vq", codebook_size=32, codebook_dim=4, l2_normalize=True)
    vq = build_quantizer(cfg, dim=12)
    vq.train()
    q, codes, _ = vq(torch.randn(2, 9, 12))
    assert q.shape == (2, 9, 12)
    torch.testing.assert_close(vq.embed.norm(dim=-1), torch.ones(32), rtol=0, atol=1e-5)
    assert vq.decode(codes).shape == (2, 9, 12)


def test_whitening_is_refused_for_other_kinds():
    for kind in ("vq", "none"):
        with pytest.raises(CosyError, match="whiten"):
            build_quantizer(QuantizerConfig(kind=kind, whiten=True), dim=8)


def test_none_quantizer_is_identity_and_refuses_to_encode():
    q = build_quantizer(QuantizerConfig(kind="none"), dim=4)
    x = torch.randn(1, 3, 4)
    out, codes, losses = q(x)
    assert out is x and codes is None and losses == {}
    with pytest.raises(CosyError, match="'none'"):
        q.encode(x)


def test_codebook_usage_statistics():
    stats = codebook_usage(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), codebook_size=8)
    assert stats["used_fraction"] == 0.5
    assert stats["entropy_bits"] == pytest.approx(2.0, abs=1e-9)
    assert stats["perplexity"] == pytest.approx(4.0, abs=1e-9)
    skewed = codebook_usage(torch.tensor([0] * 9 + [1]), codebook_size=2)
    assert 0 < skewed["entropy_bits"] < 1


def test_vq_statistics_stay_float32_under_autocast():
    torch.manual_seed(0)
    vq = VQ(dim=64, cfg=QuantizerConfig(kind="vq", codebook_size=512))
    vq.train()
    x = torch.randn(4, 100, 64)  # enough near-ties that a bf16 lookup would pick other codes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, codes, losses = vq(x)
    assert vq.embed.dtype == torch.float32 and losses["commit"].dtype == torch.float32
    # the lookup is the exact float32 nearest neighbour of the (pre-update) codebook
    torch.manual_seed(0)
    reference = VQ(dim=64, cfg=QuantizerConfig(kind="vq", codebook_size=512))
    assert codes.equal(reference.encode(x))
