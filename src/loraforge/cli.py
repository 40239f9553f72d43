"""The `loraforge` command line. Each subcommand lives in the module that does its work and exposes
`add_arguments(parser)` and `run(args) -> int`; modules are imported only when their command runs, so
`loraforge --help` stays instant.

    loraforge bases                                   # embedded base models
    loraforge train [--config run.yaml] [--key value ...]
    loraforge generate --adapter out/adapter --prompt "..."
    loraforge merge --adapter A:0.7 --adapter B:0.3 --out merged/
    loraforge mix A:0.7 B:0.3 --method svd --out mixed/
    loraforge inspect out/adapter
    loraforge train-image / generate-image            # Stable Diffusion
    loraforge serve --base tiny-llama --adapters adapters/   # OpenAI-compatible server, many adapters
    loraforge run lora_training '{seed: 3}'           # a job: result and record in the store, by CID
    loraforge show / ls / export / verify / fsck / gc # the store
"""

from __future__ import annotations

import argparse
import importlib
import sys

from loraforge.errors import UserError

COMMANDS = {
    "bases": ("loraforge.tools", "bases", "list the embedded base models"),
    "train": ("loraforge.train.text", None, "fine-tune a language model with LoRA"),
    "generate": ("loraforge.infer.text", None, "generate text with one or more adapters"),
    "eval-text": ("loraforge.eval.text", None, "measure an adapter on the held-out example task"),
    "merge": ("loraforge.tools", "merge", "merge adapters into a standalone transformers model"),
    "mix": ("loraforge.tools", "mix", "combine adapters into a new adapter file"),
    "inspect": ("loraforge.tools", "inspect", "describe an adapter file"),
    "train-image": ("loraforge.train.image", None, "teach a Stable Diffusion pipeline a style or subject"),
    "generate-image": ("loraforge.infer.image", None, "generate images with one or more adapters"),
    "eval-style": ("loraforge.eval.style", None, "measure how far generated images moved toward a style"),
    "serve": (
        "loraforge.serve.app",
        None,
        "serve a base and many adapters over an OpenAI-compatible HTTP API",
    ),
    "run": (
        "loraforge.jobs.cli",
        "run",
        "run a job module (lora_training, lora_inference, ...) into the store",
    ),
    "show": ("loraforge.jobs.cli", "show", "show the job record of a result or record CID"),
    "ls": ("loraforge.jobs.cli", "ls", "list the job records in the store"),
    "export": ("loraforge.jobs.cli", "export", "export a stored result to a directory or a CAR file"),
    "verify": ("loraforge.jobs.cli", "verify", "re-run a job from its record and compare the CIDs"),
    "fsck": ("loraforge.jobs.cli", "fsck", "check every stored object against its CID"),
    "gc": ("loraforge.jobs.cli", "gc", "delete stored objects that no pin and no record keeps"),
}


def _load(command: str):
    module_name, prefix, _ = COMMANDS[command]
    module = importlib.import_module(module_name)
    if prefix:
        return getattr(module, f"{prefix}_arguments"), getattr(module, f"{prefix}_run")
    return module.add_arguments, module.run


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="loraforge", description="LoRA fine-tuning for language and image models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.parse_args(argv[:1])
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    command = argv[0]
    add_arguments, run = _load(command)
    # No abbreviations: `--out` must never be taken as the start of some longer flag.
    command_parser = argparse.ArgumentParser(
        prog=f"loraforge {command}", description=COMMANDS[command][2], allow_abbrev=False
    )
    add_arguments(command_parser)
    args = command_parser.parse_args(dash_spellings(command_parser, argv[1:]))  # usage error: exit 2
    try:
        return run(args) or 0
    except UserError as e:  # bad input: one line. Anything else is a bug: its traceback, exit status 1.
        print(f"loraforge {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loraforge {command}: interrupted", file=sys.stderr)
        return 130


def dash_spellings(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Every flag is written with dashes (`--max-new-tokens`); the underscore spelling of any flag
    (`--max_new_tokens`, `--max_new_tokens=8`) is accepted too, without each command listing both."""
    known = set(parser._option_string_actions)
    out = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + argv[i:]
        flag, eq, value = arg.partition("=")
        if flag.startswith("--") and "_" in flag and flag not in known:
            dashed = "--" + flag[2:].replace("_", "-")
            if dashed in known:
                arg = dashed + eq + value
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
