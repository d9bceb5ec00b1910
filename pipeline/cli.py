"""`pretrain`: thin command line. Parse, load the config once, call one function per subcommand."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipeline import __version__
from pipeline.config import load_config
from pipeline.config import PRESETS_DIR
from pipeline.errors import ConfigError, PipelineError
from pipeline.errors import EXIT_USER_ERROR  # noqa: F401  (scripts compare exit codes with cli.EXIT_USER_ERROR)

CONFIG_DIR = PRESETS_DIR  # the bundled configs: the checkout's configs/, or the wheel's pipeline/configs


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config (see configs/); sections: data, model, optim, train, ...")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one field, e.g. --set train.max_steps=50 (repeatable; VALUE is YAML)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Raw corpora in, evaluated BERT/GPT checkpoints and dashboards out: "
        "Ray prepares the data, DeepSpeed trains, eval jobs log to Weights & Biases.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    # the `deepspeed` launcher puts --local_rank=N before the subcommand; the rank comes from the env
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="read, clean, dedup, quarantine, train a tokenizer, tokenize and write shards",
                       description="Data stages (forked local processes for small inputs, Ray Data for large ones or with "
                       "--ray-address): jsonl/parquet/text/HF-dataset sources → cleaned and "
                       "deduplicated documents (quarantine.jsonl, duplicates.jsonl), tokenizer.json, "
                       "Megatron-format train/validation shards and a verified manifest.json. Stages whose "
                       "inputs and config are unchanged are reused. See docs/data.md.")
    _add_config_args(p)
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: RAY_ADDRESS, else an embedded Ray)")
    p.add_argument("--force", action="store_true", help="re-run every stage even if its outputs are current")
    p.add_argument("--append", action="store_true",
                   help="grow the existing dataset with the config's new input files (continued pretraining): "
                   "existing shards are kept byte for byte, new ones added; runs on it resume where they stopped")
    p.set_defaults(handler=cmd_prepare)

    p = sub.add_parser("train", help="train with DeepSpeed over the prepared shards",
                       description="Trains the configured model with DeepSpeed/ZeRO. Under torchrun, "
                       "deepspeed, accelerate or srun each process is one rank; otherwise it starts "
                       "train.nproc_per_node ranks itself. Resumes from the newest committed checkpoint.")
    _add_config_args(p)
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks to start on this machine when no launcher started us")
    p.add_argument("--backend", choices=["local", "ray"], default="local",
                   help="how to start ranks when no launcher did: local (torchrun on this machine) or ray "
                   "(Ray Train TorchTrainer workers; embedded Ray, or the cluster at RAY_ADDRESS)")
    p.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="--backend ray: ranks in total (default: launch.nodes × ranks per node)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("consolidate", help="rebuild a checkpoint's full fp32 weights from its DeepSpeed state",
                       description="Merges the ZeRO partitions of a committed checkpoint (DeepSpeed's "
                       "zero_to_fp32) into one safetensors file, after checking it bit for bit against the "
                       "checkpoint's model.safetensors.")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("out", help="the .safetensors file to write")
    p.set_defaults(handler=cmd_consolidate)

    p = sub.add_parser("eval", help="evaluate committed checkpoints (the newest, or --watch: each new one)",
                       description="Scores a committed checkpoint (loss, perplexity and token accuracy per "
                       "split and source; BERT: masked-LM accuracy; zero-shot --tasks; lm-evaluation-harness "
                       "--lm-eval), writes eval.json beside it and logs to the run's W&B project and group, "
                       "in the one eval run of the training run. See docs/evaluation.md.")
    p.add_argument("run_dir", help="the run directory (train's run_dir), or one of its checkpoint directories")
    p.add_argument("--checkpoint", type=int, default=None, metavar="STEP",
                   help="evaluate this step instead of the newest")
    p.add_argument("--watch", action="store_true",
                   help="keep polling and evaluate every new committed checkpoint exactly once; stops "
                   "once train.max_steps is evaluated, or on SIGTERM/Ctrl-C")
    p.add_argument("--interval-s", type=float, default=60.0, metavar="N", help="--watch: seconds between polls")
    p.add_argument("--max-evals", type=int, default=None, metavar="N", help="--watch: stop after N evaluations")
    p.add_argument("--until-step", type=int, default=None, metavar="STEP",
                   help="--watch: stop once a checkpoint at or past STEP is evaluated (default: train.max_steps)")
    p.add_argument("--tasks", nargs="+", default=[], metavar="FILE",
                   help="zero-shot task files, jsonl: cloze or multiple choice (GPT only; e.g. tasks/*.jsonl)")
    p.add_argument("--lm-eval", action="append", default=[], metavar="TASKS",
                   help="also run lm-evaluation-harness tasks (GPT only): registered names, task YAML files "
                   "(e.g. tasks/cloze_stdlib.yaml) or names in an --lm-eval-include folder; comma-separated, "
                   "repeatable (needs `pip install lm-eval`)")
    p.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAMLs whose task names --lm-eval may use (repeatable)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--ray", action="store_true",
                   help="score each checkpoint in a Ray task (embedded Ray, or RAY_ADDRESS / --ray-address)")
    p.add_argument("--ray-address", default=None, help="--ray: join this Ray cluster")
    p.add_argument("--ray-gpus", type=float, default=0.0, metavar="N", help="--ray: GPUs per evaluation task")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("report", help="write a self-contained HTML + PNG report of a run (no W&B needed)",
                       description="Loss, learning-rate and throughput curves from metrics.jsonl, eval "
                       "metrics per checkpoint and the data manifest, as one offline HTML page with "
                       "inline SVG plots, plus a PNG of the plots.")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="the HTML file (default: RUN_DIR/report.html; the PNG goes beside it)")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("status", help="where a run stands: checkpoint, tokens of the budget, ETA, last eval",
                       description="Reads the run directory only (no GPU, no W&B): newest committed "
                       "checkpoint, tokens trained of max_steps × global batch × seq_len, ETA from the "
                       "recent tokens/s, and the newest eval record.")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("export", help="write a committed checkpoint as a transformers model",
                       description="Exports model.safetensors, config.json, the tokenizer with its special "
                       "tokens, generation_config.json and a model card (README.md) that transformers loads "
                       "as GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM or ModernBertForMaskedLM.")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--to", choices=["hf"], default="hf", help="target format (default: hf)")
    p.add_argument("out_dir", help="output directory")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser(
        "submit", help="run prepare → train → eval on a Ray cluster, Slurm or Kubernetes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Submit the pipeline to a cluster (docs/cluster.md).\n"
        "  ray:   a Ray job through the Jobs API of RAY_ADDRESS / --address (http://HEAD:8265); the\n"
        "         train stage uses Ray Train across launch.nodes nodes\n"
        "  slurm: an sbatch script rendered from launch/slurm/train.sbatch, one torchrun per node via\n"
        "         srun, requeued on preemption\n"
        "  k8s:   a KubeRay RayJob manifest, applied with `kubectl apply -f -`\n"
        "--schedule CRON makes it recurring (RayCronJob or CronJob on k8s, scrontab on Slurm, a crontab\n"
        "line for Ray); each firing resumes from the newest checkpoint and does nothing once\n"
        "train.max_steps is reached. Relative paths in the config are made absolute: run_dir and\n"
        "data.output_dir must be on storage that the cluster's nodes share, or on an object store\n"
        "(s3://bucket/prefix: then no node needs a shared filesystem; see docs/cluster.md).")
    _add_config_args(p)
    p.add_argument("--to", required=True, choices=["ray", "slurm", "k8s"], help="where to run")
    p.add_argument("--nodes", type=int, default=None, metavar="N", help="nodes (default: launch.nodes)")
    p.add_argument("--gpus-per-node", type=int, default=None, metavar="G",
                   help="GPUs per node, one rank each (default: launch.gpus_per_node; 0: CPU nodes)")
    p.add_argument("--stage", choices=["all", "prepare", "train", "eval"], default="all",
                   help="run one stage instead of all three (ray, slurm)")
    p.add_argument("--schedule", metavar="CRON", default=None,
                   help="recurring run, five cron fields, e.g. '0 */6 * * *'")
    p.add_argument("--dry-run", action="store_true", help="print the job / script / manifest, submit nothing")
    p.add_argument("--wait", action="store_true",
                   help="block until the job ends; exit 0 only if it succeeded (ray, slurm)")
    p.add_argument("--address", default=None,
                   help="ray: Jobs API address (default: launch.ray.address, else RAY_ADDRESS)")
    p.set_defaults(handler=cmd_submit)

    p = sub.add_parser(
        "plan", help="pre-flight checks and a memory / throughput estimate, before any GPU is allocated",
        description="Checks the global batch against the world size, the prepared data's manifest and the "
        "run's newest checkpoint (same model, same global batch, same data), then prints parameters, FLOPs "
        "per token, the per-GPU memory for the ZeRO stage and precision, the tokens to train and the time "
        "at the given MFU. Exit 0: nothing blocks the run; 1: a check failed; 2: the config is invalid.")
    _add_config_args(p)
    p.add_argument("--world-size", type=int, default=None, metavar="N",
                   help="ranks in total (default: launch.nodes × launch.gpus_per_node, or "
                   "train.nproc_per_node on CPU)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOPs per rank at the training precision (default: 989, H100 SXM dense bf16, "
                   "for GPU runs; measured on this machine for CPU runs, launch.gpus_per_node 0)")
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("demo", help="the whole flow on the bundled demo corpus, offline, CPU is fine",
                       description="Builds a corpus from the Python standard library's docstrings, "
                       "then runs prepare → train (2 ranks, gloo) → eval with configs/demo.yaml.")
    p.add_argument("--run-dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    p.add_argument("--config", default=str(CONFIG_DIR / "demo.yaml"),
                   help="demo config (default: configs/demo.yaml; configs/demo-bert.yaml trains a BERT)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of configs/demo.yaml")
    p.set_defaults(handler=cmd_demo)

    p = sub.add_parser("presets", help="list the bundled presets (use one as `base: [NAME]` in any config)",
                       description="Model sizes and demo configs shipped with the pipeline, with their "
                       "parameter counts; any config, wherever it lives, builds on one with `base: [NAME]`.")
    p.set_defaults(handler=cmd_presets)

    p = sub.add_parser("init", help="print a commented starting config: pretrain init > my.yaml",
                       description="Writes a commented config to standard output that builds on a preset "
                       "(base: [NAME]) and names your corpora; `pretrain plan` it next.")
    p.add_argument("--model", default="gpt2-small", metavar="PRESET",
                   help="the model preset to build on (default gpt2-small; see `pretrain presets`)")
    p.add_argument("--data", nargs="+", default=[], metavar="PATH", help="corpus files or folders (sources)")
    p.set_defaults(handler=cmd_init)
    return parser


def localize(location: str, checkpoints="newest") -> str:
    """A run or checkpoint directory given as an object-store URI: this node's mirror of it."""
    from pipeline.train.remote import localize as mirror

    return mirror(location, checkpoints)


