"""The `dromedary` command line.

    dromedary run CONFIG [--run-dir DIR] [key=value ...]   run a recipe (resumable)
    dromedary config CONFIG [key=value ...]                print the resolved config
    dromedary prepare-model SPEC                           build/cache a model, print its folder
    dromedary check-principles FILE                        validate a principle or seed file
    dromedary serve MODEL [--host H] [--port P]            OpenAI-style API on Ray Serve
    dromedary chat MODEL|URL                               talk to a model in the terminal
    dromedary eval MODEL --suite NAME [--data PATH]        hhh, truthfulqa, pairwise, ifeval
    dromedary report RUN_DIR [--out DIR]                   the run's HTML and Markdown report
    dromedary plan CONFIG [--cluster F] [--gpu T] [--json] GPUs, memory, hours, cost on paper
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dromedary_ray.errors import user_error


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dromedary", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe from a config file")
    run.add_argument("config")
    run.add_argument("--run-dir", help="where the run's stages go (overrides run_dir)")
    run.add_argument("--until", metavar="STAGE",
                     help="stop after this stage of the recipe; run again without it to go on")
    run.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    show = sub.add_parser("config", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*")
    prep = sub.add_parser("prepare-model", help="resolve a model spec to a local folder")
    prep.add_argument("spec")
    check = sub.add_parser("check-principles", help="validate a principle YAML or seed JSONL")
    check.add_argument("file")
    srv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    srv.add_argument("model", help="model spec: builtin:..., a folder, run:STAGE with --run-dir")
    srv.add_argument("--run-dir", help="run directory for run:STAGE specs")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key-env", help="env var holding the API key (required off loopback)")
    srv.add_argument("--replicas", type=int, default=1)
    srv.add_argument("--max-model-len", type=int, default=2048)
    srv.add_argument("--cpus-per-replica", type=float, default=2.0)
    srv.add_argument("--gpus-per-replica", type=float, default=0.0)
    srv.add_argument("--request-timeout", type=float, default=300.0, metavar="SECONDS",
                     help="deadline of each generation; past it the request is aborted (504)")
    srv.add_argument("--max-queued", type=int, default=256, metavar="N",
                     help="requests waiting for a replica; past them Serve answers 503")
    srv.add_argument("--address", help="Ray cluster to join (default: start one locally)")
    chat = sub.add_parser("chat", help="chat in the terminal with a served model or an engine")
    chat.add_argument("target", help="http(s)://host:port of a server, or a model spec")
    chat.add_argument("--run-dir", help="run directory for run:STAGE specs")
    chat.add_argument("--model", help="served model name (default: the server's first)")
    chat.add_argument("--api-key-env", help="env var holding the server's API key")
    chat.add_argument("--max-tokens", type=int, default=256)
    _eval_parser(sub)
    _plan_parser(sub)
    rep = sub.add_parser("report", help="write a run's report (HTML page and Markdown)")
    rep.add_argument("run_dir", help="the run directory")
    rep.add_argument("--out", help="where report.html, report.md and the PNGs go "
                                   "(default: RUN_DIR/report)")
    return p


def _eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="run an evaluation suite on a model")
    ev.add_argument("model", help="model spec: builtin:..., a folder, run:STAGE with --run-dir")
    ev.add_argument("--suite", required=True, choices=["hhh", "truthfulqa", "pairwise", "ifeval"])
    ev.add_argument("--data", help="the suite's data file or folder")
    ev.add_argument("--other", help="pairwise: the model to compare against")
    ev.add_argument("--judge", help="pairwise: judge model spec or http(s):// server URL")
    ev.add_argument("--judge-api-key-env", help="env var holding the judge server's API key")
    ev.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    ev.add_argument("--run-dir", help="run directory: run:STAGE specs, results to DIR/eval/")
    ev.add_argument("--name", metavar="LABEL",
                    help="with --run-dir: the model's row label in the run report; results go "
                         "to DIR/eval/LABEL/SUITE.json")
    ev.add_argument("--out", help="write the result JSON to this file")
    ev.add_argument("--json", action="store_true", help="print the result JSON on stdout")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--max-model-len", type=int, default=2048)
    ev.add_argument("--limit", type=int, help="first N items only (per subset for hhh)")


def _plan_parser(sub: argparse._SubParsersAction) -> None:
    plan = sub.add_parser("plan", help="plan a run on paper: GPUs, memory, nodes, hours, cost")
    plan.add_argument("config")
    plan.add_argument("--cluster", help="Ray autoscaler YAML (or KubeRay manifest) whose pools "
                                        "to plan on")
    plan.add_argument("--gpu", help="GPU type (dromedary_ray/plan/gpus.yaml); with --cluster, "
                                    "replaces the pools' GPUs")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("overrides", nargs="*", help="dotted key=value overrides")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # Overrides may come before or after --run-dir; argparse leaves the later ones unparsed.
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command not in ("run", "config", "plan")
                  or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    try:
        return _dispatch(args)
    except Exception as err:
        # Ours may come back from a Ray worker wrapped in Ray's task error (a full disk while
        # a worker commits its shard): print our one line, not Ray's traceback.
        ours = user_error(err)
        if ours is None:
            raise
        print(f"error: {ours}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    from dromedary_ray.config import dump_config, load_config

    if args.command == "run":
        from dromedary_ray.pipeline.driver import format_summary, run_pipeline

        overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir else []) \
            + ([f"until={args.until}"] if args.until else [])
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
    if args.command == "serve":
        return _serve(args)
    if args.command == "chat":
        return _chat(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "plan":
        return _plan(args)
    if args.command == "report":
        return _report(args)
    from dromedary_ray.principles import load_principles, load_seed_tasks

    if args.file.endswith((".jsonl", ".json")):
        print(f"ok: {len(load_seed_tasks(args.file))} seed tasks")
    else:
        ps = load_principles(args.file)
        print(f"ok: {len(ps.rules)} rules, {len(ps.exemplars)} exemplars")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from dromedary_ray.config import RayConfig
    from dromedary_ray.errors import ConfigError
    from dromedary_ray.models import resolve_model

    loopback = _is_loopback(args.host)
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: a TCP port is 1 to 65535")
    if not args.request_timeout > 0 or args.max_queued < 1:
        raise ConfigError(f"--request-timeout {args.request_timeout} / --max-queued "
                          f"{args.max_queued}: both must be positive")
    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and not api_key:
        raise ConfigError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    if not loopback and not api_key:
        raise ConfigError(f"--host {args.host}: serving beyond loopback needs an API key "
                          "(--api-key-env NAME)")
    from ray import serve

    from dromedary_ray.runtime.cluster import connect
    from dromedary_ray.serve.app import build_app, deploy

    connect(RayConfig(address=args.address))
    engine = {"max_model_len": args.max_model_len, "cpus_per_engine": args.cpus_per_replica,
              "gpus_per_engine": args.gpus_per_replica, "kv_cache_gib": 2}
    app = build_app({"model": resolve_model(args.model, args.run_dir),
                     "served_model_name": args.model, "engine": engine,
                     "api_key_env": args.api_key_env, "num_replicas": args.replicas,
                     "request_timeout_s": args.request_timeout,
                     "max_queued_requests": args.max_queued})
    url = deploy(app, "dromedary", args.host, args.port)
    print(f"serving {args.model} at {url}/v1 (Ctrl-C stops)", flush=True)
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


def _is_loopback(host: str) -> bool:
    """Whether `--host` is loopback; anything but `localhost` or an IP address is an error (a
    name could resolve anywhere, and Serve's proxy would bind wherever it resolves)."""
    import ipaddress

    from dromedary_ray.errors import ConfigError

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise ConfigError(f"--host {host!r}: not an IP address; give one (127.0.0.1 for this "
                          "machine only, 0.0.0.0 for every interface) or localhost") from None


def _chat(args: argparse.Namespace) -> int:
    import os

    from dromedary_ray.serve.chat import chat_loop, engine_replier, http_replier

    if args.target.startswith(("http://", "https://")):
        key = os.environ.get(args.api_key_env) if args.api_key_env else None
        reply = http_replier(args.target, args.model, key, args.max_tokens)
    else:
        from dromedary_ray.models import resolve_model

        reply = engine_replier(resolve_model(args.target, args.run_dir), args.max_tokens)
    chat_loop(reply)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import dataclasses

    from dromedary_ray.errors import ConfigError
    from dromedary_ray.eval import (
        EvalOptions,
        claim_stdout,
        format_table,
        model_slug,
        run_eval,
        save_result,
    )

    if args.name and not args.run_dir:
        raise ConfigError("--name labels the result in a run directory: give --run-dir too")
    if args.name and model_slug(args.name) != args.name:
        raise ConfigError(f"--name {args.name!r}: a folder name is needed (letters, digits, "
                          f"'.', '_', '-'), e.g. {model_slug(args.name)!r}")
    opts = EvalOptions(model=args.model, suite=args.suite, data=args.data, other=args.other,
                       judge=args.judge, judge_api_key_env=args.judge_api_key_env,
                       backend=args.backend, run_dir=args.run_dir,
                       max_new_tokens=args.max_new_tokens, max_model_len=args.max_model_len,
                       limit=args.limit)
    # With --json, stdout carries the JSON alone; the table and all logs go to stderr.
    out = claim_stdout() if args.json else sys.stdout
    table_to = sys.stderr if args.json else sys.stdout
    result = run_eval(opts)
    if args.name:  # filed under <run>/eval/<label>/ instead of the model spec's slug
        result = {**result, "label": args.name}
    saved_as = dataclasses.replace(opts, model=args.name) if args.name else opts
    written = save_result(result, saved_as, args.out)
    print(f"{opts.suite} on {opts.model}\n{format_table(result['metrics'])}", file=table_to)
    for path in written:
        print(f"result: {path}", file=table_to)
    if args.json:
        json.dump(result, out, indent=2, allow_nan=False)
        out.write("\n")
        out.flush()
    return 0


def _report(args: argparse.Namespace) -> int:
    from dromedary_ray.report import write_report

    files = write_report(args.run_dir, args.out)
    print(f"report: {files.html}\nmarkdown: {files.markdown} "
          f"({files.stages} stages, {len(files.images)} figures)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Print the plan; exit 1, naming each stage and its shortfall, when a stage does not fit."""
    from dromedary_ray.config import load_config
    from dromedary_ray.plan.planner import build_plan
    from dromedary_ray.plan.report import format_plan, plan_to_dict

    config = load_config(args.config, args.overrides)
    plan = build_plan(config, cluster=args.cluster, gpu=args.gpu, config_path=args.config)
    if args.json:
        print(json.dumps(plan_to_dict(plan), indent=2, allow_nan=False))
    else:
        print(format_plan(plan))
    for problem in plan.problems:
        print(f"error: {problem}", file=sys.stderr)
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
