"""The `dynaroute` command line. Each subcommand's work lives in the module named for it."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from dynaroute.config import SloConfig

if TYPE_CHECKING:
    from dynaroute.experts.mlp import MLPConfig

# `train` options by what reads them: given where nothing reads them, they would be ignored silently.
TEXT_ONLY = ("max_length", "max_examples", "base_model", "steps", "teacher_epochs", "teacher_steps", "width_steps",
             "depth_steps", "router_examples", "batch_size", "threads")
SST2_ONLY = ("val_examples", "test_examples")
TABULAR_ONLY = ("paths", "hidden", "blocks", "widths")
FILES_ONLY = ("validation", "test", "text_column", "feature_columns", "label_column", "val_fraction", "test_fraction")


def _flags(names: tuple[str, ...]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)


def _refused(args: argparse.Namespace) -> str | None:
    """Why these `train` options do not go together, or None."""
    if args.task == "digits":
        unread, what = ("data", "family", *TEXT_ONLY, *SST2_ONLY, *FILES_ONLY), "`train digits`"
    elif args.task == "sst2":
        unread, what = ("family", *TABULAR_ONLY, *FILES_ONLY), "`train sst2` (a text recipe)"
    elif args.data is None:
        return "dynaroute train: give --data FILE (CSV, TSV, JSON Lines or .npz), or a recipe: digits, sst2"
    elif args.text_column is not None:
        unread, what = ("family", *TABULAR_ONLY, *SST2_ONLY), "text data (--text-column)"
    elif args.family is not None:
        unread, what = (*TEXT_ONLY, *SST2_ONLY, *TABULAR_ONLY), "a --family of your own (set its config in Python)"
    else:
        unread, what = (*TEXT_ONLY, *SST2_ONLY), "tabular data (no --text-column)"
    ignored = tuple(name for name in unread if getattr(args, name) is not None)
    return f"dynaroute train: {_flags(ignored)} do not apply to {what}" if ignored else None


def _mlp_config(args: argparse.Namespace) -> MLPConfig:
    from dynaroute.experts.mlp import MLPConfig

    options = {"num_paths": args.paths, "hidden": args.hidden, "num_blocks": args.blocks,
               "widths": tuple(float(w) for w in args.widths.split(",")) if args.widths else None}
    return MLPConfig(**{k: v for k, v in options.items() if v is not None})


def _train(args: argparse.Namespace) -> int:
    from dynaroute import logs
    from dynaroute.errors import DynarouteError

    refused = _refused(args)
    if refused:
        logs.error_line(__name__, refused)
        return 2
    try:
        return _run_train(args)
    except (DynarouteError, ValueError) as e:  # bad data or a bad option: one line, no bundle, no traceback
        logs.error_line(__name__, f"dynaroute train: {e}")
        return 2


def _run_train(args: argparse.Namespace) -> int:
    from dynaroute.training.supernet import SupernetTrainConfig

    if args.task == "sst2":
        from dynaroute.training.sst2 import main_sst2

        return main_sst2(args)
    if args.epochs is not None and args.text_column is None and args.epochs != int(args.epochs):
        raise ValueError(f"--epochs must be a whole number for tabular data, got {args.epochs:g}")
    tabular_cfg = SupernetTrainConfig(epochs=int(args.epochs or SupernetTrainConfig.epochs), seed=args.seed)
    if args.task == "digits":
        from dynaroute.training.digits import train_digits

        bundle = train_digits(args.out, _mlp_config(args), tabular_cfg, name=args.name or "digits",
                              run_dir=args.run_dir)
    else:
        import torch

        from dynaroute.training.pipeline import train
        from dynaroute.training.sst2 import config_from_args

        text = args.text_column is not None
        if text:
            torch.set_num_threads(max(1, int(args.threads or torch.get_num_threads())))
        bundle = train(
            args.data, args.out, validation=args.validation, test=args.test, label_column=args.label_column,
            text_column=args.text_column,
            feature_columns=[c.strip() for c in args.feature_columns.split(",")] if args.feature_columns else None,
            val_fraction=args.val_fraction or 0.2, test_fraction=args.test_fraction or 0.2, seed=args.seed,
            family=args.family,
            name=args.name, run_dir=args.run_dir, model_config=None if text or args.family else _mlp_config(args),
            train_config=config_from_args(args) if text else tabular_cfg, base_model=args.base_model,
            steps_cap=args.steps,
        )
    full = bundle.subnet_info(bundle.full_subnet)
    print(f"wrote bundle {bundle.name!r} to {args.out} in {bundle.manifest['train_seconds']} s; "
          f"labels {bundle.labels}; full model test accuracy {full['test_accuracy']:.4f}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from dynaroute.training.report import main_eval

    return main_eval(args)


def _serve(args: argparse.Namespace) -> int:
    from dynaroute.gateway.server import main_serve

    return main_serve(args)


def _infer(args: argparse.Namespace) -> int:
    from dynaroute.client_cli import main_infer

    return main_infer(args)


def _export(args: argparse.Namespace) -> int:
    from dynaroute.export import main_export

    return main_export(args)


def _demo(args: argparse.Namespace) -> int:
    from dynaroute.demo import main_demo

    return main_demo(args)


def _models(args: argparse.Namespace) -> int:
    from dynaroute.client_cli import main_models

    return main_models(args)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows each flag's default after its help, as argparse.ArgumentDefaultsHelpFormatter does,
    except where the help already says it in words (a default of None means "not set", which
    only words can explain) and for on/off switches (off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or not action.option_strings or action.required or unset:
            return text
        return text + " (default: %(default)s)"


def _common() -> argparse.ArgumentParser:
    """Flags every subcommand takes: how it logs."""
    from dynaroute.logs import FORMATS, LEVELS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("logging")
    g.add_argument("--log-level", default="info", choices=LEVELS, help="the least severe log lines written")
    g.add_argument("--log-format", default="text", choices=FORMATS,
                   help="log lines (stderr) and status lines (stdout) as text, or as JSON objects with time, "
                   "level, logger, message and extra fields")
    return p


def _connection() -> argparse.ArgumentParser:
    """Flags of the commands that call a server: TLS, token, timeout."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--timeout-s", type=float, default=10.0, help="deadline of each call, in seconds")
    g.add_argument("--ca", default=None, help="CA certificate to verify a TLS server (default: plaintext)")
    g.add_argument("--cert", default=None, help="client certificate for mutual TLS (default: none)")
    g.add_argument("--key", default=None, help="the client certificate's private key (default: none)")
    g.add_argument("--token", default=None, help="bearer token sent as 'authorization: Bearer TOKEN' (default: none)")
    return p


