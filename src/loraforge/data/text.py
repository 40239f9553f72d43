"""Text data for causal-LM fine-tuning: reading, format detection, loss masking, packing, batching.

Formats (detected from the file, reported in the log):

* JSONL, one object per line:
    - ``text``                       plain text; every token carries the loss
    - ``prompt`` / ``completion``    the loss is on the completion (and EOS) only, by default
    - ``instruction`` / ``input`` / ``output``  (alpaca): rendered with an alpaca-style prompt;
                                       the loss is on the output
    - ``messages`` (chat: ``[{"role": ..., "content": ...}, ...]``): rendered with the tokenizer's
      chat template when it has one (else ``<|role|>\\ncontent\\n``); the loss is on assistant turns
* plain text (.txt, or anything not starting with ``{``): examples separated by blank lines.

Bad rows (invalid JSON, missing or empty fields, wrong types, bytes that are not UTF-8) are reported
as ``file:line: why``; by default they are skipped and counted, with `strict` the first one is an
error. A file with no usable row is an error, raised by `scan_text_file` before any model is loaded.

Batches pad to the longest example *in the batch* (not to max_length), and with `group_by_length`
examples of similar length share a batch, so little compute goes to padding. With `packing`, short
examples are packed into rows of up to max_length tokens; each keeps its own positions (0, 1, ...)
and a block-diagonal causal attention mask keeps packed examples from seeing each other.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraforge.errors import DataError, NotFound, UserError

IGNORE = -100
TEXT_SUFFIXES = (".txt", ".text", ".md")
FORMAT_NAMES = {
    "text": "text",
    "prompt_completion": "prompt/completion",
    "alpaca": "alpaca (instruction/input/output)",
    "chat": "chat (messages)",
    "plain": "plain text (blank-line-separated)",
}
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Record:
    """One usable row: where it came from, its format and its fields."""

    loc: str  # "file:line"
    kind: str  # a key of FORMAT_NAMES
    fields: dict[str, Any]


@dataclass
class Scan:
    """What reading a file found: the detected format, the usable rows and the bad ones."""

    path: Path
    format: str
    records: list[Record]
    bad: list[tuple[str, str]]  # (file:line, why)
    rows: int

    def report(self, max_lines: int = 10) -> str:
        lines = [
            f"{self.path}: format {FORMAT_NAMES.get(self.format, self.format)}, {len(self.records)} examples"
            + (f", {len(self.bad)} bad rows skipped" if self.bad else "")
        ]
        for loc, why in self.bad[:max_lines]:
            lines.append(f"  {loc}: {why}")
        if len(self.bad) > max_lines:
            lines.append(f"  ... and {len(self.bad) - max_lines} more bad rows")
        return "\n".join(lines)


# -- reading ---------------------------------------------------------------------------------------


def _detect_kind(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    return None


def _check_record(kind: str, obj: dict) -> str | None:
    """Why the row is unusable as `kind`, or None."""

    def string(name, allow_empty=False, required=True):
        if name not in obj:
            return f"missing field {name!r}" if required else None
        value = obj[name]
        if not isinstance(value, str):
            return f"field {name!r} must be a string, not {type(value).__name__}"
        if not allow_empty and not value.strip():
            return f"empty {name!r}"
        return None

    if kind == "text":
        return string("text")
    if kind == "prompt_completion":
        return string("prompt", allow_empty=True) or string("completion")
    if kind == "alpaca":
        return string("instruction") or string("input", allow_empty=True, required=False) or string("output")
    if kind == "chat":
        messages = obj.get("messages")
        if not isinstance(messages, list) or not messages:
            return "field 'messages' must be a non-empty list"
        for i, m in enumerate(messages):
            if (
                not isinstance(m, dict)
                or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)
            ):
                return f"messages[{i}] must be an object with string 'role' and 'content'"
            if m["role"] not in CHAT_ROLES:
                return f"messages[{i}] has unknown role {m['role']!r} (known: {', '.join(CHAT_ROLES)})"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            return "no non-empty assistant message"
        return None
    return f"unknown format {kind!r}"


def scan_text_file(path: str | Path, strict: bool = False) -> Scan:
    """Reads and checks every row of `path` (no tokenizer needed). Raises DataError for a missing or
    empty file, a file with no usable row, or (with `strict`) the first bad row."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"data file not found: {path}")
    raw = path.read_bytes()
    if path.suffix.lower() in TEXT_SUFFIXES:
        jsonl = False
    elif path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        jsonl = True
    else:
        first = next((line.strip() for line in raw.splitlines() if line.strip()), b"")
        jsonl = first.startswith(b"{")
    scan = _scan_jsonl(path, raw, strict) if jsonl else _scan_plain(path, raw, strict)
    if not scan.records:
        why = f"; first bad row: {scan.bad[0][0]}: {scan.bad[0][1]}" if scan.bad else ""
        raise DataError(f"{path}: no usable examples ({scan.rows} rows, {len(scan.bad)} bad){why}")
    return scan


