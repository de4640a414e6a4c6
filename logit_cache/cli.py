"""``logit_cache ls|info|verify|gc|compact`` — and ``logit_cache fill``, which lives in ``deploy.fill``.

Why ``fill`` is forwarded: filling streams a dataset through teacher servers over HTTP (httpx,
``teacher_server.client``): orchestration, not storage, so it lives in ``deploy/fill.py`` and no
module of this package imports httpx, FastAPI or teacher_server. ``logit_cache fill ...`` (and
``python -m logit_cache fill ...``) stays the same command with the same flags: :func:`main` hands
everything after ``fill`` to ``deploy.fill.main``, imported lazily at that one line — the only
place where logit_cache reaches up into another package, so the storage commands never load it.
``ckd fill`` is the same command.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .errors import CacheError
from .maintenance import compact, gc, info, verify
from .meta import CacheMeta
from .store import list_groups, open_group


def _group_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="cache root (local path or fsspec URL, e.g. cache/3b or s3://bucket/cache/3b)")
    p.add_argument("group", help="group name inside the root (see `logit_cache ls ROOT`)")


def _json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _ls_args(p):
    p.add_argument("root")
    p.add_argument("group", nargs="?", help="show this group's segments instead of the root's groups")


def _ls(a) -> int:
    if a.group:
        g = open_group(a.root, a.group)
        for m in g.committed():
            print(f"committed   {m.segment}  samples={m.num_samples} text_pos={m.text_positions} "
                  f"visual_pos={m.visual_positions}")
        for s in g.uncommitted_segments():
            print(f"uncommitted {s}")
        for s, why in g.damaged_manifests().items():
            print(f"DAMAGED     {s}  manifest unreadable: {why}")
        return 0
    for name, m in list_groups(a.root).items():
        if isinstance(m, CacheMeta):
            g = open_group(a.root, name)
            print(f"{name}  samples={g.num_samples()} template={m.template} dataset={m.dataset_fingerprint} "
                  f"k={m.k} encoding={m.value_encoding} kinds={','.join(m.target_kinds)}")
        else:
            print(f"{name}  UNREADABLE: {m}")
    return 0


def _info(a) -> int:
    _json(info(open_group(a.root, a.group)))
    return 0


def _verify(a) -> int:
    rep = verify(open_group(a.root, a.group), progress=not a.quiet)
    _json(rep)
    return 0


def _gc_args(p):
    _group_args(p)
    p.add_argument("--min-age", type=float, default=3600.0,
                   help="seconds after which an uncommitted segment of a writer on another host is removed")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--remove-damaged", action="store_true",
                   help="also delete segments whose manifest is damaged (their samples must then be re-filled); "
                        "without it they are kept and listed")


def _gc(a) -> int:
    _json(gc(open_group(a.root, a.group), min_age_s=a.min_age, dry_run=a.dry_run, remove_damaged=a.remove_damaged))
    return 0


def _compact_args(p):
    _group_args(p)
    p.add_argument("--target-rows", type=int, default=65536, help="samples per merged segment")
    p.add_argument("--small-rows", type=int, default=None, help="merge segments smaller than this")
    p.add_argument("--target-mb", type=int, default=1024,
                   help="uncompressed MiB per merged segment (at most): the memory compact needs")


def _compact(a) -> int:
    new = compact(open_group(a.root, a.group), target_rows=a.target_rows, small_rows=a.small_rows,
                  progress=not a.quiet, target_bytes=a.target_mb << 20)
    _json({"new_segments": new})
    return 0


COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "ls": (_ls_args, _ls, "list the groups of a root, or the segments of a group"),
    "info": (_group_args, _info, "metadata, counts, bytes per position, compression ratio"),
    "verify": (_group_args, _verify, "damaged manifests, checksums, offsets, value ranges; every committed key "
                                     "readable (non-zero exit on any problem)"),
    "gc": (_gc_args, _gc, "remove uncommitted segments of dead writers and replaced segments"),
    "compact": (_compact_args, _compact, "merge small segments into large ones atomically"),
}
FILL_HELP = "fill a cache by streaming a dataset through teacher servers (deploy.fill; `--help` for its flags)"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="logit_cache", description="Inspect and maintain logit_cache stores.")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, (add, _, help_) in COMMANDS.items():
        add(sub.add_parser(name, help=help_))
    sub.add_parser("fill", help=FILL_HELP, add_help=False)  # listed here, parsed by deploy.fill
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = build_parser()
    cmd_at = next((i for i, x in enumerate(argv) if not x.startswith("-")), None)  # global options take no value
    if cmd_at is not None and argv[cmd_at] == "fill":
        quiet = ap.parse_args(argv[:cmd_at + 1]).quiet
        from deploy.fill import main as fill_main  # the one lazy forward (see the module docstring)

        return fill_main(argv[cmd_at + 1:], quiet=quiet)
    a = ap.parse_args(argv)
    try:
        return COMMANDS[a.cmd][1](a)
    except CacheError as e:
        print(f"logit_cache {a.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
