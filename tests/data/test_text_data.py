import json

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from tiny_text import write_jsonl

from loraforge.data.text import (
    IGNORE,
    DataError,
    Example,
    TextDataset,
    batch_order,
    collate,
    pack_examples,
    prompt_and_reference,
    scan_text_file,
    tokenize_records,
)


def _labelled_text(tokenizer, ex):
    return tokenizer.decode([t for t in ex.labels if t != IGNORE])


# -- format detection ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows, fmt",
    [
        ([{"text": "The cat sat."}], "text"),
        ([{"prompt": "Q: hi\n", "completion": "A: yes"}], "prompt_completion"),
        ([{"instruction": "Say hi", "input": "", "output": "hi"}], "alpaca"),
        (
            [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}],
            "chat",
        ),
    ],
)
def test_jsonl_format_detection(tmp_path, rows, fmt):
    scan = scan_text_file(write_jsonl(tmp_path / "d.jsonl", rows * 3))
    assert scan.format == fmt
    assert len(scan.records) == 3 and not scan.bad
    assert "format" in scan.report() and "3 examples" in scan.report()


def test_plain_text_blocks_and_sniffing(tmp_path):
    path = tmp_path / "notes.dat"  # unknown suffix: sniffed as plain text (does not start with "{")
    path.write_text("first block\nstill first\n\n\nsecond block\n")
    scan = scan_text_file(path)
    assert scan.format == "plain"
    assert [r.fields["text"] for r in scan.records] == ["first block\nstill first", "second block"]
    assert [r.loc.rsplit(":", 1)[1] for r in scan.records] == ["1", "5"]


# -- loss masking --------------------------------------------------------------------------------


def test_prompt_completion_masks_the_prompt(tmp_path, tokenizer):
    scan = scan_text_file(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "The cat sat.\n", "completion": "on the mat"}])
    )
    (ex,), _ = tokenize_records(scan.records, tokenizer, 64, "completion")
    prompt_ids = tokenizer("The cat sat.\n")["input_ids"]
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids  # prompt tokenized exactly as at generation
    assert ex.labels[: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert _labelled_text(tokenizer, ex) == "on the mat</s>"
    assert ex.input_ids[-1] == tokenizer.eos_token_id

    (ex_all,), _ = tokenize_records(scan.records, tokenizer, 64, "all")
    assert ex_all.labels == ex_all.input_ids


def test_alpaca_trains_on_output_only(tmp_path, tokenizer):
    rows = [{"instruction": "Name a pet", "input": "small", "output": "a cat"}]
    scan = scan_text_file(write_jsonl(tmp_path / "d.jsonl", rows))
    (ex,), _ = tokenize_records(scan.records, tokenizer, 128)
    assert _labelled_text(tokenizer, ex) == "a cat</s>"
    assert "### Input:\nsmall" in tokenizer.decode(ex.input_ids)


def test_chat_trains_on_assistant_turns_with_template(tmp_path, tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat"},
    ]
    scan = scan_text_file(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]))
    (ex,), _ = tokenize_records(scan.records, tokenizer, 128)
    # The whole example is the template's rendering; only assistant contents (+ EOS) carry loss.
    assert tokenizer.decode(ex.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert _labelled_text(tokenizer, ex) == "yes</s>sat</s>"
    ids, reference = prompt_and_reference(scan.records[0], tokenizer)
    assert reference == "sat"
    assert tokenizer.decode(ids).endswith("<|user|>\nthe cat\n<|assistant|>\n")
    assert ex.input_ids[: len(ids)] == ids


def test_chat_without_template_uses_plain_roles(tmp_path):
    from tiny_text import make_tokenizer

    tok = make_tokenizer(chat_template=False)
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}]
    scan = scan_text_file(write_jsonl(tmp_path / "d.jsonl", rows))
    (ex,), _ = tokenize_records(scan.records, tok, 64)
    assert tok.decode(ex.input_ids) == "<s><|user|>\nhi\n<|assistant|>\nyes</s>\n"
    assert _labelled_text(tok, ex) == "yes</s>"