def _bad(scan_bad: list, loc: str, why: str, strict: bool):
    if strict:
        raise DataError(f"{loc}: {why} (strict mode stops at the first bad row)")
    scan_bad.append((loc, why))


def _scan_jsonl(path: Path, raw: bytes, strict: bool) -> Scan:
    records, bad, kind, rows = [], [], None, 0
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        rows += 1
        loc = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            _bad(bad, loc, f"not valid UTF-8 (byte {e.start})", strict)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            # json's messages may end in "at" already ("Unterminated string starting at").
            where = "column" if e.msg.endswith(" at") else "at column"
            _bad(bad, loc, f"invalid JSON: {e.msg} {where} {e.colno}", strict)
            continue
        if not isinstance(obj, dict):
            _bad(bad, loc, f"expected a JSON object, got {type(obj).__name__}", strict)
            continue
        row_kind = _detect_kind(obj)
        if kind is None and row_kind is not None:
            kind = row_kind  # the first recognisable row fixes the file's format
        check_kind = kind or row_kind
        if check_kind is None:
            _bad(bad, loc, "no known fields (text; prompt/completion; instruction/output; messages)", strict)
            continue
        if row_kind is not None and row_kind != check_kind:
            why = f"row looks like {FORMAT_NAMES[row_kind]}, file is {FORMAT_NAMES[check_kind]}"
        else:
            why = _check_record(check_kind, obj)
        if why:
            _bad(bad, loc, why, strict)
            continue
        records.append(Record(loc, check_kind, obj))
    return Scan(path, kind or "text", records, bad, rows)


def _scan_plain(path: Path, raw: bytes, strict: bool) -> Scan:
    records, bad, rows = [], [], 0
    block: list[str] = []
    start, broken = 0, None

    def flush():
        nonlocal rows, block, broken
        if block or broken:
            rows += 1
            loc = f"{path}:{start}"
            if broken:
                _bad(bad, f"{path}:{broken[0]}", broken[1], strict)
            else:
                records.append(Record(loc, "plain", {"text": "\n".join(block)}))
        block, broken = [], None

    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            flush()
            continue
        if not block and not broken:
            start = lineno
        try:
            block.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as e:
            if broken is None:
                broken = (lineno, f"not valid UTF-8 (byte {e.start})")
    flush()
    return Scan(path, "plain", records, bad, rows)


# -- rendering and tokenizing -----------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss
    loc: str = ""

    def __len__(self):
        return len(self.input_ids)


