"""What an invoke sees of its own inputs, against each prompt run alone through plain transformers.

Every module's inputs and outputs are read in every invoke of a padded batch, and compared, row by
row, with a hooked forward of that row's prompt alone (unpadded): hidden states, logits, attention
weights [batch, heads, query, key] (eager attention), 4-D attention masks, position ids, rotary
tables. The shapes are chosen so that the padded length coincides with the number of heads, the
model width, the head width and the batch size, the coincidences a shape rule could fall for.
Then: keyword inputs and attention masks (right padding too), and input errors.
"""
import random
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import nnpatch
from conftest import VOCAB, all_hooks, prompt, word_tokenizer
from nnpatch.engine import compile_source
from nnpatch.engine.inputs import token_id
from nnpatch.errors import NNPatchTypeError, NNPatchValueError


def eager(arch, d=16, heads=4, kv_heads=2, n_layer=2, seed=0, context=64):
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=n_layer, n_embd=d, n_head=heads, vocab_size=VOCAB, n_positions=context,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0, attn_implementation="eager")
        return GPT2LMHeadModel(cfg).eval()
    cfg = LlamaConfig(num_hidden_layers=n_layer, hidden_size=d, intermediate_size=2 * d,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=VOCAB,
                      max_position_embeddings=context, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg).eval()


# -- the reference: one prompt alone, every module's inputs and outputs ------------------------------

def _copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v) for v in value)
    if isinstance(value, dict) or hasattr(value, "to_tuple"):
        return {k: _copy(v) for k, v in dict(value).items()}
    return value