def build_parser() -> argparse.ArgumentParser:
    from dynaroute import __version__

    parser = argparse.ArgumentParser(prog="dynaroute", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                        help="print the installed package's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = [_common()]

    def command(name: str, help: str, *, parents: tuple[argparse.ArgumentParser, ...] = ()) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[*parents, *common],
                              formatter_class=HelpFormatter)

    p = command("train", "train a supernet and its router on a data file or a recipe, write a bundle")
    p.add_argument("task", nargs="?", choices=["digits", "sst2"], default=None,
                   help="a named recipe; omit it to train on --data FILE")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--run-dir", default=None,
                   help="the run's checkpoints, for resuming (default: <out>.run beside the bundle)")
    p.add_argument("--name", default=None, help="model name (default: the task, or the data file's name)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the training")
    p.add_argument("--epochs", type=float, default=None,
                   help="training epochs; text takes fractions (default: tabular 80, text 1)")
    d = p.add_argument_group("data files (dynaroute train --data FILE)")
    d.add_argument("--data", default=None,
                   help="training data: .csv, .tsv, .jsonl or .npz (arrays X, y); sst2: the folder with train.tsv and "
                   "dev.tsv (default: none; required but for digits)")
    d.add_argument("--validation", default=None, help="validation file (default: split off --data)")
    d.add_argument("--test", default=None, help="test file (default: split off --data)")
    d.add_argument("--label-column", default=None, help="the label column (default: label; y in .npz)")
    d.add_argument("--text-column", default=None,
                   help="the text column: text classification with DynaBERT (default: none, tabular)")
    d.add_argument("--feature-columns", default=None,
                   help="comma-separated numeric feature columns (tabular; default: every column but the label)")
    d.add_argument("--val-fraction", type=float, default=None,
                   help="share of each class split off for validation without --validation (default 0.2)")
    d.add_argument("--test-fraction", type=float, default=None,
                   help="share of each class split off for test without --test (default 0.2)")
    m = p.add_argument_group("tabular model (the slimmable MLP; digits too)")
    m.add_argument("--family", default=None,
                   help="train another supernet family on tabular data: a built-in name, an import path "
                   "`package.module:Class` or a `dynaroute.families` entry point, sized from the data with its "
                   "config's defaults (default: the slimmable MLP)")
    m.add_argument("--paths", type=int, default=None, help="number of path branches (default 1)")
    m.add_argument("--hidden", type=int, default=None, help="hidden neurons at full width (default 256)")
    m.add_argument("--blocks", type=int, default=None, help="blocks, each with an exit: the depths (default 3)")
    m.add_argument("--widths", default=None, help="comma-separated width fractions, 1 among them (default "
                   "0.25,0.5,0.75,1)")
    t = p.add_argument_group("text model (DynaBERT; --text-column and sst2)")
    t.add_argument("--max-length", type=int, default=None, help="maximum tokens per text (default 64)")
    t.add_argument("--max-examples", type=int, default=None,
                   help="use at most this many training examples (default: all)")
    t.add_argument("--base-model", default=None,
                   help="local BERT folder with config.json, *.safetensors, tokenizer.json (default: all-MiniLM-L6-v2)")
    t.add_argument("--steps", type=int, default=None,
                   help="cap the steps of each stage, for tiny runs (default: no cap)")
    t.add_argument("--teacher-epochs", type=float, default=None, help="epochs of the teacher stage (default: --epochs)")
    t.add_argument("--teacher-steps", type=int, default=None, help="cap the teacher stage's steps (default: no cap)")
    t.add_argument("--width-steps", type=int, default=None,
                   help="cap the width-adaptive stage's steps (default: no cap)")
    t.add_argument("--depth-steps", type=int, default=None,
                   help="cap the width-and-depth stage's steps (default: no cap)")
    t.add_argument("--router-examples", type=int, default=None,
                   help="training rows held out for the router (default: 4000, at most a fifth)")
    t.add_argument("--batch-size", type=int, default=None, help="training batch size (default: 32)")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    t.add_argument("--val-examples", type=int, default=None,
                   help="sst2: rows of train.tsv held out for validation (default: 2000)")
    t.add_argument("--test-examples", type=int, default=None,
                   help="sst2: use at most this many dev.tsv rows (default: all)")
    p.set_defaults(func=_train)

    p = command("eval", "evaluate a bundle: subnets, dynamic model, oracle")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", default=None, help="where to write pareto.png and report.json (default: the bundle)")
    p.add_argument("--data", default=None,
                   help="a labelled file (.csv, .tsv, .jsonl, .npz) in the bundle's input format to test on, or an "
                   "SST-2 bundle's folder (train.tsv and dev.tsv); default: the data the manifest records")
    p.add_argument("--label-column", default=None, help="--data's label column (default: the one trained on)")
    p.add_argument("--text-column", default=None, help="--data's text column (default: the one trained on)")
    p.add_argument("--feature-columns", default=None,
                   help="--data's comma-separated feature columns, in the bundle's order (default: its features)")
    p.set_defaults(func=_eval)

    p = command("export", "export a bundle's subnets for an expert backend (ONNX Runtime fp32, int8)")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--backend", required=True, choices=["onnx", "int8"],
                   help="onnx: ONNX Runtime fp32; int8: ONNX Runtime with dynamically quantised int8 weights")
    p.add_argument("--subnets", nargs="+", default=None, help="export only these subnets (default: all)")
    p.add_argument("--data", default=None,
                   help="the evaluation data (folder or labelled file), as for `eval`: int8 re-measures every "
                   "subnet's accuracy on it (default: the data the bundle's manifest records)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx.export's exporter (default: %(default)s, ~10x faster to export here)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads of torch and ONNX Runtime while measuring latency (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed runs per subnet, batch size and backend (default: %(default)s)")
    p.set_defaults(func=_export)

    p = command("serve", "serve a bundle, or a folder of bundles, over gRPC on Ray")
    p.add_argument("bundle", help="a bundle directory, or a model repository: a folder whose sub-folders are bundles")
    p.add_argument("--host", default="127.0.0.1", help="address the gRPC port binds")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: a free one, printed when ready)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve KServe v2 over HTTP/REST on --host at this port (0: any free port, printed on "
                   "the ready line; default: off)")
    p.add_argument("--metrics-port", type=int, default=9464, help="Prometheus /metrics port (0: a free one)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics port binds")
    p.add_argument("--ray-address", default=None,
                   help="join the Ray cluster at HOST:PORT (default: start a local Ray of its own, on 127.0.0.1)")
    p.add_argument("--placement", default=None, help="JSON file mapping subnets to actors and resources "
                   "(default: every subnet on two replicas of one expert actor of 0.25 CPU each)")
    p.add_argument("--backend", choices=["torch", "onnx", "int8"], default=None,
                   help="expert backend (default: the one the bundle was exported for, else torch); a placement "
                        "actor's own `backend` wins")
    p.add_argument("--max-batch-size", type=int, default=32, help="most rows in one expert call")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a batch waits for more rows before it is sent, in milliseconds")
    p.add_argument("--max-queue-size", type=int, default=1024,
                   help="requests waiting per queue (router, each expert) before RESOURCE_EXHAUSTED; also "
                        "the most rows one request (a batch) may hold (default: %(default)s)")
    p.add_argument("--tls-cert", default=None, help="server certificate (PEM) for TLS (default: plaintext)")
    p.add_argument("--tls-key", default=None, help="the server certificate's private key (default: none)")
    p.add_argument("--tls-client-ca", default=None,
                   help="require client certificates signed by this CA, mutual TLS (default: not required)")
    p.add_argument("--auth-token-file", default=None,
                   help="require 'authorization: Bearer <token>' with the token in this file (default: no token)")
    p.add_argument("--max-message-bytes", type=int, default=4 * 1024 * 1024,
                   help="larger requests get INVALID_ARGUMENT")
    p.add_argument("--grace-s", type=float, default=10.0, help="SIGTERM: time for in-flight calls to finish")
    p.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--slo-ms", type=float, default=None,
                   help="latency objective: under load, budgets that allow it (a floor) are lowered to hold it "
                   "(default: only requests' own deadlines)")
    p.add_argument("--slo-lower-at", type=float, default=SloConfig.lower_at,
                   help="lower budgets while the queue delay is at least this share of the objective "
                   "(default: %(default)s)")
    p.add_argument("--slo-restore-at", type=float, default=SloConfig.restore_at,
                   help="restore them once it is at most this share (default: %(default)s) ...")
    p.add_argument("--slo-hold-s", type=float, default=SloConfig.hold_s,
                   help="... and nothing was lowered for this long (default: %(default)s)")
    p.add_argument("--ready-timeout-s", type=float, default=120.0,
                   help="how long to wait for a node that can hold the placement (on a joined cluster), then "
                   "for the expert actors to load")
    p.set_defaults(func=_serve)

    p = command("infer", "send one input, or a file of many, to a server and print label, route and cost",
                parents=(_connection(),))
    p.add_argument("--address", default="127.0.0.1:50051", help="the server's gRPC address")
    p.add_argument("--model", default=None, help="model name (default: the server's only model)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tensor", help=".npy or .json file holding one input")
    src.add_argument("--text", help="a sentence")
    src.add_argument("--text-file", help="a file holding one sentence")
    src.add_argument("--batch", metavar="FILE",
                     help="a .npy, .csv or .jsonl file of many inputs, one per row; prints one line per row, in "
                     "order (with --json, one JSON object per row)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="with --batch: rows per call (at most the server's --max-queue-size)")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--quality", type=float, help="0 (cheapest) to 1 (most accurate calibrated point) "
                   "(default: the server's default budget)")
    b.add_argument("--max-flops", type=float, help="most mean FLOPs per example, router included (default: none)")
    b.add_argument("--target-accuracy", type=float, help="least expected accuracy, 0 to 1 (default: none)")
    b.add_argument("--subnet", help="pin one subnet by name, no routing (default: routed)")
    p.add_argument("--policy", default=None,
                   help="a calibrated policy: threshold, cascade, topk, static or auto (default: the bundle's)")
    f = p.add_mutually_exclusive_group()
    f.add_argument("--min-quality", type=float, default=None,
                   help="the server may lower the budget to this quality under load (default: never lowered)")
    f.add_argument("--min-accuracy", type=float, default=None,
                   help="the server may lower the budget to this expected accuracy under load (default: never "
                   "lowered)")
    p.add_argument("--json", action="store_true", help="print the reply as JSON, 64-bit integers as numbers")
    p.set_defaults(func=_infer)

    p = command("models", "list a server's models: input spec, labels, subnets, calibrated budgets",
                parents=(_connection(),))
    p.add_argument("address", nargs="?", default="127.0.0.1:50051",
                   help="the server's gRPC address (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the models as JSON (ListModels) instead of tables")
    p.set_defaults(func=_models)

    p = command("demo", "train (if absent), serve on local Ray, send the test split, report")
    p.add_argument("--bundle", default="artifacts/digits", help="bundle directory, trained there if absent")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from dynaroute import logs

    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    if args.log_format == "json":
        logs.capture_stderr()
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
    except BrokenPipeError:
        # The reader went away (`dynaroute infer | head`): stop quietly, as a Unix tool does on
        # SIGPIPE, and point stdout at /dev/null so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the status a shell reports for a tool that SIGPIPE ended
    return code


if __name__ == "__main__":
    sys.exit(main())