def prompt_and_reference(record: Record, tokenizer) -> tuple[list[int], str] | None:
    """(prompt token ids, reference completion text) of a row, the prompt tokenized exactly as in
    training (same segments, same special tokens), for generation and evaluation. None for rows
    without a prompt (plain text)."""
    if record.kind in ("text", "plain"):
        return None
    segs, add_special, _ = _segments(record, tokenizer)
    last = max(j for j, (_, trainable) in enumerate(segs) if trainable)
    ids: list[int] = []
    for j, (text, _) in enumerate(segs[:last]):
        ids += tokenizer(text, add_special_tokens=(j == 0 and add_special))["input_ids"]
    if last == 0 and add_special:
        ids += tokenizer("", add_special_tokens=True)["input_ids"]
    f = record.fields
    reference = {"prompt_completion": f.get("completion"), "alpaca": f.get("output")}.get(record.kind)
    if record.kind == "chat":
        reference = [m for m in f["messages"] if m["role"] == "assistant"][-1]["content"]
    return ids, reference


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text.strip():
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_PROMPT.format(instruction=instruction)


def _plain_chat_turn(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}\n"


def _segments(record: Record, tokenizer) -> tuple[list[tuple[str, bool]], bool, bool]:
    """The example as (text, carries_loss_under_completion_training) segments, whether to add the
    tokenizer's special tokens (BOS) in front, and whether to append the EOS token."""
    kind, fields_ = record.kind, record.fields
    if kind in ("text", "plain"):
        return [(fields_["text"], True)], True, True
    if kind == "prompt_completion":
        return [(fields_.get("prompt", ""), False), (fields_["completion"], True)], True, True
    if kind == "alpaca":
        return (
            [
                (alpaca_prompt(fields_["instruction"], fields_.get("input", "")), False),
                (fields_["output"], True),
            ],
            True,
            True,
        )
    if kind == "chat":
        return _chat_segments(fields_["messages"], tokenizer)
    raise UserError(f"unknown record kind {kind!r}")


def _chat_segments(messages, tokenizer):
    if getattr(tokenizer, "chat_template", None):
        render = lambda msgs, gen=False: tokenizer.apply_chat_template(  # noqa: E731
            msgs, tokenize=False, add_generation_prompt=gen
        )
        segs, done = [], ""
        try:
            render([], True)
        except Exception:
            # Templates that cannot render an empty conversation: render the first turn alone.
            render = _empty_safe(render)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = render(messages[:i], True)
            upto = render(messages[: i + 1])
            if not (before.startswith(done) and upto.startswith(before)):
                # A template that rewrites earlier turns: fall back to training on the whole text.
                return [(render(messages), True)], False, False
            answer = upto[len(before) :]
            eos = tokenizer.eos_token
            cut = answer.rfind(eos) + len(eos) if eos and eos in answer else len(answer)
            # The turn and its end marker carry the loss; the template's separator after it does not.
            segs += [(before[len(done) :], False), (answer[:cut], True), (answer[cut:], False)]
            done = upto
        full = render(messages)
        if full.startswith(done) and len(full) > len(done):
            segs.append((full[len(done) :], False))
        # The template already holds the special tokens (BOS, EOS after assistant turns).
        return segs, False, False
    segs = []
    eos = tokenizer.eos_token or ""
    for m in messages:
        if m["role"] == "assistant":
            segs += [("<|assistant|>\n", False), (m["content"] + eos, True), ("\n", False)]
        else:
            segs.append((_plain_chat_turn(m["role"], m["content"]), False))
    return segs, True, False


def _empty_safe(render):
    def safe(msgs, gen=False):
        return "" if not msgs else render(msgs, gen)

    return safe


