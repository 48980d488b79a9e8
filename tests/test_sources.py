"""Calibration mixes (calibration/sources.py): spelling, self-generated text and its cache, determinism,
and the EVAL articles never entering calibration through any source."""

from types import SimpleNamespace

import pytest
import torch

from dbquant.calibration import sources
from dbquant.calibration.sources import SelfGenConfig, mix_sampler, parse_mix, split_counts
from dbquant.errors import DbquantError
from dbquant.eval import data
from dbquant.quantize import AUTO_CHAT_MIX, QuantizeOptions, quantize

from .conftest import TINY_TEXT, make_tiny_model

torch.set_num_threads(1)

SMALL_SELF = SelfGenConfig(count=4, length=20, prompt_len=5, temperature=1.0, seed=3, batch_size=3)
# A ChatML-like template (what SmolLM2-Instruct's is) for the tiny tokenizer.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


@pytest.fixture
def chat_tokenizer(tiny_tokenizer, monkeypatch):
    """The tiny tokenizer with a chat template (undone after the test: the fixture is session-wide)."""
    monkeypatch.setattr(tiny_tokenizer, "chat_template", CHAT_TEMPLATE, raising=False)
    return tiny_tokenizer


def test_parse_mix_spellings(tmp_path):
    assert parse_mix("wiki") == [("wiki", 1.0)]
    assert parse_mix("hf:name:config:train") == [("hf:name:config:train", 1.0)]
    assert parse_mix("wiki:0.5,self:0.5") == [("wiki", 0.5), ("self", 0.5)]
    assert parse_mix("wiki:3,notes.txt:1") == [("wiki", 0.75), ("notes.txt", 0.25)]
    odd = tmp_path / "a,b:1.txt"  # an existing path is one source, whatever it holds
    odd.write_text("x")
    assert parse_mix(str(odd)) == [(str(odd), 1.0)]
    for bad in ("wiki:0.5,self", "wiki:0,self:1", "wiki:1,wiki:2"):
        with pytest.raises(DbquantError, match="--calib"):
            parse_mix(bad)
    with pytest.raises(DbquantError, match="ratio"):
        QuantizeOptions(calib="wiki:1,self").check()
    with pytest.raises(DbquantError, match="prompt_len"):
        QuantizeOptions(calib="wiki:1,self:1", calib_self_len=4, calib_self_prompt_len=8).check()


@pytest.mark.parametrize("n,shares", [(10, [0.5, 0.5]), (7, [0.25, 0.75]), (5, [1 / 3] * 3), (1, [0.9, 0.1])])
def test_split_counts_sum_and_proportion(n, shares):
    counts = split_counts(n, shares)
    assert sum(counts) == n
    assert all(abs(c - n * s) < 1 for c, s in zip(counts, shares))


# ---------------------------------------------------------------- EVAL never in calibration

CANARY = "@# " * 120  # characters the calibration articles never hold


@pytest.fixture
def canary_wiki(monkeypatch, tmp_path):
    """The wiki text replaced by 20 articles whose EVAL ones (i % 5 == 4) are made of canary characters."""
    words = TINY_TEXT.split()
    articles = [CANARY if i % 5 == 4 else " ".join(words[i:] + words[:i]) for i in range(20)]
    monkeypatch.setattr(data, "wiki_articles", lambda: articles)
    other = tmp_path / "other.txt"
    other.write_text(TINY_TEXT.lower())
    return str(other)


def _canary_ids(tokenizer) -> set[int]:
    return {i for i in range(len(tokenizer)) if set(tokenizer.decode([i])) & set("@#")}


