#!/usr/bin/env python3
"""Pretrains the embedded `tiny-llama` text base from scratch, on CPU, in a bounded wall-clock time.

Steps:
1. trains a byte-level BPE tokenizer (`tokenizers`) on the corpus made by `scripts/make_text_data.py`
   and wraps it as a `transformers.PreTrainedTokenizerFast` (bos `<s>`, eos `</s>`, pad `<pad>`,
   unk `<unk>`, a plain-text Jinja chat template);
2. builds a small `LlamaForCausalLM` (a few million parameters) and trains it with plain PyTorch
   AdamW on packed `<s> document </s>` sequences until the time budget runs out (warmup, then a
   cosine decay driven by the elapsed fraction of the budget);
3. saves model (safetensors, fp32) and tokenizer with `save_pretrained` into
   `src/loraforge/bases/tiny-llama/`, plus a `TRAINING.md` with what was done.

    python scripts/make_text_data.py
    python scripts/pretrain_text_base.py --minutes 10           # 1 thread by default
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # make_text_data, the generator of the pretraining text
DEFAULT_CORPUS = ROOT / "build" / "text" / "corpus.txt"
DEFAULT_OUT = ROOT / "src" / "loraforge" / "bases" / "tiny-llama"

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# Plain-text chat format: `<|role|>\ncontent\n` per message, assistant turns end with the EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def read_documents(path: Path) -> list[str]:
    return [d.strip() for d in path.read_text().split("\n\n") if d.strip()]


def train_tokenizer(docs: list[str], vocab_size: int, spaces: str = "isolated"):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    # Every whitespace character is its own token and words never carry a leading space, so a word
    # has the same tokens wherever it stands (` cat`, `"cat"`, line start): a format that quotes
    # words (JSON) reuses the tokens the base learned in plain text instead of rare byte pieces.
    if spaces == "isolated":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(r"\s"), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:  # "prefix": GPT-2 style, a word carries the space before it (` cat`), no space tokens between words
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def pack(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """All documents as `<s> doc </s>`, concatenated and cut into rows of `seq_len` tokens."""
    ids: list[int] = []
    eos = tokenizer.eos_token_id
    enc = tokenizer(docs, add_special_tokens=True)["input_ids"]
    for row in enc:
        ids.extend(row)
        ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def build_model(args, tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=64,
    )
    return model


@torch.no_grad()
def eval_loss(model, data: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = []
    for i in range(0, len(data), batch_size):
        x = data[i : i + batch_size]
        losses.append(model(input_ids=x, labels=x).loss.item() * len(x))
    model.train()
    return sum(losses) / len(data)


PROBE_DATA = ROOT / "src" / "loraforge" / "examples" / "text" / "heldout.jsonl"


def probe_rows(n: int) -> list[tuple[str, tuple[str, str, str]]]:
    """(sentence, (who, did, where)) of the first `n` held-out fine-tune rows: sentences the corpus never used."""
    import json

    rows = []
    for line in PROBE_DATA.read_text().splitlines()[:n]:
        r = json.loads(line)
        sent = r["prompt"].split(": ", 1)[1].strip()
        c = json.loads(r["completion"])
        rows.append((sent, (c["who"], c["did"], c["where"])))
    return rows


def _loss_positions(offsets: list, start: int, end: int) -> list[int]:
    """Positions in a shifted loss vector of the tokens whose characters lie in [start, end) (a token
    may start one character early: its leading space)."""
    return [i - 1 for i, (x, y) in enumerate(offsets) if i > 0 and y > x and x >= start - 1 and y <= end]


@torch.no_grad()
def echo_ratio(model, tokenizer, n: int = 100, seed: int = 12345) -> float:
    """Mean loss on a list of 6-12 random words said the second time (`Words: <list>. Again: <list>.`)
    over its loss the first time: about 1 without in-context copying, near 0 with it."""
    from make_text_data import all_words

    vocab, rng = all_words(), random.Random(seed)
    first, second = [], []
    for _ in range(n):
        words = " ".join(rng.choice(vocab) for _ in range(rng.randint(6, 12)))
        a = f"Words: {words}."
        enc = tokenizer(f"{a} Again: {words}.", return_tensors="pt", return_offsets_mapping=True)
        ids, off = enc["input_ids"], enc["offset_mapping"][0].tolist()
        lp = torch.nn.functional.cross_entropy(
            model(input_ids=ids).logits[0, :-1], ids[0, 1:], reduction="none"
        )
        s1, s2 = len("Words: "), len(a) + len(" Again: ")
        first.append(lp[_loss_positions(off, s1, s1 + len(words))].mean().item())
        second.append(lp[_loss_positions(off, s2, s2 + len(words))].mean().item())
    return sum(second) / sum(first)


@torch.no_grad()
def copy_probe(model, tokenizer, rows) -> dict:
    """In-context copying, measured directly: greedy continuation of `Read this: <sentence> who:` on
    held-out sentences, compared with `<who>. did: <did>. where: <where>.` (one of the corpus's
    plain-text extraction layouts). Returns the share of rows with each part right and all three."""
    model.eval()
    prompts = [f"Read this: {sent} who:" for sent, _ in rows]  # no trailing space: with `--spaces prefix`
    # the space belongs to the next word's token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    out = model.generate(**enc, max_new_tokens=32, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    hits = {"who": 0, "did": 0, "where": 0, "all": 0}
    for text, (w, d, p) in zip(texts, [r[1] for r in rows]):
        got = {"who": text.split(".")[0].strip()}
        got["did"] = text.split("did: ", 1)[1].split(".")[0].strip() if "did: " in text else ""
        got["where"] = text.split("where: ", 1)[1].split(".")[0].strip() if "where: " in text else ""
        ok = [got["who"].lower() == w.lower(), got["did"] == d, got["where"] == p]
        for k, o in zip(("who", "did", "where"), ok):
            hits[k] += o
        hits["all"] += all(ok)
    res = {k: v / len(rows) for k, v in hits.items()}
    res["echo_ratio"] = echo_ratio(model, tokenizer)
    model.train()
    res["sample"] = prompts[0] + texts[0]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget for the training loop")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=3000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--tokenizer-docs", type=int, default=20000, help="documents used to train the BPE")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument(
        "--spaces",
        choices=["isolated", "prefix"],
        default="isolated",
        help="isolated: every whitespace character is its own token; prefix: words carry their leading space",
    )
    ap.add_argument(
        "--probe-every", type=float, default=5.0, help="minutes between copy probes (0: only at the end)"
    )
    ap.add_argument("--probe-rows", type=int, default=50)
    ap.add_argument(
        "--copy-warmup-minutes",
        type=float,
        default=0.0,
        help="train first on random word lists said twice only (scripts/make_text_data.py's `repeat`), "
        "where nothing but copying lowers the loss, so copying heads form before the mixed corpus",
    )
    ap.add_argument(
        "--corpus-command",
        default="python scripts/make_text_data.py",
        help="how the corpus was made, for the record in TRAINING.md",
    )
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.time()

    if not args.corpus.exists():
        print(f"corpus {args.corpus} missing: generating it with scripts/make_text_data.py")
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_text_data.py")], check=True)
    docs = read_documents(args.corpus)
    print(f"corpus: {len(docs)} documents from {args.corpus}")

    tokenizer = train_tokenizer(docs[: args.tokenizer_docs], args.vocab_size, args.spaces)
    print(f"tokenizer: vocab {len(tokenizer)}")

    data = pack(docs, tokenizer, args.seq_len)
    g = torch.Generator().manual_seed(args.seed)
    data = data[torch.randperm(len(data), generator=g)]
    n_val = min(64, len(data) // 20)
    val, train = data[:n_val], data[n_val:]
    print(f"data: {train.numel():,} train tokens in {len(train)} rows of {args.seq_len}, {n_val} val rows")

    copy_rows = None
    if args.copy_warmup_minutes > 0:
        from make_text_data import repeat

        rng = random.Random(args.seed + 7)
        copy_rows = pack([repeat(rng) for _ in range(100_000)], tokenizer, args.seq_len)
        print(
            f"copy warm-up: {copy_rows.numel():,} tokens of repeated word lists, {args.copy_warmup_minutes:g} min"
        )

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    budget = args.minutes * 60.0
    model.train()
    step, tokens, pos = 0, 0, 0
    order = torch.randperm(len(train), generator=g)
    recent: list[float] = []
    rows = probe_rows(args.probe_rows)
    probes: list[tuple[int, float, dict]] = []
    next_probe = args.probe_every * 60.0 if args.probe_every > 0 else float("inf")
    t_loop = time.time()
    while True:
        elapsed = time.time() - t_loop
        if elapsed >= next_probe:
            t_probe = time.time()
            pr = copy_probe(model, tokenizer, rows)
            probes.append((step, elapsed, pr))
            print(
                f"probe at step {step} ({elapsed / 60:.1f} min): who {pr['who']:.2f} did {pr['did']:.2f} "
                f"where {pr['where']:.2f} all {pr['all']:.2f} echo ratio {pr['echo_ratio']:.3f}  | {pr['sample']!r}",
                flush=True,
            )
            next_probe += args.probe_every * 60.0
            t_loop += time.time() - t_probe  # probing does not eat the training budget
            continue
        if elapsed >= budget:
            break
        frac = elapsed / budget
        if step < args.warmup_steps:
            lr = args.lr * (step + 1) / args.warmup_steps
        else:
            cos = 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
            lr = args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cos)
        for group in opt.param_groups:
            group["lr"] = lr

        if copy_rows is not None and elapsed < args.copy_warmup_minutes * 60.0:
            x = copy_rows[torch.randint(0, len(copy_rows), (args.batch_size,), generator=g)]
        else:
            if pos + args.batch_size > len(order):
                order = torch.randperm(len(train), generator=g)
                pos = 0
            x = train[order[pos : pos + args.batch_size]]
            pos += args.batch_size

        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        step += 1
        tokens += x.numel()
        recent.append(loss.item())
        recent = recent[-50:]
        if step % args.log_every == 0:
            print(
                f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  lr {lr:.2e}  "
                f"{tokens / (time.time() - t_loop):,.0f} tok/s  {elapsed / 60:.1f}/{args.minutes:g} min",
                flush=True,
            )
    train_time = time.time() - t_loop
    final_train = sum(recent) / max(len(recent), 1)
    final_val = eval_loss(model, val, args.batch_size)
    print(
        f"done: {step} steps, {tokens:,} tokens, {train_time:.0f}s, train loss {final_train:.4f}, val loss {final_val:.4f}"
    )

    final_probe = copy_probe(model, tokenizer, probe_rows(100))
    print(f"final copy probe (100 held-out sentences): {final_probe}")

    # samples for the record
    model.eval()
    samples = []
    for prompt in ["Once upon a time, there was", "The little dog", "Tom went to the"]:
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=40, do_sample=False)
        samples.append(tokenizer.decode(out[0], skip_special_tokens=True))

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*"):
        if old.is_file() and old.name != "TRAINING.md":
            old.unlink()
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    for f in args.out.iterdir():  # save_pretrained may leave the weights owner-only
        f.chmod(0o644)

    size_mb = sum(f.stat().st_size for f in args.out.glob("*") if f.is_file()) / 1e6
    cmd = "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])
    cfg = model.config
    lines = [
        "# tiny-llama: how this base was made",
        "",
        "Pretrained from scratch on CPU by `scripts/pretrain_text_base.py` on the synthetic English corpus",
        "of `scripts/make_text_data.py` (template stories, sentences, questions; no JSON).",
        "",
        "```",
        args.corpus_command,
        cmd,
        "```",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | LlamaForCausalLM, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads, intermediate {cfg.intermediate_size}, max positions "
        f"{cfg.max_position_embeddings}, tied embeddings |",
        f"| parameters | {n_params:,} |",
        f"| tokenizer | byte-level BPE, vocab {len(tokenizer)}, special `<unk>` `<s>` `</s>` `<pad>` |",
        f"| threads | {args.threads} |",
        f"| training wall time | {train_time:.0f} s ({train_time / 60:.1f} min; budget {args.minutes:g} min) |",
        f"| total wall time | {time.time() - t_start:.0f} s (tokenizer, packing, training, saving) |",
        f"| optimizer steps | {step} (batch {args.batch_size} x {args.seq_len} tokens) |",
        *(
            [
                f"| copy warm-up | the first {args.copy_warmup_minutes:g} min on repeated random word lists only |"
            ]
            if args.copy_warmup_minutes > 0
            else []
        ),
        f"| tokens seen | {tokens:,} (corpus: {train.numel():,} packed tokens) |",
        f"| optimizer | AdamW lr {args.lr:g}, betas (0.9, 0.95), weight decay {args.weight_decay:g}, "
        f"{args.warmup_steps} warmup steps, cosine to {args.min_lr_ratio:g} x lr over the budget, clip 1.0 |",
        f"| final train loss | {final_train:.4f} (mean of last {len(recent)} steps) |",
        f"| final val loss | {final_val:.4f} ({n_val} held-out rows) |",
        f"| seed | {args.seed} |",
        f"| torch | {torch.__version__} |",
        "",
        "Notes:",
        "",
        *(
            [
                "- Tokenizer: byte-level BPE where every whitespace character is its own token and words carry no",
                "  leading space, so a word has the same tokens in running text and inside quotes (JSON values).",
            ]
            if args.spaces == "isolated"
            else [
                "- Tokenizer: GPT-2 style byte-level BPE (`--spaces prefix`): a word carries the space before it",
                "  (`Ġbridge`), so there are no space tokens between words and copying a word means copying the",
                "  token after the previous occurrence of the current one (a plain induction head).",
            ]
        ),
        "- Documents are packed as `<s> text </s>`; the tokenizer adds `<s>` itself; the chat template renders",
        "  `<s><|user|>\\n...\\n<|assistant|>\\n...</s>\\n` (plain text, no extra special tokens).",
        "- The corpus (the `make_text_data.py` command above) never contains braces or the word JSON, so the",
        "  JSON format of the example fine-tune stays new to the base.",
        (
            "- The copy probe below is low: this base does not copy words out of its prompt, so a fine-tune"
            "\n  can teach it a format but not values taken from the prompt."
            if final_probe["all"] < 0.5
            else "- The copy probe below shows in-context copying: the base can take words out of its prompt."
        ),
        "",
        "In-context copying, measured during training (`copy_probe`): greedy continuation of",
        "`Read this: <sentence> who:` on the held-out fine-tune sentences (50 during training, 100 at the",
        "end), share with the right who / did / where / all three:",
        "",
        "Echo ratio: loss on a list of random words said the second time over its loss the first time",
        "(`Words: <list>. Again: <list>.`, 100 lists): about 1 without copying, near 0 with it.",
        "",
        "| step | minutes | who | did | where | all | echo ratio |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {st} | {el / 60:.0f} | {pr['who']:.2f} | {pr['did']:.2f} | {pr['where']:.2f} | {pr['all']:.2f} "
            f"| {pr['echo_ratio']:.3f} |"
            for st, el, pr in probes
        ],
        f"| {step} (final, 100 rows) | {train_time / 60:.0f} | {final_probe['who']:.2f} | {final_probe['did']:.2f} "
        f"| {final_probe['where']:.2f} | {final_probe['all']:.2f} | {final_probe['echo_ratio']:.3f} |",
        "",
        f"Probe sample: {final_probe['sample']!r}",
        "",
        "Greedy samples:",
        "",
    ]
    lines += [f"- {s!r}" for s in samples]
    (args.out / "TRAINING.md").write_text("\n".join(lines) + "\n")
    print(f"saved to {args.out} ({size_mb:.1f} MB)")
    for s in samples:
        print("  sample:", repr(s))


if __name__ == "__main__":
    main()