def tokenize_records(
    records: list[Record], tokenizer, max_length: int, train_on: str = "completion"
) -> tuple[list[Example], dict[str, int]]:
    """Token ids and labels for each record. Segments are tokenized separately (so a prompt is
    tokenized exactly as at generation time). Plain text longer than max_length is split into
    several examples; other examples are truncated (counted). Returns examples and counters."""
    stats = {"truncated": 0, "split": 0, "no_target": 0}
    eos = tokenizer.eos_token_id
    # Batch the tokenizer calls: one call per segment position is much faster than one per row.
    pieces = []
    for r in records:
        try:
            pieces.append(_segments(r, tokenizer))
        except Exception as e:  # a chat template that rejects this conversation (e.g. a role it lacks)
            raise DataError(f"{r.loc}: the tokenizer's chat template failed on this row: {e}") from e
    flat = [
        (i, j, text, first)
        for i, (segs, add_special, _) in enumerate(pieces)
        for j, (text, _) in enumerate(segs)
        for first in [j == 0 and add_special]
    ]
    ids_by_seg: dict[tuple[int, int], list[int]] = {}
    for special in (True, False):
        batch = [(i, j, text) for i, j, text, first in flat if first == special]
        if batch:
            enc = tokenizer([t for _, _, t in batch], add_special_tokens=special, verbose=False)["input_ids"]
            for (i, j, _), ids in zip(batch, enc):
                ids_by_seg[(i, j)] = list(ids)
    examples = []
    for i, (record, (segs, _, add_eos)) in enumerate(zip(records, pieces)):
        ids, labels = [], []
        for j, (_, trainable) in enumerate(segs):
            seg_ids = ids_by_seg[(i, j)]
            ids += seg_ids
            keep = trainable or train_on == "all"
            labels += seg_ids if keep else [IGNORE] * len(seg_ids)
        if add_eos and eos is not None:
            ids.append(eos)
            labels.append(eos)
        if record.kind in ("text", "plain") and len(ids) > max_length:
            # Long documents become consecutive windows instead of losing their tail.
            stats["split"] += 1
            for s in range(0, len(ids), max_length):
                if len(ids[s : s + max_length]) >= 2:
                    examples.append(Example(ids[s : s + max_length], labels[s : s + max_length], record.loc))
            continue
        if len(ids) > max_length:
            stats["truncated"] += 1
            ids, labels = ids[:max_length], labels[:max_length]
        # labels[0] never carries loss (nothing predicts the first token).
        if sum(1 for x in labels[1:] if x != IGNORE) == 0:
            stats["no_target"] += 1
            continue
        examples.append(Example(ids, labels, record.loc))
    return examples, stats


# -- packing and batching ---------------------------------------------------------------------------


@dataclass
class Packed:
    """Several examples in one row; `lengths` says where each ends."""

    input_ids: list[int]
    labels: list[int]
    lengths: list[int] = field(default_factory=list)

    def __len__(self):
        return len(self.input_ids)


