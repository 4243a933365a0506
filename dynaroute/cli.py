"""The `dynaroute` command line. Each subcommand's work lives in the module named for it."""

from __future__ import annotations

import argparse
import os
import sys

# `train` options that only one task reads: given to the other, they would be ignored silently.
SST2_ONLY = ("data", "max_length", "max_examples", "base_model", "steps", "teacher_epochs", "teacher_steps",
             "width_steps", "depth_steps", "val_examples", "router_examples", "test_examples", "batch_size", "threads")
DIGITS_ONLY = ("paths",)


def _train(args: argparse.Namespace) -> int:
    others_only = SST2_ONLY if args.task == "digits" else DIGITS_ONLY
    ignored = [name for name in others_only if getattr(args, name) is not None]
    if ignored:
        flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
        other = "sst2" if args.task == "digits" else "digits"
        from dynaroute import logs

        logs.error_line(__name__, f"dynaroute train {args.task}: {flags} only apply to `train {other}`")
        return 2
    if args.task == "digits":
        from dynaroute.experts.mlp import MLPConfig
        from dynaroute.train.digits import train_digits
        from dynaroute.train.supernet import SupernetTrainConfig

        bundle = train_digits(
            args.out,
            MLPConfig(num_paths=1 if args.paths is None else args.paths),
            SupernetTrainConfig(epochs=args.epochs or SupernetTrainConfig.epochs, seed=args.seed),
            name=args.name or "digits",
        )
        print(f"wrote bundle {bundle.name!r} to {args.out} in {bundle.manifest['train_seconds']} s")
        return 0
    from dynaroute.train.text import SST2TrainConfig, main_sst2

    if args.max_length is None:
        args.max_length = SST2TrainConfig.max_length
    return main_sst2(args)


def _eval(args: argparse.Namespace) -> int:
    from dynaroute.train.report import main_eval

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

    p = command("train", "train a supernet and its router, write a bundle")
    p.add_argument("task", choices=["digits", "sst2"], help="digits (sklearn's, built in) or sst2 (GLUE's, --data)")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--name", default=None, help="model name (default: the task)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, initialisation and sampling")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: digits 80, sst2 1)")
    p.add_argument("--paths", type=int, default=None, help="digits: number of path branches (default: 1)")
    p.add_argument("--data", default=None, help="sst2: folder with GLUE's train.tsv and dev.tsv (default: none, "
                   "required for sst2)")
    p.add_argument("--max-length", type=int, default=None, help="sst2: maximum tokens per sentence (default: 64)")
    p.add_argument("--max-examples", type=int, default=None,
                   help="sst2: use at most this many training examples (default: all)")
    p.add_argument("--base-model", default=None, help="sst2: local BERT folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--steps", type=int, default=None, help="sst2: cap the steps of each stage, for tiny runs "
                   "(default: no cap)")
    p.add_argument("--teacher-epochs", type=float, default=None,
                   help="sst2: epochs of the teacher stage (default: --epochs)")
    p.add_argument("--teacher-steps", type=int, default=None,
                   help="sst2: cap the teacher stage's steps (default: no cap)")
    p.add_argument("--width-steps", type=int, default=None,
                   help="sst2: cap the width-adaptive stage's steps (default: no cap)")
    p.add_argument("--depth-steps", type=int, default=None,
                   help="sst2: cap the width-and-depth stage's steps (default: no cap)")
    p.add_argument("--val-examples", type=int, default=None,
                   help="sst2: rows of train.tsv held out for validation and calibration (default: 2000)")
    p.add_argument("--router-examples", type=int, default=None,
                   help="sst2: rows of train.tsv held out to train the router (default: 4000)")
    p.add_argument("--test-examples", type=int, default=None,
                   help="sst2: use at most this many dev.tsv rows (default: all)")
    p.add_argument("--batch-size", type=int, default=None, help="sst2: training batch size (default: 32)")
    p.add_argument("--threads", type=int, default=None, help="sst2: torch threads (default: torch's)")
    p.set_defaults(func=_train)

    p = command("eval", "evaluate a bundle: subnets, dynamic model, oracle")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", default=None, help="where to write pareto.png and report.json (default: the bundle)")
    p.add_argument("--data", default=None,
                   help="the evaluation data's folder (e.g. SST-2's, with train.tsv and dev.tsv); default: the path "
                   "the bundle's manifest records")
    p.set_defaults(func=_eval)

    p = command("export", "export a bundle's subnets for an expert backend (ONNX Runtime fp32, int8)")
    p.add_argument("bundle", help="bundle directory")
    p.add_argument("--backend", required=True, choices=["onnx", "int8"])
    p.add_argument("--subnets", nargs="+", default=None, help="export only these subnets (default: all)")
    p.add_argument("--data", default=None,
                   help="the evaluation data's folder, as for `eval` (int8 re-measures every subnet's accuracy on it)")
    p.add_argument("--exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx.export's exporter (default: %(default)s, ~10x faster to export here)")
    p.add_argument("--threads", type=int, default=1, help="threads of torch and ONNX Runtime while measuring latency")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per subnet, batch size and backend")
    p.set_defaults(func=_export)

    p = command("serve", "serve a bundle over gRPC on Ray")
    p.add_argument("bundle", help="bundle directory")
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
                   "(default: the subnets dealt by cost onto two actors of 0.25 CPU)")
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
