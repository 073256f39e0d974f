"""Prompt-pair generators: shapes, tokenization against the shipped tokenizers, flipped answers,
meta positions, reproducibility and the train/test split."""
import pytest
from transformers import AutoTokenizer

import nnpatch
from nnpatch import tasks
from nnpatch.errors import NNPatchError


@pytest.fixture(scope="module")
def tokenizers():
    return {name: AutoTokenizer.from_pretrained(nnpatch.models.path(name))
            for name in ("ioi", "table-max")}


def ids(tok, text):
    return tok(text)["input_ids"]


def test_pairs_are_parallel_lists_with_a_model_hint():
    for pairs, model in [(tasks.ioi(7), "ioi"), (tasks.table_max(7), "table-max")]:
        assert pairs.model == model
        assert len(pairs) == 7
        for column in (pairs.clean, pairs.corrupt, pairs.answer, pairs.wrong, pairs.meta):
            assert isinstance(column, list) and len(column) == 7
        one = pairs[3]
        assert (one.clean, one.corrupt, one.answer, one.wrong, one.meta) == (
            pairs.clean[3], pairs.corrupt[3], pairs.answer[3], pairs.wrong[3], pairs.meta[3])
        part = pairs[2:5]
        assert isinstance(part, tasks.PromptPairs) and len(part) == 3 and part.model == model
        assert [p.clean for p in pairs] == pairs.clean


def test_same_seed_same_pairs_and_new_seed_new_pairs():
    assert tasks.ioi(20, seed=5) == tasks.ioi(20, seed=5)
    assert tasks.ioi(20, seed=5).clean != tasks.ioi(20, seed=6).clean
    assert tasks.table_max(20, seed=5) == tasks.table_max(20, seed=5)
    assert tasks.table_max(20, seed=5).clean != tasks.table_max(20, seed=6).clean


def test_ioi_tokenization_positions_and_flip(tokenizers):
    tok = tokenizers["ioi"]
    pairs = tasks.ioi(300, seed=1)
    assert {m["order"] for m in pairs.meta} == {"ABBA", "BABA"}
    assert len({m["template"] for m in pairs.meta}) == len(tasks.IOI_TEMPLATES)
    for p in pairs:
        clean, corrupt = ids(tok, p.clean), ids(tok, p.corrupt)
        assert len(clean) == len(corrupt) == p.meta["end"] + 1
        assert tok.unk_token_id not in clean + corrupt
        answer, wrong = ids(tok, p.answer), ids(tok, p.wrong)
        assert len(answer) == len(wrong) == 1 and answer != wrong
        assert tok.decode(answer) == p.answer
        m = p.meta
        assert clean[m["io"]] == answer[0] and clean[m["s1"]] == clean[m["s2"]] == wrong[0]
        assert m["s1"] < m["s2"] and (m["io"] < m["s1"]) == (m["order"] == "ABBA")
        # ABB -> ABA: only the second mention of S changes, and it becomes IO.
        changed = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
        assert changed == [m["s2"]] and corrupt[m["s2"]] == answer[0]


def test_table_tokenization_positions_and_flip(tokenizers):
    tok = tokenizers["table-max"]
    for rows in (3, 8, 10):
        for p in tasks.table_max(100, seed=2, rows=rows):
            clean, corrupt = ids(tok, p.clean), ids(tok, p.corrupt)
            assert len(clean) == len(corrupt) == p.meta["end"] + 1
            assert tok.unk_token_id not in clean + corrupt
            answer, wrong = ids(tok, p.answer), ids(tok, p.wrong)
            assert len(answer) == len(wrong) == 1 and answer != wrong
            m = p.meta
            rowmap = m["row_token_map"]
            assert sorted(rowmap) == list(range(rows)) and len(m["values"]) == rows
            assert len(set(m["values"])) == rows
            for r, where in rowmap.items():
                label = p.clean.split()[len(tasks.TABLE_HEADER.split()) + 3 * r + 1]
                assert tok.decode([clean[i] for i in where["x"]]) == f" Grp {label}"
                assert tok.decode([clean[i] for i in where["y"]]) == f" {m['values'][r]}"
            top, runner_up = m["max_row"], m["corrupt_max_row"]
            assert int(p.answer) == max(m["values"]) == m["values"][top]
            assert clean[rowmap[top]["y"][0]] == answer[0]
            # Only the maximum row's value changes, and it drops below the runner-up.
            changed = [i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b]
            assert changed == rowmap[top]["y"]
            corrupt_values = [int(tok.decode([corrupt[w["y"][0]]])) for w in rowmap.values()]
            assert max(corrupt_values) == int(p.wrong) == corrupt_values[runner_up]
            assert corrupt_values[top] < int(p.wrong)


def test_template_choice_gives_equal_lengths(tokenizers):
    tok = tokenizers["ioi"]
    pairs = tasks.ioi(30, seed=0, template=4)
    assert {m["template"] for m in pairs.meta} == {4}
    assert len({len(ids(tok, c)) for c in pairs.clean}) == 1


def test_held_out_split_is_disjoint_from_training_data():
    for make in (tasks.ioi, lambda n, seed, split: tasks.table_max(n, seed, rows=3, split=split)):
        test = make(2000, seed=0, split="test")
        train = make(2000, seed=0, split="train")
        held_out = set(test.clean) | set(test.corrupt)
        assert not held_out & (set(train.clean) | set(train.corrupt))
    # The split key ignores name order, so a held-out pair's names never meet in training
    # in the same template, place and object.
    def key(p):
        return (p.meta["template"], p.clean.replace(p.answer, " X").replace(p.wrong, " X"),
                frozenset((p.answer, p.wrong)))
    test_keys = {key(p) for p in tasks.ioi(2000, seed=0)}
    assert not test_keys & {key(p) for p in tasks.ioi(4000, seed=1, split="train")}


def test_vocabulary_covers_every_piece(tokenizers):
    for name, pairs in [("ioi", tasks.ioi(200, seed=9)), ("table-max", tasks.table_max(200, seed=9))]:
        vocab = set(tasks.vocabulary(name))
        for text in pairs.clean + pairs.corrupt + pairs.answer + pairs.wrong:
            assert set(tasks._pieces(text)) <= vocab
        assert len(tokenizers[name]) == len(vocab) + 3  # plus <pad>, <unk>, <|endoftext|>


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(NNPatchError, match="between 3 and 10"):
        tasks.table_max(2, rows=11)
    with pytest.raises(NNPatchError, match="template"):
        tasks.ioi(2, template=99)
    with pytest.raises(NNPatchError, match="split"):
        tasks.ioi(2, split="validation")
    with pytest.raises(NNPatchError, match="ioi"):
        tasks.vocabulary("gpt2")