def cmd_prepare(args) -> int:
    from pipeline.data.command import lease_lock, run_prepare
    from pipeline.launch.lock import RunLock, read_lease
    from pipeline.rundir import DatasetDir

    cfg = load_config(args.config, args.overrides)
    if args.append and args.force:
        raise ConfigError("--append and --force exclude each other (--force rebuilds the whole dataset)")
    out = cfg.data.output_dir  # one prepare per dataset directory at a time, as train on a run directory
    lock = RunLock(out, cfg.launch.lock_lease_s, cfg.launch.lock_heartbeat_s, command="pretrain prepare",
                   lock_file=DatasetDir.LOCK)
    run_prepare(cfg.data, lease_lock(lock, lambda: read_lease(out, DatasetDir.LOCK)), append=args.append,
                force=args.force, ray_address=args.ray_address)
    return 0


def cmd_train(args) -> int:
    from pipeline.launch.route import run_train
    from pipeline.train.console import STARTED_ENV

    ours = STARTED_ENV not in os.environ
    os.environ.setdefault(STARTED_ENV, repr(time.time()))  # the ranks time their start-up from here
    overrides = list(args.overrides)
    if args.nproc_per_node is not None:
        overrides.append(f"train.nproc_per_node={args.nproc_per_node}")
    try:
        return run_train(load_config(args.config, overrides), backend=args.backend, num_workers=args.num_workers)
    finally:
        if ours:
            os.environ.pop(STARTED_ENV, None)