def pack_examples(examples: list[Example], max_length: int, seed: int = 0) -> list[Packed]:
    """First-fit-decreasing packing into rows of at most max_length tokens (done once, so the number
    of rows is fixed for the whole run; rows are shuffled per epoch by the batcher)."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    rows: list[Packed] = []
    free: list[int] = []
    for i in order:
        ex = examples[i]
        n = len(ex)
        slot = next((k for k, room in enumerate(free) if room >= n), None)
        if slot is None:
            rows.append(Packed([], [], []))
            free.append(max_length)
            slot = len(rows) - 1
        row = rows[slot]
        row.input_ids += ex.input_ids
        # The first token of a packed example must not be predicted from the previous example.
        row.labels += [IGNORE] + ex.labels[1:]
        row.lengths.append(n)
        free[slot] -= n
    random.Random(seed).shuffle(rows)
    return rows


def batch_order(
    lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """Indices of each batch of an epoch; deterministic from (seed, epoch).

    With grouping: shuffle, cut into chunks of 64 batches, sort each chunk by length, cut into
    batches, shuffle the batches. Lengths within a batch are then close (little padding) while the
    order stays random from epoch to epoch.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    if group_by_length:
        chunk = batch_size * 64
        grouped = []
        for s in range(0, len(idx), chunk):
            grouped += sorted(idx[s : s + chunk], key=lambda i: -lengths[i])
        idx = grouped
    batches = [idx[s : s + batch_size] for s in range(0, len(idx), batch_size)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def collate(items: list[Example | Packed], pad_id: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Pads to the longest item of the batch (right padding). Packed items get per-example
    position_ids and a 4D block-diagonal causal attention mask (additive, in `dtype`)."""
    width = max(len(x) for x in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE, dtype=torch.long)
    for r, item in enumerate(items):
        input_ids[r, : len(item)] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[r, : len(item)] = torch.tensor(item.labels, dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels, "num_tokens": torch.tensor(sum(len(x) for x in items))}
    if not any(isinstance(x, Packed) for x in items):
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, item in enumerate(items):
            mask[r, : len(item)] = 1
        batch["attention_mask"] = mask
        return batch
    # segment[r, t]: which example of row r token t belongs to (1, 2, ...; 0 = padding).
    segment = torch.zeros((n, width), dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    for r, item in enumerate(items):
        lengths = item.lengths if isinstance(item, Packed) else [len(item)]
        s = 0
        for k, length in enumerate(lengths, start=1):
            segment[r, s : s + length] = k
            position_ids[r, s : s + length] = torch.arange(length)
            s += length
        if s < width:
            position_ids[r, s:] = torch.arange(width - s)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]  # (n, q, k)
    allowed = same & causal
    attn = torch.zeros((n, 1, width, width), dtype=dtype)
    attn.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    batch["attention_mask"] = attn
    batch["position_ids"] = position_ids
    return batch


# -- the dataset -----------------------------------------------------------------------------------


class TextDataset:
    """Tokenized examples of one file plus the batching rules; what the training task iterates."""

    def __init__(
        self,
        scan: Scan,
        tokenizer,
        max_length: int,
        train_on: str = "completion",
        packing: bool = False,
        seed: int = 0,
        group_by_length: bool = True,
    ):
        self.scan = scan
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.seed = seed
        self.group_by_length = group_by_length
        self.examples, self.stats = tokenize_records(scan.records, tokenizer, max_length, train_on)
        if not self.examples:
            raise DataError(
                f"{scan.path}: no example has any token to train on (after masking and truncation)"
            )
        self.items: list[Example | Packed] = (
            pack_examples(self.examples, max_length, seed) if packing else list(self.examples)
        )
        self.packing = packing
        pad = tokenizer.pad_token_id
        self.pad_id = (
            pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        )
        self.mask_dtype = torch.float32

    def describe(self) -> str:
        s = self.stats
        parts = [
            f"{len(self.examples)} examples",
            f"{self.num_tokens():,} tokens",
            f"{self.num_target_tokens():,} with loss",
        ]
        if self.packing:
            parts.append(f"packed into {len(self.items)} rows of <= {self.max_length}")
        if s["truncated"]:
            parts.append(f"{s['truncated']} truncated to {self.max_length} tokens")
        if s["split"]:
            parts.append(f"{s['split']} long texts split into windows")
        if s["no_target"]:
            parts.append(f"{s['no_target']} dropped (no token to train on)")
        return ", ".join(parts)

    def num_tokens(self) -> int:
        return sum(len(e) for e in self.examples)

    def num_target_tokens(self) -> int:
        return sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in self.examples)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self.items) / batch_size)

    def batches(self, batch_size: int, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = batch_order([len(x) for x in self.items], batch_size, self.seed, epoch, self.group_by_length)
        for indices in order[start:]:
            yield collate([self.items[i] for i in indices], self.pad_id, self.mask_dtype)

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Fixed order, sorted by length (least padding); unpacked."""
        order = sorted(range(len(self.examples)), key=lambda i: len(self.examples[i]))
        for s in range(0, len(order), batch_size):
            yield collate([self.examples[i] for i in order[s : s + batch_size]], self.pad_id)


def load_text_dataset(
    path,
    tokenizer,
    max_length: int,
    train_on: str = "completion",
    packing: bool = False,
    strict: bool = False,
    seed: int = 0,
    group_by_length: bool = True,
    log=print,
) -> TextDataset:
    """scan_text_file + TextDataset, with the report printed through `log`."""
    scan = scan_text_file(path, strict=strict)
    log(scan.report())
    return TextDataset(scan, tokenizer, max_length, train_on, packing, seed, group_by_length)


def count_loss_tokens(labels: torch.Tensor) -> int:
    """Tokens that carry loss in a batch (labels are shifted by one inside the loss)."""
    return int((labels[:, 1:] != IGNORE).sum())