def test_truncation_and_long_text_windows(tmp_path, tokenizer):
    long_text = " ".join(["the cat sat on the mat"] * 20)
    rows = [{"text": long_text}]
    scan = scan_text_file(write_jsonl(tmp_path / "t.jsonl", rows))
    examples, stats = tokenize_records(scan.records, tokenizer, 16)
    assert stats["split"] == 1 and len(examples) > 2 and all(len(e) <= 16 for e in examples)
    full = tokenizer(long_text)["input_ids"] + [tokenizer.eos_token_id]
    assert sum((e.input_ids for e in examples), []) == full  # nothing lost

    rows = [{"prompt": "p " * 30, "completion": "the cat"}, {"prompt": "hi\n", "completion": "yes " * 30}]
    scan = scan_text_file(write_jsonl(tmp_path / "p.jsonl", rows))
    examples, stats = tokenize_records(scan.records, tokenizer, 16)
    # The first loses its completion entirely to truncation: dropped and counted.
    assert stats == {"truncated": 2, "split": 0, "no_target": 1}
    assert len(examples) == 1 and len(examples[0]) == 16


# -- bad rows ------------------------------------------------------------------------------------


def _bad_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "a\n", "completion": "b"}).encode()
    lines = [
        good,  # 1
        b"{not json",  # 2
        json.dumps({"prompt": "a\n"}).encode(),  # 3 missing completion
        json.dumps({"prompt": "a\n", "completion": "  "}).encode(),  # 4 empty
        b'{"prompt": "caf\xe9", "completion": "x"}',  # 5 latin-1 byte: not UTF-8
        b"",  # blank lines are ignored
        json.dumps([1, 2]).encode(),  # 7 not an object
        json.dumps({"prompt": "a\n", "completion": 3}).encode(),  # 8 wrong type
        good,  # 9
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    path = _bad_file(tmp_path)
    scan = scan_text_file(path)
    assert len(scan.records) == 2
    got = {loc: why for loc, why in scan.bad}
    assert set(got) == {f"{path}:{n}" for n in (2, 3, 4, 5, 7, 8)}
    assert "invalid JSON" in got[f"{path}:2"]
    assert "missing field 'completion'" in got[f"{path}:3"]
    assert "empty 'completion'" in got[f"{path}:4"]
    assert "UTF-8" in got[f"{path}:5"]
    assert "JSON object" in got[f"{path}:7"]
    assert "must be a string" in got[f"{path}:8"]
    report = scan.report()
    assert "6 bad rows skipped" in report and f"{path}:5" in report


def test_strict_stops_at_first_bad_row(tmp_path):
    path = _bad_file(tmp_path)
    with pytest.raises(DataError, match=rf"{path}:2: invalid JSON"):
        scan_text_file(path, strict=True)


def test_rows_of_another_format_are_bad(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "hello"}])
    scan = scan_text_file(path)
    assert scan.format == "prompt_completion"
    assert scan.bad == [(f"{path}:2", "row looks like text, file is prompt/completion")]


def test_empty_and_all_bad_files_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no usable examples"):
        scan_text_file(empty)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"unknown": 1}])
    with pytest.raises(DataError, match=r"no usable examples.*bad\.jsonl:1: invalid JSON"):
        scan_text_file(bad)
    with pytest.raises(FileNotFoundError):
        scan_text_file(tmp_path / "missing.jsonl")


# -- batching ------------------------------------------------------------------------------------


def test_dynamic_padding_and_length_grouping(tmp_path, tokenizer):
    rows = [{"prompt": "the cat " * (1 + i % 7), "completion": "sat"} for i in range(64)]
    scan = scan_text_file(write_jsonl(tmp_path / "d.jsonl", rows))
    grouped = TextDataset(scan, tokenizer, max_length=128, group_by_length=True, seed=1)
    plain = TextDataset(scan, tokenizer, max_length=128, group_by_length=False, seed=1)
    longest = max(len(e) for e in grouped.examples)
    for ds in (grouped, plain):
        for batch in ds.batches(8, epoch=0):
            lengths = batch["attention_mask"].sum(1)
            assert (
                batch["input_ids"].shape[1] == int(lengths.max()) <= longest < 128
            )  # pad to the batch's longest
            assert int(batch["num_tokens"]) == int(lengths.sum())
            assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()

    def padding(ds):
        return sum(int((b["attention_mask"] == 0).sum()) for b in ds.batches(8, epoch=0))

    assert padding(grouped) < padding(plain)
    # Every example appears once per epoch.
    seen = sorted(i for b in batch_order([len(e) for e in grouped.items], 8, 1, 0, True) for i in b)
    assert seen == list(range(64))