def cmd_eval(args) -> int:
    from pipeline.eval.evaluate import EvalError, EvalOptions
    from pipeline.eval.watch import evaluate_once, watch
    from pipeline.rundir import RunDir

    lm_eval = tuple(t.strip() for arg in args.lm_eval for t in arg.split(",") if t.strip())
    options = EvalOptions(tasks=tuple(args.tasks), device=args.device, lm_eval_tasks=lm_eval,
                          lm_eval_include=tuple(args.lm_eval_include))
    ray = {"use_ray": args.ray, "ray_address": args.ray_address, "ray_gpus": args.ray_gpus}
    wanted = "none" if args.watch else "newest" if args.checkpoint is None else [args.checkpoint]
    args.run_dir = localize(args.run_dir, wanted)  # an s3:// run: this node's mirror of it
    if not args.watch:
        if args.max_evals is not None or args.until_step is not None:
            raise EvalError("--max-evals and --until-step apply to --watch only")
        evaluate_once(args.run_dir, step=args.checkpoint, options=options, **ray)
        return 0
    if args.checkpoint is not None:
        raise EvalError("--checkpoint and --watch exclude each other (--watch evaluates every checkpoint)")
    if RunDir.of_checkpoint(args.run_dir) is not None:
        raise EvalError(f"{args.run_dir}: --watch takes the run directory (it evaluates every new checkpoint), "
                        f"not one checkpoint")
    watch(args.run_dir, options, interval_s=args.interval_s, max_evals=args.max_evals,
          until_step=args.until_step, **ray)
    return 0


