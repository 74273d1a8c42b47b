"""Speech-token LM: loss, cached/batched/streaming decoding, both backbones, task, errors."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cosy import config
from cosy.errors import CosyError
from cosy.llm import LLM, LLMConfig, SamplingConfig
from cosy.llm.decode import Decoder, generate, stream
from cosy.llm.task import TASK
from cosy.modules import EncoderConfig

ATOL = 1e-5  # float32 noise between cached and full passes of these tiny models
GREEDY = SamplingConfig(greedy=True)
RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def tiny_config(**kw) -> LLMConfig:
    def enc(input_size, layer):
        return EncoderConfig(input_size=input_size, d_model=32, n_heads=4, ffn_dim=64, n_layers=2, layer=layer,
                             input_layer="linear" if layer == "conformer" else "linear_legacy", causal=True,
                             dropout=0.0, positional_dropout=0.0, max_len=256)

    base = dict(text_vocab=40, text_embed_dim=16, speech_vocab=24, spk_embed_dim=8, max_text_len=20,
                text_encoder=enc(16, "conformer"), lm=enc(24, "transformer"), max_token_text_ratio=3.0)
    base.update(kw)
    return LLMConfig(**base)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import Qwen2Config

    path = tmp_path_factory.mktemp("qwen2")
    Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, vocab_size=40, max_position_embeddings=256).save_pretrained(path)
    return str(path)


def build(backbone: str, hf_dir: str, seed: int = 0, **kw) -> LLM:
    torch.manual_seed(seed)
    cfg = tiny_config(backbone=backbone, hf_dir=hf_dir if backbone == "hf" else "", **kw)
    return LLM(cfg).eval()


def ragged(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    padded = torch.zeros(len(rows), max(max(lengths.tolist()), 1), dtype=torch.long)
    for b, r in enumerate(rows):
        padded[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return padded, lengths


ITEMS = [  # (text, prompt text, prompt speech) of different lengths
    ([3, 7, 9, 11], [5, 6], [1, 2, 3]),
    ([8, 2], [], []),
    ([4, 4, 5, 6, 7, 1], [9], [7, 8, 9, 10, 11]),
]


def inputs(items):
    text, prompt_text, prompt_speech = (ragged([item[i] for item in items]) for i in range(3))
    # each item's speaker vector depends on the item only, so that items compare across batches
    seeds = [sum(item[0]) * 31 + len(item[0]) for item in items]
    embedding = torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    return (*text, *prompt_text, *prompt_speech, embedding)


@torch.no_grad()
@pytest.mark.parametrize("backbone", ["transformer", "hf"])
def test_cached_step_logits_equal_full_pass(backbone, hf_dir):
    model = build(backbone, hf_dir)
    x, lengths = model.prepare(*inputs(ITEMS))
    cached = Decoder(model, x, lengths, capacity=40)
    uncached = Decoder(model, x, lengths, capacity=40, use_cache=False)
    speech = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]])
    for step in range(speech.size(1)):
        assert torch.allclose(cached.logits(), uncached.logits(), atol=ATOL)
        active = torch.tensor([True, step < 2, True])  # row 1 stops early: its state must not move
        cached.push(speech[:, step], active)
        uncached.push(speech[:, step], active)
    assert torch.allclose(cached.logits(), uncached.logits(), atol=ATOL)
    # the last full pass: one sequence per row, checked against the row alone (no batch)
    x1, len1 = model.prepare(*inputs(ITEMS[2:]))
    full = model.head(model.hidden(torch.cat([x1, model.speech_embedding(speech[2:])], 1), len1 + 4))
    assert torch.allclose(cached.logits()[2], full[0, -1], atol=ATOL)


@pytest.mark.parametrize("backbone", ["transformer", "hf"])
def test_batched_greedy_equals_each_item_alone(backbone, hf_dir):
    model = build(backbone, hf_dir, seed=3)
    batched = generate(model, *inputs(ITEMS), sampling=GREEDY)
    for b, item in enumerate(ITEMS):
        alone = generate(model, *inputs([item]), sampling=GREEDY)[0]
        assert batched[b] == alone
        assert 2 * len(item[0]) <= len(alone) <= 3 * len(item[0])


def test_seeded_sampling_is_reproducible_and_cache_independent(hf_dir):
    model = build("transformer", hf_dir)
    args = inputs(ITEMS)
    first = generate(model, *args, seed=7)
    assert generate(model, *args, seed=7) == first
    assert generate(model, *args, seed=7, use_cache=False) == first
    assert generate(model, *args, seed=8) != first
    assert all(0 <= t < 24 for row in first for t in row)


def test_stream_yields_each_token_as_drawn(hf_dir):
    model = build("transformer", hf_dir)
    args = inputs(ITEMS)
    steps = stream(model, *args, seed=2)
    first = next(steps)  # available before the rest of the sequence is decoded
    assert first.shape == (3,) and (first >= 0).all()
    rows = [[t] for t in first.tolist()]
    for tokens in steps:
        for b, t in enumerate(tokens.tolist()):
            if t >= 0:
                rows[b].append(t)
    assert rows == generate(model, *args, seed=2)


@pytest.mark.parametrize("eos_bias,limit", [(100.0, 2.0), (-100.0, 3.5)])
def test_min_and_max_length_are_ratios_of_text_length(eos_bias, limit, hf_dir):
    model = build("transformer", hf_dir, min_token_text_ratio=2.0, max_token_text_ratio=3.5)
    with torch.no_grad():
        model.head.bias[model.eos] = eos_bias  # eos as soon as allowed (min ratio) / never (max ratio)
    rows = generate(model, *inputs(ITEMS), seed=0)
    assert [len(r) for r in rows] == [math.floor(limit * len(item[0])) for item in ITEMS]


def test_loss_is_length_normalised_cross_entropy(hf_dir):
    model = build("transformer", hf_dir)
    batch = {"text_token": torch.tensor([[1, 2, 3], [4, 5, 0]]), "text_token_len": torch.tensor([3, 2]),
             "speech_token": torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]]), "speech_token_len": torch.tensor([4, 2]),
             "embedding": torch.randn(2, 8)}
    out = model(batch)
    text = model.encode_text(batch["text_token"], batch["text_token_len"])
    x, lengths, prefix = model.assemble(text, batch["text_token_len"], model.speaker(batch["embedding"]),
                                        model.speech_embedding(batch["speech_token"]), batch["speech_token_len"])
    logits = model.head(model.hidden(x, lengths))
    assert prefix.tolist() == [6, 5]  # sos, speaker, text, task
    # targets of row 0: speech tokens then eos at positions 5..9
    expected = torch.cat([F.cross_entropy(logits[0, 5:10], torch.tensor([1, 2, 3, 4, 24]), reduction="sum")[None],
                          F.cross_entropy(logits[1, 4:7], torch.tensor([5, 6, 24]), reduction="sum")[None]])
    assert abs(out["loss"].item() - expected.sum().item() / 8) < 1e-5
    model.cfg.length_normalized_loss = False
    assert abs(model(batch)["loss"].item() - expected.sum().item() / 2) < 1e-4
    model.cfg.label_smoothing = 0.1
    assert abs(model(batch)["loss"].item() - expected.sum().item() / 2) > 1e-3
    out["loss"].backward()
    assert model.spk_proj.weight.grad.abs().sum() > 0 and model.text_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone", ["transformer", "hf"])
def test_bf16_autocast_tracks_fp32(backbone, hf_dir):
    """The recipes train the LM under bf16 autocast."""
    from precision import assert_bf16_tracks_fp32

    model = build(backbone, hf_dir).train()
    text, text_len, _, _, speech, speech_len, embedding = inputs(ITEMS)
    assert_bf16_tracks_fp32(model, {"text_token": text, "text_token_len": text_len, "speech_token": speech,
                                    "speech_token_len": speech_len, "embedding": embedding})


@pytest.mark.parametrize("backbone", ["transformer", "hf"])
def test_tiny_model_overfits_and_decodes_its_tokens(backbone, hf_dir):
    model = build(backbone, hf_dir, seed=4, max_token_text_ratio=4.0).train()
    pairs = [([3, 5, 7], [1, 4, 4, 9, 2, 2, 8]), ([6, 2], [10, 11, 3, 3, 12]), ([9, 9, 1, 4], [5, 6, 7, 8, 20, 21, 22, 1])]
    text, text_len = ragged([p[0] for p in pairs])
    speech, speech_len = ragged([p[1] for p in pairs])
    embedding = torch.randn(3, 8)
    batch = {"text_token": text, "text_token_len": text_len, "speech_token": speech,
             "speech_token_len": speech_len, "embedding": embedding}
    optim = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(batch)["loss"]
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    assert loss.item() < 0.05
    decoded = generate(model, text, text_len, embedding=embedding, sampling=GREEDY)
    assert decoded == [p[1] for p in pairs]


def test_input_errors_name_the_problem(hf_dir):
    model = build("transformer", hf_dir)
    with pytest.raises(CosyError, match="empty text"):
        model.prepare(*inputs([([], [], [])]))
    with pytest.raises(CosyError, match="max_text_len"):
        model.prepare(*inputs([(list(range(1, 16)), list(range(1, 8)), [])]))
    with pytest.raises(CosyError, match="speech vocabulary of 24"):
        model.prepare(*inputs([([1, 2], [], [3, 24])]))
    short = build("transformer", hf_dir, lm=tiny_config().lm.__class__(**{**vars(tiny_config().lm), "max_len": 30}))
    with pytest.raises(CosyError, match="text too long"):
        generate(short, *inputs([(list(range(1, 15)), [], [])]))
    with pytest.raises(CosyError, match="text_encoder.input_size"):
        LLM(tiny_config(text_embed_dim=8))
    with pytest.raises(CosyError, match="hf_dir"):
        LLM(tiny_config(backbone="hf", hf_dir="/nonexistent"))


def test_hf_backbone_loads_checkpoint_weights(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    source = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, vocab_size=40))
    source.save_pretrained(tmp_path)
    model = LLM(tiny_config(backbone="hf", hf_dir=str(tmp_path)))
    assert torch.equal(model.lm.model.layers[0].self_attn.q_proj.weight, source.model.layers[0].self_attn.q_proj.weight)
    assert model.head.out_features == 25 and model.speech_embedding.weight.shape == (24, 32)


def test_task_tokenises_filters_and_collates(tmp_path):
    from cosy.text.bpe import TextTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\nthe cat sat on the mat\n" * 20)
    tokenizer = TextTokenizer.train([corpus], vocab_size=300)
    tokenizer.save(tmp_path / "tokenizer.json")
    cfg = tiny_config(text_vocab=300, tokenizer=str(tmp_path / "tokenizer.json"))
    [process] = TASK.processors(cfg, True)
    rows = [{"utt": "a", "text": "hello world", "speech_token": [1, 2, 3], "embedding": [0.5] * 8},
            {"utt": "b", "text": "the cat", "speech_token": [4, 5], "embedding": [1.0] * 8}]
    processed = [process(r) for r in rows]
    assert processed[0]["text_token"] == tokenizer.encode("hello world")
    assert process({**rows[0], "speech_token": None}) is None
    assert process({**rows[0], "embedding": None}) is None
    with pytest.raises(CosyError, match="utterance a: speech token 30"):
        process({**rows[0], "speech_token": [1, 30]})
    batch = TASK.collate(processed)
    assert batch["speech_token"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["speech_token_len"].tolist() == [3, 2] and batch["embedding"].shape == (2, 8)
    assert TASK.num_frames(processed[1]) == len(processed[1]["text_token"]) + 2
    assert torch.isfinite(TASK.build(cfg)(batch)["loss"])
    with pytest.raises(CosyError, match="model.text_vocab"):
        TASK.processors(tiny_config(text_vocab=100, tokenizer=str(tmp_path / "tokenizer.json")), True)
    with pytest.raises(CosyError, match="model.tokenizer"):
        TASK.processors(tiny_config(), True)


@pytest.mark.parametrize("path", ["mini/conf/llm_tiny.yaml", "libritts/conf/llm_v1.yaml"])
def test_recipe_configs_map_onto_llm_config(path):
    data = config.load_yaml(RECIPES / path)
    assert data["task"] == "llm"
    cfg = config.from_dict(LLMConfig, data["model"], "model")
    assert cfg.lm.causal and cfg.text_encoder.input_size == cfg.text_embed_dim
    if "v1" in path:  # the defaults are the published sizes, checked against the reference key listing
        assert config.to_dict(cfg) == config.to_dict(LLMConfig())
    else:
        torch.manual_seed(0)
        batch = {"text_token": torch.tensor([[5, 6, 7]]), "text_token_len": torch.tensor([3]),
                 "speech_token": torch.tensor([[1, 2]]), "speech_token_len": torch.tensor([2]),
                 "embedding": torch.randn(1, cfg.spk_embed_dim)}
        assert torch.isfinite(LLM(cfg)(batch)["loss"])


def test_trains_through_the_common_trainer_on_shards(tmp_path):
    import yaml

    from cosy import cli
    from cosy.text.bpe import TextTokenizer
    from cosy.train.checkpoint import Checkpoints
    from toy_task import make_rows, write_shards

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ok fine good\n" * 20)
    TextTokenizer.train([corpus], vocab_size=280).save(tmp_path / "tokenizer.json")
    train = write_shards(tmp_path / "train", make_rows(12, dim=8, vocab=24), 6)
    cv = write_shards(tmp_path / "cv", make_rows(4, seed=1, prefix="cv", dim=8, vocab=24), 4)
    model = config.to_dict(tiny_config(text_vocab=280, tokenizer=str(tmp_path / "tokenizer.json")))
    conf = tmp_path / "llm.yaml"
    conf.write_text(yaml.safe_dump({"task": "llm", "model": model, "data": {"batch_type": "static", "batch_size": 4},
                                    "train": {"max_steps": 3, "log_every": 1}}))
    out = tmp_path / "exp"
    args = ["train", "--config", str(conf), "--train-data", str(train), "--cv-data", str(cv), "--out", str(out)]
    assert cli.main(args) == 0
    assert Checkpoints(out).latest().step == 3
    assert "loss=" in (out / "train.log").read_text()


def test_sampling_options_shape_the_candidates():
    from cosy.llm.sampling import exponential_draws, nucleus, sample

    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0])
    probs = torch.softmax(logits, 0)
    assert nucleus(probs, top_p=1.0, top_k=3)[0].tolist() == [1, 3, 2]  # top-k binds
    # sorted probabilities 0.55, 0.34, 0.07, ...: the token that crosses top_p is included
    assert nucleus(probs, top_p=0.5, top_k=5)[0].tolist() == [1]
    assert nucleus(probs, top_p=0.8, top_k=5)[0].tolist() == [1, 3]
    draws = exponential_draws(torch.Generator().manual_seed(0))
    cold = SamplingConfig(temperature=1e-3, tau=0.0)
    assert {sample(logits, [1] * 10, cold, draws) for _ in range(20)} == {1}  # near-greedy, no fallback
    ras = SamplingConfig(temperature=1e-3)
    assert 1 not in {sample(logits, [1], ras, draws) for _ in range(20)}  # repeated token is re-drawn
    picks = {sample(logits, [], SamplingConfig(top_k=2, top_p=1.0, tau=0.0), draws) for _ in range(200)}
    assert picks == {1, 3}