def test_batch_order_is_deterministic_and_resumable(tmp_path, tokenizer):
    lengths = [(i * 7) % 13 + 1 for i in range(50)]
    a = batch_order(lengths, 4, seed=3, epoch=2, group_by_length=True)
    assert a == batch_order(lengths, 4, seed=3, epoch=2, group_by_length=True)
    assert a != batch_order(lengths, 4, seed=3, epoch=3, group_by_length=True)
    rows = [{"text": "the cat " * (1 + i % 5)} for i in range(20)]
    ds = TextDataset(scan_text_file(write_jsonl(tmp_path / "d.jsonl", rows)), tokenizer, 64, seed=3)
    full = list(ds.batches(4, epoch=1))
    tail = list(ds.batches(4, epoch=1, start=2))
    assert len(tail) == len(full) - 2
    for x, y in zip(full[2:], tail):
        assert torch.equal(x["input_ids"], y["input_ids"])


# -- packing -------------------------------------------------------------------------------------


def test_packing_fills_rows_and_keeps_every_token():
    examples = [Example(list(range(1, n + 1)), list(range(1, n + 1))) for n in (5, 3, 7, 2, 6, 1, 4)]
    rows = pack_examples(examples, max_length=8, seed=0)
    assert all(len(r) <= 8 for r in rows)
    assert sum(len(r) for r in rows) == sum(len(e) for e in examples)
    assert len(rows) == 4  # 28 tokens in rows of 8: first-fit-decreasing needs the minimum
    for r in rows:
        s = 0
        for n in r.lengths:
            # The first token of each packed example carries no loss (it would be predicted from the previous one).
            assert r.labels[s] == IGNORE and r.labels[s + 1 : s + n] == list(range(2, n + 1))
            s += n


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_packed_examples_do_not_attend_to_each_other(build):
    torch.manual_seed(0)
    model = build()
    g = torch.Generator().manual_seed(1)
    examples = [Example(torch.randint(4, 128, (n,), generator=g).tolist(), [0] * n) for n in (9, 5, 12, 3)]
    rows = pack_examples(examples, max_length=20, seed=0)
    assert any(len(r.lengths) > 1 for r in rows)
    batch = collate(rows, pad_id=0)
    assert batch["attention_mask"].shape == (
        len(rows),
        1,
        batch["input_ids"].shape[1],
        batch["input_ids"].shape[1],
    )
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
        checked = 0
        for r, row in enumerate(rows):
            s = 0
            for n in row.lengths:
                alone = model(input_ids=torch.tensor([row.input_ids[s : s + n]])).logits[0]
                torch.testing.assert_close(packed[r, s : s + n], alone, atol=1e-5, rtol=1e-5)
                s += n
                checked += 1
    assert checked == len(examples)


def test_packing_dataset_loss_matches_unpacked(tmp_path, tokenizer):
    """Same examples, packed or padded: the same token-weighted loss (packing changes nothing but speed)."""
    from loraforge.train.text import causal_lm_loss

    torch.manual_seed(0)
    model = tiny_llama(vocab=len(tokenizer), hidden=32, layers=2)
    rows = [
        {"prompt": "the cat " * (1 + i % 4), "completion": "sat on the mat " * (1 + i % 3)} for i in range(12)
    ]
    scan = scan_text_file(write_jsonl(tmp_path / "d.jsonl", rows))

    def total(ds):
        s = n = 0
        with torch.no_grad():
            for b in ds.batches(4, epoch=0):
                loss, k = causal_lm_loss(model, b)
                s, n = s + float(loss) * k, n + k
        return s / n, n

    padded = total(TextDataset(scan, tokenizer, 64, packing=False))
    packed_ds = TextDataset(scan, tokenizer, 64, packing=True)
    assert len(packed_ds.items) < 12
    packed = total(packed_ds)
    assert padded[1] == packed[1]
    assert padded[0] == pytest.approx(packed[0], abs=1e-5)