def cmd_report(args) -> int:
    from pipeline.eval.report import write_report
    from pipeline.rundir import RunDir
    from pipeline.train.remote import push_run

    run_dir = localize(args.run_dir, "meta")
    write_report(run_dir, args.out)
    if args.out is None:
        push_run(RunDir(run_dir))  # a run on an object store: its report goes beside it
    return 0


def cmd_status(args) -> int:
    from pipeline.eval.status import print_status

    print_status(localize(args.run_dir, "meta"), as_json=args.json)
    return 0


def cmd_export(args) -> int:
    import shlex

    from pipeline.export import export_hf

    command = shlex.join(["pretrain", "export", args.checkpoint, "--to", args.to, args.out_dir])
    export_hf(localize(args.checkpoint), args.out_dir, command=command)
    return 0


def cmd_submit(args) -> int:
    from pipeline.launch import cluster

    overrides = list(args.overrides)
    if args.nodes is not None:
        overrides.append(f"launch.nodes={args.nodes}")
    if args.gpus_per_node is not None:
        overrides.append(f"launch.gpus_per_node={args.gpus_per_node}")
    cfg = load_config(args.config, overrides)
    schedule = cluster.check_cron(args.schedule) if args.schedule else None
    if args.wait and (args.to == "k8s" or schedule):
        raise ConfigError("--wait applies to a one-off run on ray or slurm")
    if args.to == "ray":
        from pipeline.launch import ray_jobs

        if schedule:
            line = ray_jobs.schedule(cfg, schedule, args.config, overrides, args.address, args.stage)
            print("# Ray has no scheduler of its own: add this line to the crontab (crontab -e) of a machine "
                  "that reaches the cluster;\n# each firing submits a job that resumes the run, and appends "
                  "what it printed to RUN_DIR/schedule.log")
            print(line)
            return 0
        return ray_jobs.submit(cfg, stage=args.stage, address=args.address, dry_run=args.dry_run, wait=args.wait)
    if args.to == "slurm":
        from pipeline.launch import slurm

        return slurm.submit(cfg, stage=args.stage, dry_run=args.dry_run, wait=args.wait, schedule=schedule)
    from pipeline.launch import k8s

    return k8s.submit(cfg, dry_run=args.dry_run, schedule=schedule)


def cmd_plan(args) -> int:
    from pipeline.plan import run_plan

    cfg = load_config(args.config, args.overrides)
    world = args.world_size or cfg.launch.nodes * cfg.launch.ranks_per_node(cfg.train)
    if world < 1:
        raise ConfigError(f"--world-size must be positive, got {world}")
    if not 0 < args.mfu <= 1 or (args.peak_tflops is not None and args.peak_tflops <= 0):
        raise ConfigError(f"--mfu must be in (0, 1] and --peak-tflops positive, got {args.mfu}, {args.peak_tflops}")
    return run_plan(cfg, world, args.mfu, args.peak_tflops)


def cmd_consolidate(args) -> int:
    from pipeline.train.consolidate import consolidate

    consolidate(localize(args.checkpoint), args.out)
    return 0


def cmd_presets(args) -> int:
    from pipeline.presets import format_presets

    print(format_presets())
    return 0


def cmd_init(args) -> int:
    from pipeline.presets import starting_config

    print(starting_config(args.model, args.data), end="")
    return 0


def cmd_demo(args) -> int:
    from pipeline.demo import run_demo

    return run_demo(args.run_dir, args.overrides, Path(args.config))


def unknown_command(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """One line for a subcommand that does not exist (``pretrain trian``), with the nearest real
    names; None when ``argv``'s command is real (or absent: argparse says what is missing)."""
    import difflib

    names = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args = iter(argv)
    for arg in args:
        if arg in ("--local_rank", "--local-rank"):  # its value is the next word
            next(args, None)
        elif not arg.startswith("-"):
            if arg in names:
                return None
            close = difflib.get_close_matches(arg, list(names), n=2, cutoff=0.6)
            hint = f"did you mean {' or '.join(f'`pretrain {c}`' for c in close)}?" if close else \
                "`pretrain --help` lists the commands"
            return f"pretrain: unknown command `{arg}`; {hint}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    unknown = unknown_command(parser, argv)
    if unknown:
        print(unknown, file=sys.stderr)
        return 2  # argparse's code for a usage error
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except PipelineError as exc:  # one line, and the exit code the error class carries
        if os.environ.get("PRETRAIN_DEBUG"):
            raise
        print(f"pretrain {args.command}: {'error: ' if exc.prefix_error else ''}{exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `pretrain plan … | head`: the reader left; nothing more to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
