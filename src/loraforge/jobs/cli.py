"""The job commands: `loraforge run`, `show`, `ls`, `export`, `verify`, `fsck`, `gc`.

    loraforge run --list
    loraforge run lora_training '{images: photos.zip, seed: 3}'          # prints the result's CID
    loraforge run lora_inference '{lora: Qm…, prompt: "a circle in the style of <s1><s2>", seed: 3}' --out images/
    loraforge run lora_inference --set lora=Qm… --set "prompt=a circle in the style of <s1><s2>"
    loraforge show Qm…            # the job record of a result (or a record's CID), or what an object is
    loraforge ls                  # the job records, newest last
    loraforge export Qm… DIR      # the result directory;  --car FILE: as a CAR file
    loraforge verify Qm…          # runs the job again from its record: same CID?
    loraforge fsck [--remove]     # every object whose bytes no longer make its CID
    loraforge gc                  # deletes what no pin and no record keeps

Every command takes ``--store DIR`` (default: $LORAFORGE_HOME/store).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from loraforge import flags
from loraforge.errors import NotFound, UserError


def _store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None, help="store directory (default: $LORAFORGE_HOME/store)")


def _store(args):
    from loraforge.jobs.store import Store

    return Store(args.store)


def _export_into(store, cid: str, out: Path) -> None:
    """Exports `cid` to `out`, which may exist if empty (a mounted /outputs)."""
    if out.exists() and out.is_dir() and not any(out.iterdir()):
        tmp = out / ".export"
        store.export_dir(cid, tmp)
        for entry in tmp.iterdir():
            os.rename(entry, out / entry.name)
        tmp.rmdir()
    else:
        store.export_dir(cid, out)


# -- run -------------------------------------------------------------------------------------------


def run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("module", nargs="?", help="MODULE[:VERSION], e.g. lora_training or lora_training:1")
    parser.add_argument(
        "params",
        nargs="?",
        help="parameters: a JSON object or YAML flow mapping, e.g. '{seed: 3, steps: 500}'",
    )
    parser.add_argument("--params-file", default=None, help="read the parameters from a JSON or YAML file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one parameter, on top of the others (a text parameter takes VALUE as it is); repeatable",
    )
    parser.add_argument(
        "--param",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="as --set NAME=VALUE, with the value as its own argument (how the Lilypad templates pass them)",
    )
    parser.add_argument("--list", action="store_true", help="list the modules, their parameters and defaults")
    parser.add_argument(
        "--cid-version", type=int, choices=(0, 1), default=0, help="0: Qm… (default), 1: bafy…"
    )
    flags.add_out(parser, "also export the result directory here (a new or empty directory)")
    flags.add_json(parser, "the result and record CIDs, metrics and timings")
    parser.add_argument("--quiet", action="store_true", help="do not show the module's progress on stderr")
    _store_flag(parser)


def run_run(args) -> int:
    from loraforge.jobs.modules import describe_modules, find_module, parse_assignments, parse_params
    from loraforge.jobs.runner import run_job

    if args.list:
        print(describe_modules(), end="")
        return 0
    if not args.module:
        raise UserError("name a module (loraforge run --list shows them)")
    if args.params_file and args.params:
        raise UserError("give the parameters inline or with --params-file, not both")
    text = args.params
    if args.params_file:
        try:
            text = Path(args.params_file).read_text(encoding="utf-8")
        except OSError as e:
            raise NotFound(f"cannot read --params-file {args.params_file}: {e.strerror}") from None
    params = parse_params(text)
    assignments = args.set + [f"{name}={value}" for name, value in args.param]
    if assignments:
        params.update(parse_assignments(find_module(args.module), assignments))
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty directory")
    store = _store(args)
    job = run_job(args.module, params, store=store, cid_version=args.cid_version, quiet=args.quiet)
    if not job.record:  # not rank 0 of a multi-process launch: rank 0 reports
        return 0
    if out is not None:
        _export_into(store, job.result, out)
    if args.json:
        record = job.data
        print(
            json.dumps(
                {
                    "result": job.result,
                    "record": job.record,
                    "module": f"{record['module']}:{record['version']}",
                    "params": record["params"],
                    "metrics": record["metrics"],
                    "timings": record["timings"],
                },
                indent=2,
            )
        )
    else:
        print(job.result)
        where = f"; exported to {out}" if out else ""
        print(f"record: {job.record} (loraforge show {job.result}){where}", file=sys.stderr)
    return 0


# -- show / ls -------------------------------------------------------------------------------------


def show_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="a result CID, a record CID, or any object's CID")
    parser.add_argument("--log", action="store_true", help="also print the job's log")
    flags.add_json(parser, "the record")
    _store_flag(parser)


def show_run(args) -> int:
    from loraforge.jobs.runner import find_records

    store = _store(args)
    records = find_records(store, args.id)
    if not records:
        if not store.has(args.id):
            raise NotFound(f"{args.id} is not in the store {store.root}")
        kind = store._kind(args.id)
        print(f"{args.id}: a {kind[:-1]} in the store, named by no job record")
        if kind == "dirs":
            for name, child in store._entries(args.id):
                print(f"  {child}  {name}")
        return 0
    name, record = records[-1]
    if args.json:
        print(json.dumps({"record": name, **record}, indent=2, sort_keys=True))
        return 0
    env, timings = record.get("environment", {}), record.get("timings", {})
    print(f"record:  {name}")
    print(f"job:     {record['module']}:{record['version']}")
    print(f"result:  {record['result']}")
    print("params:  " + json.dumps(record["params"], sort_keys=False))
    for key, value in record.get("inputs", {}).items():
        print(f"input:   {key} = {value}")
    print("metrics: " + json.dumps(record.get("metrics", {})))
    shown = {k: v for k, v in timings.items() if not isinstance(v, list | dict)}
    print("timings: " + json.dumps(shown))
    print(
        "env:     "
        + ", ".join(
            f"{k} {env.get(k)}" for k in ("loraforge", "torch", "diffusers", "transformers", "device")
        )
        + f", threads {env.get('threads')}, deterministic {env.get('deterministic', {}).get('use_deterministic_algorithms')}"
    )
    if len(records) > 1:
        print(f"(and {len(records) - 1} earlier record(s) with the same result)")
    if args.log:
        print(record.get("log", ""), end="")
    return 0


def ls_arguments(parser: argparse.ArgumentParser) -> None:
    flags.add_json(parser, "the records")
    _store_flag(parser)


def ls_run(args) -> int:
    store = _store(args)
    rows = []
    for name in store.records():
        try:
            record = store.get_record(name)
        except UserError as e:
            print(f"{name}: {e}", file=sys.stderr)
            continue
        rows.append(
            {
                "record": name,
                "started": record.get("timings", {}).get("started", ""),
                "module": f"{record.get('module')}:{record.get('version')}",
                "result": record.get("result"),
                "seed": record.get("params", {}).get("seed"),
            }
        )
    rows.sort(key=lambda r: r["started"])
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(
                f"{r['started']}  {r['module']:<22} seed {r['seed']!s:<5} {r['result']}  record {r['record']}"
            )
        if not rows:
            print(f"no job records in {store.root}", file=sys.stderr)
    return 0


# -- export / verify / fsck / gc -------------------------------------------------------------------


def export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="a result CID (or a record's: its result) or any object's CID")
    parser.add_argument("dir", nargs="?", help="new directory (or file) to write it to")
    parser.add_argument("--car", default=None, metavar="FILE", help="write a CARv1 file instead")
    _store_flag(parser)


def _result_of(store, cid: str) -> str:
    from loraforge.jobs.runner import find_records

    if cid in store.records():
        return find_records(store, cid)[0][1]["result"]
    return cid


def export_run(args) -> int:
    store = _store(args)
    if bool(args.dir) == bool(args.car):
        raise UserError("give a directory or --car FILE (one of them)")
    cid = _result_of(store, args.id)
    if args.car:
        path = store.export_car(cid, args.car)
    else:
        path = Path(args.dir)
        _export_into(store, cid, path)
    print(f"exported {cid} to {path}", file=sys.stderr)
    return 0


def verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("id", help="a result CID or a record CID")
    flags.add_json(parser, "the verdict")
    _store_flag(parser)


def verify_run(args) -> int:
    from loraforge.jobs.runner import verify

    store = _store(args)
    v = verify(args.id, store, quiet=True)
    if args.json:
        print(
            json.dumps(
                {"record": v.record, "expected": v.expected, "got": v.got, "intact": v.intact, "ok": v.ok}
            )
        )
    elif v.ok:
        print(f"ok: re-ran record {v.record}: {v.got} matches")
    else:
        what = "matches" if v.expected == v.got else f"differs (got {v.got})"
        print(f"MISMATCH: re-ran record {v.record}: expected {v.expected}, the new result {what}")
        if not v.intact:
            print(f"the stored result {v.expected} is missing or damaged (loraforge fsck)")
        env = store.get_record(v.record).get("environment", {})
        if env.get("processes", 1) > 1:
            print(f"note: the job ran in {env['processes']} processes (DDP); verify re-ran it in one")
    return 0 if v.ok else 1


def fsck_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--remove", action="store_true", help="delete the damaged objects (re-add to restore)"
    )
    _store_flag(parser)


def fsck_run(args) -> int:
    store = _store(args)
    bad = store.fsck(remove=args.remove)
    for cid in bad:
        print(f"damaged: {cid}" + (" (removed)" if args.remove else ""))
    if not bad:
        print(f"ok: every object in {store.root} matches its CID")
    return 1 if bad else 0


def gc_arguments(parser: argparse.ArgumentParser) -> None:
    _store_flag(parser)


def gc_run(args) -> int:
    removed = _store(args).gc()
    print(f"removed {len(removed)} object(s) that no pin and no record keeps")
    return 0
