"""The `dromedary` command line.

    dromedary run CONFIG [--run-dir DIR] [key=value ...]   run a recipe (resumable)
    dromedary config CONFIG [key=value ...]                print the resolved config
    dromedary prepare-model SPEC                           build/cache a model, print its folder
    dromedary check-principles FILE                        validate a principle or seed file
"""

from __future__ import annotations

import argparse
import logging
import sys

from dromedary_ray.errors import DromedaryError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dromedary", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe from a config file")
    run.add_argument("config")
    run.add_argument("--run-dir", help="where the run's stages go (overrides run_dir)")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    show = sub.add_parser("config", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    prep = sub.add_parser("prepare-model", help="resolve a model spec to a local folder")
    prep.add_argument("spec")
    check = sub.add_parser("check-principles", help="validate a principle YAML or seed JSONL")
    check.add_argument("file")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after --run-dir; argparse leaves the later ones unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("run", "config") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return _dispatch(args)
    except DromedaryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from dromedary_ray.config import dump_config, load_config

    if args.command == "run":
        from dromedary_ray.pipeline.driver import format_summary, run_pipeline

        overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else [])
        config = load_config(args.config, overrides)
        reports = run_pipeline(config)
        print(format_summary(reports))
        print(f"\nrun directory: {config.run_dir}  (resolved config: {config.run_dir}/config.yaml)")
        return 0
    if args.command == "config":
        print(dump_config(load_config(args.config, args.overrides)), end="")
        return 0
    if args.command == "prepare-model":
        from dromedary_ray.models import resolve_model

        print(resolve_model(args.spec))
        return 0
    from dromedary_ray.principles import load_principles, load_seed_tasks

    if args.file.endswith((".jsonl", ".json")):
        print(f"ok: {len(load_seed_tasks(args.file))} seed tasks")
    else:
        ps = load_principles(args.file)
        print(f"ok: {len(ps.rules)} rules, {len(ps.exemplars)} exemplars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
