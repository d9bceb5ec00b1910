"""`pretrain`: thin command line. Parse, load the config once, call one function per subcommand."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline import __version__
from pipeline.config import ConfigError, load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
EXIT_USER_ERROR = 1
EXIT_CONFIG_ERROR = 2


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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="read, quarantine, train a tokenizer, tokenize and write shards",
                       description="Ray Data stage: jsonl sources → quarantine.jsonl, tokenizer.json, "
                       "Megatron-format train/validation shards and a verified manifest.json.")
    _add_config_args(p)
    p.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (default: RAY_ADDRESS, else an embedded Ray)")

    p = sub.add_parser("train", help="train with DeepSpeed over the prepared shards",
                       description="Trains the configured model with DeepSpeed/ZeRO. Under torchrun, "
                       "deepspeed, accelerate or srun each process is one rank; otherwise it starts "
                       "train.nproc_per_node ranks itself. Resumes from the newest committed checkpoint.")
    _add_config_args(p)
    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="ranks to start on this machine when no launcher started us")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("eval", help="evaluate the newest committed checkpoint of a run",
                       description="Scores a committed checkpoint on the validation split, writes "
                       "eval.json beside it and logs to the run's W&B project and group.")
    p.add_argument("run_dir", help="the run directory (train's run_dir)")
    p.add_argument("--checkpoint", type=int, default=None, metavar="STEP",
                   help="evaluate this step instead of the newest")

    p = sub.add_parser("export", help="write a committed checkpoint as a transformers model",
                       description="Exports model.safetensors + config.json + tokenizer.json that "
                       "transformers loads as GPT2LMHeadModel or BertForMaskedLM.")
    p.add_argument("checkpoint", help="a checkpoint directory, or a run directory (its newest checkpoint)")
    p.add_argument("--to", choices=["hf"], default="hf", help="target format (default: hf)")
    p.add_argument("out_dir", help="output directory")

    p = sub.add_parser("demo", help="the whole flow on the bundled demo corpus, offline, CPU is fine",
                       description="Builds a corpus from the Python standard library's docstrings, "
                       "then runs prepare → train (2 ranks, gloo) → eval with configs/demo.yaml.")
    p.add_argument("--run-dir", default="runs/demo", help="where everything goes (default: runs/demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of configs/demo.yaml")
    return parser


def cmd_prepare(args) -> int:
    from pipeline.data.prepare import prepare

    cfg = load_config(args.config, args.overrides)
    prepare(cfg.data, ray_address=args.ray_address)
    return 0


def cmd_train(args) -> int:
    from pipeline.launch import local

    overrides = list(args.overrides)
    if args.nproc_per_node is not None:
        overrides.append(f"train.nproc_per_node={args.nproc_per_node}")
    cfg = load_config(args.config, overrides)
    if local.under_launcher():
        from pipeline.train.loop import train
        import torch.distributed as dist

        try:
            train(cfg)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
        return 0
    cfg.gradient_accumulation_steps(cfg.train.nproc_per_node)  # fail before any process starts
    if cfg.train.nproc_per_node > 1:
        return local.run_torchrun(cfg)
    local.run_single_process(cfg)
    return 0


def cmd_eval(args) -> int:
    from pipeline.eval.evaluate import evaluate

    evaluate(args.run_dir, step=args.checkpoint)
    return 0


def cmd_export(args) -> int:
    from pipeline.export import export_hf

    export_hf(args.checkpoint, args.out_dir)
    return 0


def cmd_demo(args) -> int:
    from pipeline.demo import run_demo

    return run_demo(args.run_dir, args.overrides, CONFIG_DIR / "demo.yaml")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"prepare": cmd_prepare, "train": cmd_train, "eval": cmd_eval, "export": cmd_export,
               "demo": cmd_demo}[args.command]
    from pipeline.data.manifest import ManifestError
    from pipeline.data.prepare import PrepareError
    from pipeline.data.shards import ShardError
    from pipeline.eval.evaluate import EvalError
    from pipeline.train.checkpoint import CheckpointError

    try:
        return handler(args)
    except ConfigError as exc:
        print(f"pretrain {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (ManifestError, ShardError, EvalError, CheckpointError, PrepareError) as exc:
        if os.environ.get("PRETRAIN_DEBUG"):
            raise
        print(f"pretrain {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