def alone(hf, ids):
    """{(path, "input" | "output"): value} of a plain forward of one prompt (a list of ids), and the
    order the events happen in (modules called once only)."""
    record, order, calls, handles = {}, [], {}, []
    for name, module in hf.named_modules():
        def pre(m, args, kwargs, name=name):
            calls[name] = calls.get(name, 0) + 1
            order.append((name, "input"))
            record[name, "input"] = _copy((args, kwargs))

        def post(m, args, kwargs, out, name=name):
            order.append((name, "output"))
            record[name, "output"] = _copy(out)
        handles += [module.register_forward_pre_hook(pre, with_kwargs=True),
                    module.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            hf(input_ids=torch.tensor([ids]), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return record, [e for e in order if calls[e[0]] == 1]


def envoy_at(model, path):
    envoy = model
    for part in path.split(".") if path else []:
        envoy = getattr(envoy, part)
    return envoy


def read_all(model, events):
    """Inside an invoke: every event's value as this invoke sees it, in forward order."""
    return {(path, kind): _copy(envoy_at(model, path).output if kind == "output" else envoy_at(model, path).inputs)
            for path, kind in events}


def run_invokes(lm, invokes, events):
    """One trace, one invoke per entry of `invokes` ((args, kwargs) of tracer.invoke), each reading
    every event; returns what each invoke saw."""
    lines = ["with M.trace() as tracer:"]
    for k in range(len(invokes)):
        lines += [f"    with tracer.invoke(*INVOKES[{k}][0], **INVOKES[{k}][1]):",
                  f"        seen{k} = read_all(M, EVENTS)"]
    ns = {"M": lm, "INVOKES": invokes, "EVENTS": events, "read_all": read_all}
    exec(compile_source("\n".join(lines) + "\n", "<every-value>"), ns)
    return [ns[f"seen{k}"] for k in range(len(invokes))]


def leaves(value, path=()):
    if isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from leaves(v, path + (i,))
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from leaves(v, path + (k,))
    else:
        yield path, value


def compare_row(seen, ref, row, real, log):
    """Row `row` of every value an invoke saw against the prompt run alone; `real` are the row's
    token positions in the invoke's own layout. Dimensions whose size differs from the reference's
    are positions: only the real ones are compared. Every tensor of the reference must be there."""
    for event, ref_value in ref.items():
        got = dict(leaves(seen[event]))
        ref_leaves = dict(leaves(ref_value))
        for path, r in ref_leaves.items():
            if not isinstance(r, torch.Tensor):
                continue
            v = got.get(path)
            assert isinstance(v, torch.Tensor), (event, path)
            v = v[row:row + 1]
            for d in range(1, v.dim()):
                if v.dim() == r.dim() and v.shape[d] != r.shape[d]:
                    v = v.index_select(d, real)
            assert v.shape == r.shape, (event, path, tuple(v.shape), tuple(r.shape))
            if r.is_floating_point():
                assert torch.allclose(v, r, atol=1e-4, rtol=1e-4), (event, path)
            else:
                assert torch.equal(v, r), (event, path)
            log.append((event, path, tuple(r.shape)))
        for path, v in got.items():  # what the invoke sees beyond the reference: the padding mask
            if isinstance(v, torch.Tensor) and not isinstance(ref_leaves.get(path), torch.Tensor):
                assert path[-1] in ("attention_mask", "position_ids"), (event, path)


def attention_path(arch, layer=0):
    return f"transformer.h.{layer}.attn" if arch == "gpt2" else f"model.layers.{layer}.self_attn"


def check_every_value(hf, lm, arch, invokes, rows_of):
    """Run `invokes` batched; compare each invoke's every value with its prompts run alone.
    `rows_of[k]` lists invoke k's prompts as (token ids, real positions in the invoke's layout)."""
    refs = {}
    for rows in rows_of:
        for ids, _ in rows:
            refs.setdefault(tuple(ids), alone(hf, ids))
    events = next(iter(refs.values()))[1]
    seen = run_invokes(lm, invokes, events)
    for k, rows in enumerate(rows_of):
        for r, (ids, real) in enumerate(rows):
            log = []
            compare_row(seen[k], refs[tuple(ids)][0], r, torch.as_tensor(real), log)
            weights = [s for e, p, s in log if e == (attention_path(arch), "output") and p == (1,)]
            assert weights == [(1, hf.config.num_attention_heads, len(ids), len(ids))], weights
            assert len(log) > 40
    assert all_hooks(hf) == 0
    return seen


def ids_of(n, rng):
    return [rng.randrange(2, VOCAB) for _ in range(n)]


# Each case: model size and the prompt length of each invoke (one prompt per invoke).
CASES = {
    "heads == padded length": (dict(d=16, heads=4), [2, 4, 3]),
    # At the context limit the batch cannot be made longer, so the shapes coincide for real.
    "heads == padded length == context": (dict(d=16, heads=4, context=4), [2, 4, 3]),
    "head width == padded length == context": (dict(d=16, heads=4, context=4), [4, 1]),
    "d_model == padded length == context": (dict(d=8, heads=4, context=8), [3, 8]),
    "d_model == padded length": (dict(d=8, heads=4), [3, 8]),
    "head width == padded length": (dict(d=32, heads=4), [5, 8]),   # rotary tables [B, T, 8]
    "padded length == batch size": (dict(d=16, heads=2), [1, 3, 2]),
    "heads == padded length == batch size": (dict(d=16, heads=4), [4, 1, 2, 3]),
    "one-token prompts": (dict(d=16, heads=4), [1, 5, 1]),
    "only one-token prompts": (dict(d=16, heads=4), [1, 1]),
    "equal prompts, no padding": (dict(d=16, heads=4), [4, 4]),
}


@pytest.mark.parametrize("case", CASES)
def test_every_value_an_invoke_sees_equals_its_prompt_alone(arch, case, one_thread):
    size, lengths = CASES[case]
    hf = eager(arch, **size)
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    rng = random.Random(len(lengths))
    prompts = [ids_of(n, rng) for n in lengths]
    if case.startswith("equal"):
        prompts[1] = prompts[0]
    invokes = [((prompt(*[i - 2 for i in p]),), {}) for p in prompts]   # string prompts
    check_every_value(hf, lm, arch, invokes, [[(p, list(range(len(p))))] for p in prompts])


def test_equal_prompts_in_two_invokes_are_padded_alike(arch, one_thread):
    hf = eager(arch)
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    rng = random.Random(5)
    same, longer = ids_of(3, rng), ids_of(6, rng)
    invokes = [((same,), {}), ((longer,), {}), ((torch.tensor(same),), {})]   # lists and tensors
    seen = check_every_value(hf, lm, arch, invokes, [[(same, [0, 1, 2])], [(longer, list(range(6)))],
                                                     [(same, [0, 1, 2])]])
    for event in seen[0]:
        for (_, a), (_, b) in zip(leaves(seen[0][event]), leaves(seen[2][event])):
            assert not isinstance(a, torch.Tensor) or torch.equal(a, b), event


# -- tensors that are not [batch, pos, ...] ------------------------------------------------------------

class Toy(torch.nn.Module):
    """A language model without attention (each position computes alone), whose submodules see
    tensors of the layouts a shape rule must not cut by coincidence. With `config`, it says its
    head count and widths as a Hugging Face config does."""

    def __init__(self, d=8, heads=4, config=False):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(VOCAB, d)
        self.heads_first = torch.nn.Identity()   # [batch, heads, pos, head_dim]
        self.heads_last = torch.nn.Identity()    # [batch, pos, heads, head_dim]
        self.positions = torch.nn.Identity()     # [pos], no batch dimension
        self.head = torch.nn.Linear(d, VOCAB)
        if config:
            self.config = SimpleNamespace(num_attention_heads=heads, hidden_size=d)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        x = self.embed(input_ids)
        b, t, d = x.shape
        split = x.view(b, t, self.heads, d // self.heads)
        self.heads_first(split.transpose(1, 2))
        self.heads_last(split)
        self.positions(torch.arange(t))
        return self.head(x)


def toy_views(heads, config):
    """What a 2-token invoke batched with a 4-token one sees of the Toy, and the 2-token prompt's
    values alone."""
    torch.manual_seed(0)
    toy = Toy(d=8, heads=heads, config=config)
    lm = nnpatch.LanguageModel(toy, tokenizer=word_tokenizer())
    short, long = [5, 6], [7, 8, 9, 10]
    with lm.trace() as tracer:
        with tracer.invoke(short):
            first = lm.heads_first.output
            last = lm.heads_last.output
            pos = lm.positions.output
            logits = lm.output
        with tracer.invoke(long):
            long_logits = lm.output
    with torch.no_grad():
        split = toy.embed(torch.tensor([short])).view(1, 2, heads, 8 // heads)
        assert torch.allclose(logits, toy(torch.tensor([short])), atol=1e-6)   # [batch, pos, vocab]
        assert torch.allclose(long_logits, toy(torch.tensor([long])), atol=1e-6)
    return first, last, pos, split


def test_without_a_config_ambiguous_layouts_are_seen_whole():
    # heads == padded length (4): [batch, pos, heads, head_dim] and [batch, heads, pos, head_dim]
    # have the same shape [1, 4, 4, 2], so neither is cut; the invoke sees the batch's 4 positions
    # with the padding first, and its own tokens last.
    first, last, pos, split = toy_views(heads=4, config=False)
    assert first.shape == last.shape == (1, 4, 4, 2)
    assert torch.equal(first[:, :, 2:], split.transpose(1, 2)) and torch.equal(last[:, 2:], split)
    assert torch.equal(pos, torch.arange(4))                    # [pos]: not batched, whole


def test_without_a_config_key_value_layouts_are_seen_whole():
    first, last, pos, split = toy_views(heads=8, config=False)   # heads 8, head_dim 1
    assert first.shape == (1, 8, 4, 1) and torch.equal(first[:, :, 2:], split.transpose(1, 2))
    assert torch.equal(last, split)                              # [batch, pos, heads, head_dim]: cut


@pytest.mark.parametrize("heads", [4, 2])
def test_with_a_config_the_padded_length_avoids_head_sizes(heads):
    # The widest prompt has 4 tokens: heads == 4, or head_dim == 4 (which would make [batch,
    # heads, pos, head_dim] look like attention weights [batch, heads, query, key]). The batch is
    # padded to 5 positions instead, so the layouts are told apart.
    first, last, pos, split = toy_views(heads=heads, config=True)
    assert torch.equal(last, split)                              # [batch, pos, heads, head_dim]: cut
    assert first.shape == (1, heads, 5, 8 // heads)              # key/value layout: whole
    assert torch.equal(first[:, :, 3:], split.transpose(1, 2))
    assert torch.equal(pos, torch.arange(5))


def test_a_1d_tensor_as_long_as_the_batch_is_not_cut_into_rows():
    torch.manual_seed(0)
    toy = Toy()
    lm = nnpatch.LanguageModel(toy, tokenizer=word_tokenizer())
    with lm.trace() as tracer:                         # batch 2, length 2, no padding
        with tracer.invoke([5, 6]):
            pos = lm.positions.output
            logits = lm.output
        with tracer.invoke([7, 8]):
            pos_other = lm.positions.output
    assert torch.equal(pos, torch.arange(2)) and torch.equal(pos_other, torch.arange(2))
    with torch.no_grad():
        assert torch.allclose(logits, toy(torch.tensor([[5, 6]])), atol=1e-6)


# -- keyword inputs and attention masks ----------------------------------------------------------------

def test_keyword_inputs_and_right_padding(arch, one_thread):
    hf = eager(arch)
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    rng = random.Random(1)
    a, b, c, d = ids_of(5, rng), ids_of(3, rng), ids_of(6, rng), ids_of(2, rng)
    right = torch.tensor([a, b + [0, 0]])                                   # right-padded rows
    right_mask = torch.tensor([[1] * 5, [1] * 3 + [0, 0]])
    holed = torch.tensor([[d[0], 0, 0, d[1]]])                              # zeros anywhere are padding
    holed_mask = torch.tensor([[1, 0, 0, 1]])
    invokes = [((), {"input_ids": right, "attention_mask": right_mask}),
               ((c,), {}),
               ((holed,), {"attention_mask": holed_mask}),
               (({"input_ids": right, "attention_mask": right_mask},), {})]   # a tokenizer output
    seen = check_every_value(hf, lm, arch, invokes, [
        [(a, [0, 1, 2, 3, 4]), (b, [0, 1, 2])], [(c, list(range(6)))], [(d, [0, 3])],
        [(a, [0, 1, 2, 3, 4]), (b, [0, 1, 2])]])
    # The invoke keeps its own layout: row 1's third token is at position 2, as given.
    logits, ref = seen[0]["lm_head", "output"], alone(hf, b)[0]["lm_head", "output"]
    assert logits.shape[:2] == (2, 5) and torch.allclose(logits[1, 2], ref[0, 2], atol=1e-4)


def test_trace_with_keyword_inputs_equals_the_prompts_alone(arch):
    hf = eager(arch)
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    tok = word_tokenizer()
    texts = [prompt(3, 4, 5, 6, 7), prompt(8, 9)]
    enc = tok(texts, padding=True, return_tensors="pt")        # the tokenizer pads on the right
    assert enc["attention_mask"][1].tolist() == [1, 1, 0, 0, 0]
    with lm.trace(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]):
        logits = lm.output.logits
    with lm.trace(enc):
        logits_enc = lm.output.logits
    with lm.trace(tok(texts)):                                  # unpadded rows: nnpatch pads them
        logits_lists = lm.output.logits
    with torch.no_grad():
        ref = [hf(torch.tensor([tok(t)["input_ids"]])).logits[0] for t in texts]
    assert torch.allclose(logits[0], ref[0], atol=1e-4)
    assert torch.allclose(logits[1, :2], ref[1], atol=1e-4)    # its tokens where it gave them
    assert torch.equal(logits, logits_enc)
    assert torch.allclose(logits_lists[0], ref[0], atol=1e-4)
    assert torch.allclose(logits_lists[1, 3:], ref[1], atol=1e-4)   # left-padded by nnpatch


# -- input errors --------------------------------------------------------------------------------------

def test_input_errors_name_the_input_and_leave_the_model_as_it_was(arch):
    hf = eager(arch)
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    ok = prompt(3, 4, 5)
    with torch.no_grad():
        before = hf(torch.tensor([[5, 6, 7]])).logits
    limit = "n_positions" if arch == "gpt2" else "max_position_embeddings"
    cases = [
        # (the input, the class, words the message must hold)
        (((prompt(*[i % 50 for i in range(65)]),), {}), NNPatchValueError, ["65 tokens", "64 tokens", limit]),
        (((list(range(2, 40)) * 2,), {}), NNPatchValueError, ["76 tokens", "64 tokens"]),
        ((([3, 4, 60],), {}), NNPatchValueError, ["token id 60", "position 2", "60 tokens"]),
        ((([3, -1],), {}), NNPatchValueError, ["token id -1", "position 1"]),
        (((torch.tensor([[3.0, 4.0]]),), {}), NNPatchTypeError, ["float32", "(1, 2)"]),
        (((torch.tensor([[3, 4]]) > 3,), {}), NNPatchTypeError, ["bool"]),
        (((torch.ones(1, 2, 3, dtype=torch.long),), {}), NNPatchValueError, ["(1, 2, 3)"]),
        ((([[3.0, 4]],), {}), NNPatchTypeError, ["float", "3.0"]),
        ((("",), {}), NNPatchValueError, ["''", "no tokens"]),
        ((([],), {}), NNPatchValueError, ["empty"]),
        ((([[]],), {}), NNPatchValueError, ["no tokens"]),
        (((torch.zeros(1, 0, dtype=torch.long),), {}), NNPatchValueError, ["no tokens", "(1, 0)"]),
        (((torch.zeros(0, dtype=torch.long),), {}), NNPatchValueError, ["no tokens"]),
        ((("t3 hello t4 wrld",), {}), NNPatchValueError, ["'hello'", "'wrld'", "<pad>"]),
        (((ok,), {"foo": 1}), NNPatchTypeError, ["'foo'"]),
        (((ok,), {"input_ids": [3]}), NNPatchTypeError, ["input_ids"]),
        (((ok, ok), {}), NNPatchTypeError, ["2 positional"]),
        (((ok,), {"attention_mask": [1, 1, 1]}), NNPatchTypeError, ["attention_mask"]),
        ((([3, 4],), {"attention_mask": [1, 1, 1]}), NNPatchValueError, ["(1, 3)", "(1, 2)"]),
        ((([3, 4],), {"attention_mask": [1, 2]}), NNPatchValueError, ["0 and 1"]),
        ((([[3, 4], [5, 6]],), {"attention_mask": [[1, 1], [0, 0]]}), NNPatchValueError, ["prompt 1"]),
        ((([[3, 4], [5]],), {"attention_mask": [[1, 1]]}), NNPatchValueError, ["lengths [2, 1]"]),
        ((([[3, 4], [5]],), {"attention_mask": [[1, 1], [1, 1]]}), NNPatchValueError, ["lengths [2, 1]"]),
        ((([[3, 4], [5]],), {"attention_mask": [[1, 1], [0]]}), NNPatchValueError, ["prompt 1", "no tokens"]),
        (((3.5,), {}), NNPatchTypeError, ["float"]),
    ]
    for (args, kwargs), cls, words in cases:
        with pytest.raises(cls) as e:
            with lm.trace() as tracer:
                with tracer.invoke(ok):
                    pass
                with tracer.invoke(*args, **kwargs):
                    pass
        assert isinstance(e.value, nnpatch.NNPatchError) and not isinstance(e.value, IndexError)
        for w in words:
            assert w in str(e.value), (args, kwargs, str(e.value))
        assert all_hooks(hf) == 0
    with torch.no_grad():
        assert torch.equal(hf(torch.tensor([[5, 6, 7]])).logits, before)


def test_inputs_at_the_limits_are_accepted(arch):
    hf = eager(arch)
    lm = nnpatch.LanguageModel(hf, tokenizer=word_tokenizer())
    longest = [2 + i % (VOCAB - 2) for i in range(64)]
    longest[-1] = VOCAB - 1                                   # the last id of the vocabulary
    with lm.trace(longest):
        logits = lm.output.logits
    with torch.no_grad():
        assert torch.allclose(logits, hf(torch.tensor([longest])).logits, atol=1e-5)
    with lm.trace("t0 <pad> t1"):                             # the unknown token, written literally
        literal = lm.output.logits
    with torch.no_grad():
        assert torch.allclose(literal, hf(torch.tensor([[2, 0, 3]])).logits, atol=1e-5)


def test_unknown_words_are_kept_by_to_tokens_for_display():
    lm = nnpatch.LanguageModel(eager("gpt2"), tokenizer=word_tokenizer())
    assert lm.to_tokens("t1 hello") == [3, 0]


def test_answer_tokens_must_be_one_token():
    tok = word_tokenizer()
    assert token_id(tok, "t5") == 7 and token_id(tok, torch.tensor(7)) == 7
    for value, cls, words in [("t1 t2", NNPatchValueError, ["2 tokens"]),
                              ("", NNPatchValueError, ["0 tokens"]),
                              ("hello", NNPatchValueError, ["not in the model's vocabulary"]),
                              (torch.tensor([3, 4]), NNPatchValueError, ["2 token ids"]),
                              (torch.tensor(3.0), NNPatchTypeError, ["float32"]),
                              (True, NNPatchTypeError, ["bool"]),
                              (75, NNPatchValueError, ["75", "60 tokens"])]:
        with pytest.raises(cls) as e:
            token_id(tok, value, what="answer", vocab_size=VOCAB)
        for w in words:
            assert w in str(e.value), (value, str(e.value))


@pytest.mark.parametrize("shape", [(1, 16), (3, 5), (8, 600)])  # 8 x 600 ids: over the small-block path
def test_check_prompts_finds_out_of_vocabulary_ids_in_small_and_large_blocks(shape):
    from nnpatch.engine.inputs import Prompts, check_prompts
    vocab = 50
    ok = torch.randint(0, vocab, shape)
    ok[0, 0], ok[-1, -1] = 0, vocab - 1  # the first and last ids of the vocabulary are fine
    check_prompts(Prompts(ok), vocab_size=vocab, context=None)
    for bad_id, (row, pos) in [(vocab, (shape[0] - 1, shape[1] - 1)), (-1, (0, 0)), (vocab + 7, (shape[0] // 2, 1))]:
        ids = ok.clone()
        ids[row, pos] = bad_id
        # the reference: the first offending position in row-major order
        want = ((ids < 0) | (ids >= vocab)).nonzero()[0].tolist()
        with pytest.raises(NNPatchValueError, match=rf"token id {bad_id} at position {want[1]} is outside"):
            check_prompts(Prompts(ids), vocab_size=vocab, context=None)