def _echo_prompts(seen: list):
    """A stand-in for generate_self: the 'generated' text is the prompts repeated (a random model's
    samples could hold any token; the prompts are what the calibration split gives generation)."""
    def fake(model, prompts, cfg, device="cpu", progress=True):
        seen.append(prompts.clone())
        return prompts.repeat(1, -(-cfg.length // prompts.shape[1]))[:, : cfg.length]
    return fake


def _echo_chat(seen: list):
    """A stand-in for generate_chat: each 'conversation' is its prompt (the request built from calibration text)."""
    def fake(model, tokenizer, prompts, cfg, device="cpu", progress=True):
        seen.append(torch.cat(prompts))
        return torch.cat(prompts)
    return fake


@pytest.mark.parametrize("spec", ["wiki", "self", "wiki:0.5,self:0.5", "wiki:0.7,OTHER:0.3",
                                  "self:0.2,OTHER:0.8", "chat", "wiki:0.5,chat:0.5", "chat:0.5,OTHER:0.5"])
def test_eval_articles_never_enter_calibration(canary_wiki, chat_tokenizer, monkeypatch, spec):
    tiny_tokenizer = chat_tokenizer
    canary = _canary_ids(tiny_tokenizer)
    eval_ids = data.token_stream(tiny_tokenizer, data.load_text("wiki", "eval")).tolist()
    # the test can fail: most EVAL tokens are canary tokens (the rest are spaces and blank lines)
    assert sum(i in canary for i in eval_ids) > 0.5 * len(eval_ids)
    seen = []
    monkeypatch.setattr(sources, "generate_self", _echo_prompts(seen))
    monkeypatch.setattr(sources, "generate_chat", _echo_chat(seen))
    sampler = mix_sampler(make_tiny_model(vocab_size=len(tiny_tokenizer)), tiny_tokenizer,
                          spec.replace("OTHER", canary_wiki), SMALL_SELF, progress=False)
    for seed in range(3):
        windows = sampler(60, 12, seed)
        assert not set(windows.flatten().tolist()) & canary, (spec, seed)
    if "self" in spec or "chat" in spec:  # the prompts of generated text come from the calibration split too
        assert len(seen) == 1 and not set(seen[0].flatten().tolist()) & canary


def test_real_wiki_eval_articles_absent_from_calibration_text():
    calib = "\n\n".join(data.load_text("wiki", "calibration"))
    evals = data.load_text("wiki", "eval")
    assert len(evals) == 21
    for article in evals:
        middle = article[len(article) // 2 - 100: len(article) // 2 + 100]
        assert middle in article and middle not in calib


# ---------------------------------------------------------------- self-generated text

@pytest.fixture
def small_wiki(monkeypatch):
    """The real wiki articles, cut to the first 15 (both splits) so the tiny tokenizer is quick."""
    articles = data.wiki_articles()[:15]
    monkeypatch.setattr(data, "wiki_articles", lambda: articles)


def test_wiki_self_mix_is_deterministic_under_a_seed(small_wiki, tiny_tokenizer):
    def windows(seed):
        model = make_tiny_model(vocab_size=len(tiny_tokenizer))  # a fresh model and sampler each time
        return mix_sampler(model, tiny_tokenizer, "wiki:0.5,self:0.5", SMALL_SELF, progress=False)(10, 12, seed)

    a, b, c = windows(0), windows(0), windows(1)
    assert a.shape == (10, 12) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_self_windows_take_their_share(small_wiki, tiny_tokenizer, monkeypatch):
    seen = []
    real = sources.generate_self
    monkeypatch.setattr(sources, "generate_self", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    model = make_tiny_model(vocab_size=len(tiny_tokenizer))
    windows = mix_sampler(model, tiny_tokenizer, "wiki:0.5,self:0.5", SMALL_SELF, progress=False)(10, 12, 0)
    stream = sources.joined_stream(tiny_tokenizer, seen[0]).tolist()
    grams = {tuple(stream[i:i + 12]) for i in range(len(stream) - 11)}
    assert sum(tuple(w) in grams for w in windows.tolist()) == 5


def test_generation_is_seeded_per_sequence(tiny_tokenizer):
    model = make_tiny_model(vocab_size=len(tiny_tokenizer))
    prompts = torch.randint(0, 300, (5, 4), generator=torch.Generator().manual_seed(0))

    def gen(**kw):
        return sources.generate_self(model, prompts, SelfGenConfig(**{"count": 5, "length": 16, "prompt_len": 4,
                                                                      **kw}), progress=False)

    a = gen(batch_size=5)
    assert a.shape == (5, 16) and torch.equal(a[:, :4], prompts)
    assert torch.equal(a, gen(batch_size=2))  # batching does not change the tokens
    assert not torch.equal(a, gen(batch_size=5, seed=1))
    assert not torch.equal(a, gen(batch_size=5, temperature=0.2))


def test_self_text_cache_reused_refused_replaced(tmp_path, tiny_tokenizer, monkeypatch):
    model = make_tiny_model(vocab_size=len(tiny_tokenizer))
    stream = torch.arange(200) % 290
    first = sources.self_text(model, stream, SMALL_SELF, tmp_path, progress=False)
    assert (tmp_path / sources.SELF_CACHE).is_file()

    def no_generation(*a, **k):
        raise AssertionError("regenerated although the cache matched")

    monkeypatch.setattr(sources, "generate_self", no_generation)
    again = sources.self_text(model, stream, SMALL_SELF, tmp_path, resume=True, progress=False)
    assert torch.equal(first, again)
    hotter = SelfGenConfig(**{**SMALL_SELF.__dict__, "temperature": 2.0})
    with pytest.raises(DbquantError, match="temperature"):
        sources.self_text(model, stream, hotter, tmp_path, resume=True, progress=False)
    monkeypatch.undo()
    replaced = sources.self_text(model, stream, hotter, tmp_path, resume=False, progress=False)
    assert replaced.shape == first.shape and not torch.equal(replaced, first)


# ---------------------------------------------------------------- chat: the fp model's answers

def test_chat_requests_come_from_the_articles_and_are_seeded():
    texts = data.load_text("wiki", "calibration")[:10]
    cfg = SelfGenConfig(count=12, seed=5)
    reqs = sources.chat_requests(texts, cfg)
    assert len(reqs) == 12 and reqs == sources.chat_requests(texts, cfg)
    assert reqs != sources.chat_requests(texts, SelfGenConfig(count=12, seed=6))
    body = "\n".join(texts)
    for r in reqs:  # every request is a template around a subject or sentences of the calibration text
        t = next(t for t in sources.CHAT_REQUESTS if r.startswith(t.split("{")[0]))
        quoted = r[len(t.split("{")[0]):len(r) - len(t.split("}")[1])]
        assert quoted and quoted.split(". ")[0] in body, r
    with pytest.raises(DbquantError, match="sentence"):
        sources.chat_requests(["short", "no"], cfg)


def test_chat_conversations_end_with_eos_and_are_seeded_per_conversation(chat_tokenizer):
    model = make_tiny_model(vocab_size=len(chat_tokenizer))
    prompts = sources.chat_prompts(chat_tokenizer, ["What is a cat?", "Tell me about dogs and their many friends."])
    eos = chat_tokenizer.eos_token_id

    def gen(**kw):
        cfg = SelfGenConfig(**{"count": 2, "length": 40, **kw})
        return sources.generate_chat(model, chat_tokenizer, prompts, cfg, progress=False)

    a = gen(batch_size=2)
    ends = (a == eos).nonzero().flatten().tolist()
    assert len(ends) >= 2 and ends[-1] == len(a) - 1  # one EOS at least per conversation, the last token is one
    first = a[: ends[0] + 1]  # the first conversation starts with its prompt, left padding removed
    assert torch.equal(first[: len(prompts[0])], prompts[0]) and len(first) <= 41
    assert torch.equal(a, gen(batch_size=1))  # per-conversation generators: batching does not change tokens
    assert not torch.equal(a, gen(batch_size=2, seed=1))


def test_chat_needs_a_chat_template(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(tiny_tokenizer, "chat_template", None, raising=False)
    with pytest.raises(DbquantError, match="chat template"):
        sources.chat_prompts(tiny_tokenizer, ["What is a cat?"])


def test_chat_needs_a_template_and_an_eos_token_and_auto_follows():
    """One predicate (`chat_unsupported`) for the chat generator and for `--calib auto`."""
    fine = SimpleNamespace(chat_template="{{ x }}", eos_token_id=2)
    no_eos = SimpleNamespace(chat_template="{{ x }}", eos_token_id=None)
    assert sources.chat_unsupported(fine) is None
    assert "EOS token" in sources.chat_unsupported(no_eos)
    assert "chat template" in sources.chat_unsupported(SimpleNamespace(eos_token_id=2))
    with pytest.raises(DbquantError, match="EOS token"):
        sources.chat_prompts(no_eos, ["What is a cat?"])
    opts = QuantizeOptions(preset="fast")
    assert opts.with_calib(fine).calib == AUTO_CHAT_MIX and opts.with_calib(no_eos).calib == "wiki"


def test_chat_text_cache_reused_and_refused_on_resume(tmp_path, chat_tokenizer, monkeypatch):
    model = make_tiny_model(vocab_size=len(chat_tokenizer))
    texts = data.load_text("wiki", "calibration")[:5]
    cfg = SelfGenConfig(count=3, length=24, seed=2)
    first = sources.chat_text(model, chat_tokenizer, texts, cfg, tmp_path, progress=False)
    assert (tmp_path / sources.CACHE_FILES["chat"]).is_file()
    monkeypatch.setattr(sources, "generate_chat", lambda *a, **k: pytest.fail("regenerated a matching cache"))
    assert torch.equal(first, sources.chat_text(model, chat_tokenizer, texts, cfg, tmp_path, resume=True,
                                                progress=False))
    with pytest.raises(DbquantError, match="seed"):
        sources.chat_text(model, chat_tokenizer, texts, SelfGenConfig(count=3, length=24, seed=9), tmp_path,
                          resume=True, progress=False)


def test_calib_auto_adds_chat_only_where_fdb_dad_trains_a_chat_model(tiny_tokenizer, chat_tokenizer):
    """--calib auto (the default): the chat mix for an instruction-tuned model that fdb-dad trains;
    wiki for a base model, a VLM, for the init-only methods, without training stages and under --streaming.
    A source given explicitly is kept."""
    assert QuantizeOptions().calib == "auto"
    assert QuantizeOptions(preset="fast").with_calib(chat_tokenizer).calib == AUTO_CHAT_MIX == "wiki:0.75,chat:0.25"
    assert QuantizeOptions(preset="fast").with_calib(chat_tokenizer, streaming=True).calib == "wiki"
    for opts in (QuantizeOptions(method="fdb"), QuantizeOptions(method="rtn"),
                 QuantizeOptions(blockwise=False, dad=False)):
        assert opts.with_calib(chat_tokenizer).calib == "wiki", opts
    for calib in ("wiki", "self", None, "wiki:0.5,chat:0.5"):
        assert QuantizeOptions(calib=calib).with_calib(chat_tokenizer).calib == calib
    vlm = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace()))  # is_vlm reads only this
    assert QuantizeOptions(preset="fast").with_calib(chat_tokenizer, vlm).calib == "wiki"
    assert QuantizeOptions(preset="fast").with_calib(chat_tokenizer, make_tiny_model()).calib == AUTO_CHAT_MIX


def test_calib_auto_is_wiki_without_a_chat_template(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(tiny_tokenizer, "chat_template", None, raising=False)
    assert QuantizeOptions(preset="fast").with_calib(tiny_tokenizer).calib == "wiki"


def test_quantize_trains_on_the_chat_mix_auto_resolves_to(chat_tokenizer, small_wiki, tmp_path):
    """The run's report (and so its fingerprint) holds the resolved mix, and the chat text was
    generated and cached in the work dir."""
    model = make_tiny_model(vocab_size=len(chat_tokenizer))
    opts = QuantizeOptions(preset="fast", bw_samples=4, bw_seq_len=32, bw_steps=1, dad_samples=4, dad_seq_len=32,
                           dad_steps=1, calib_self_samples=3, calib_self_len=40, work_dir=str(tmp_path / "w"))
    report = quantize(model, chat_tokenizer, opts, progress=False)
    assert report["options"]["calib"] == AUTO_CHAT_MIX
    assert (tmp_path / "w" / sources.CACHE_FILES["chat"]).is_file()
