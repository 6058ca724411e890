"""``regraft`` — load a TensorFlow/Keras checkpoint into a model whose architecture changed.

Commands print data on stdout (``--json`` for programs) and diagnostics on
stderr. A user error prints ``Error:``/``Hint:`` and exits 2, never a traceback
(set ``REGRAFT_DEBUG=1`` to see one).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import NoReturn

from regraft.cli import commands
from regraft.cli.output import fail
from regraft.errors import LoadError, RegraftError

__all__ = ["main", "build_parser"]

_PYTHON_SHOWWARNING = warnings.showwarning

_EPILOG = """examples:
  regraft inspect ckpts/run7
  regraft diff ckpts/run7 --model models.py:build_new
  regraft plan ckpts/run7 --model models.py:build_new --rules rules.yaml -o plan.yaml
  regraft apply plan.yaml --model models.py:build_new --out new.weights.h5
  regraft load ckpts/run7 --model models.py:build_wide --reshape preserve --out wide.weights.h5
  regraft verify ckpts/run7 --old-model models.py:build_old wide.weights.h5 --model models.py:build_wide
  regraft load ckpts/run7 --model models.py:build_new --out new.weights.h5 --rename map.yaml
  regraft convert old.weights.h5 --like new_init.weights.h5 --out new.weights.h5
  regraft demo
"""


def _add_match_options(p: argparse.ArgumentParser, model: bool = True) -> None:
    p.add_argument("checkpoint", help="TF checkpoint prefix, its folder, SavedModel folder, or a Keras .weights.h5, "
                   ".weights.json, .keras, .h5, .safetensors or .npz file")
    if model:
        p.add_argument("--model", required=True, metavar="SPEC",
                       help="FILE.py:CALLABLE or package.module:CALLABLE returning the built new model")
    p.add_argument("--rename", metavar="YAML",
                   help="YAML mapping of old checkpoint keys (or 'scope/' prefixes) to new model keys")
    p.add_argument("--rules", metavar="YAML",
                   help="YAML rules: rename (old key/prefix/regex -> new key), init (model globs left fresh), "
                   "ignore (checkpoint globs dropped)")
    p.add_argument("--root", help="the saved object that holds the model (default: chosen automatically)")
    p.add_argument("--allow-missing", action="append", nargs="?", const="*", default=[], metavar="PATTERN",
                   help="model variables (glob) that may stay fresh; alone: all of them. Repeatable")
    p.add_argument("--allow-unused", action="append", nargs="?", const="*", default=[], metavar="PATTERN",
                   help="checkpoint tensors (glob) that may go unused; alone: all of them. Repeatable")
    p.add_argument("--reshape", choices=("error", "fresh", "overlay", "preserve"), default="error",
                   help="tensors matched with another shape: a strict problem (error, the default), left fresh, "
                   "overlaid on the fresh values, or grown function-preservingly (preserve)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="with --reshape preserve: relative noise on widened copies to break symmetry (default 0)")
    p.add_argument("--accept-order", action="store_true",
                   help="load pairings that only order supports (alike layers with no names to tell them apart); "
                   "by default they are 'unconfirmed': proposed, left fresh, and a strict problem")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_outside_state_option(p)


def _add_outside_state_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-outside-state", action="store_true",
                   help="follow a folder's 'checkpoint' state file that names a checkpoint outside the folder "
                   "(refused by default)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from regraft import __version__

    parser = _Parser(
        prog="regraft", description=__doc__.split("\n\n")[0].split("— ", 1)[1],
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"regraft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser(allow_abbrev=False, name="inspect", help="list a checkpoint's tensors (metadata only, no tensor data read)",
                       description="List every tensor of a checkpoint: key, shape, dtype, kind. Reads no tensor data.")
    p.add_argument("checkpoint", help="TF checkpoint prefix, its folder, or a Keras .weights.h5 / .h5 file")
    p.add_argument("--all", action="store_true", help="also list optimizer slots and bookkeeping one by one")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_outside_state_option(p)
    p.set_defaults(run=commands.inspect)

    p = sub.add_parser(allow_abbrev=False, name="diff", help="show what a load would do; loads nothing",
                       description="Match the checkpoint against the new model and print the plan grouped by "
                       "outcome (keys collapsed, inserted and removed layers named): what each variable would "
                       "get, what stays fresh, what goes unused. Nothing is loaded or written.")
    _add_match_options(p)
    p.add_argument("--table", action="store_true", help="also print one line per variable")
    p.add_argument("--optimizer", action="store_true",
                   help="also show what each slot of the optimizer the --model function compiled the model with "
                   "would get")
    p.set_defaults(run=commands.diff)

    p = sub.add_parser(allow_abbrev=False, name="plan", help="write the load plan as a YAML file a person can review and edit",
                       description="Match the checkpoint against the new model and write the plan: for every "
                       "variable its source (or none), transform, deciding stage, reason and confidence, plus "
                       "fingerprints of the checkpoint and model. Edit a 'source' and run `regraft apply`.")
    _add_match_options(p)
    p.add_argument("-o", "--output", required=True, metavar="PLAN.yaml", help="where to write the plan")
    p.add_argument("--optimizer", action="store_true",
                   help="also plan the state of the optimizer the --model function compiled the model with "
                   "(the plan's 'optimizer' section; `regraft apply --optimizer` loads it)")
    p.set_defaults(run=commands.plan)

    p = sub.add_parser(allow_abbrev=False, name="apply", help="apply a (possibly edited) plan file and save the new model's weights",
                       description="Apply a plan file exactly as written: each variable takes the source the "
                       "file names, or stays fresh. A plan made for another checkpoint or model is refused.")
    p.add_argument("plan_file", metavar="PLAN.yaml", help="a plan written by `regraft plan`")
    p.add_argument("--model", required=True, metavar="SPEC",
                   help="FILE.py:CALLABLE or package.module:CALLABLE returning the built new model")
    p.add_argument("--out", required=True, help="where to write the loaded model's weights")
    p.add_argument("--freeze", action="store_true", help="mark layers loaded unchanged as non-trainable")
    p.add_argument("--optimizer", action="store_true",
                   help="also load the plan's optimizer section into the optimizer the --model function compiled "
                   "the model with, and write both to --out, which must be a TF checkpoint prefix")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=commands.apply)

    p = sub.add_parser(allow_abbrev=False, name="load", help="load a checkpoint into the new model and save the new model's weights",
                       description="Load the checkpoint into the model built by --model (strict unless told "
                       "otherwise) and write the model to --out, in the format its extension names: .weights.h5 "
                       "(Keras weights), .keras (Keras' model.save: config and weights), .safetensors (every "
                       "variable under its readable key), or, with no extension, a TF checkpoint prefix. Written "
                       "to a temporary name, then renamed into place.")
    _add_match_options(p)
    p.add_argument("--out", required=True,
                   help="where to write the loaded model: .weights.h5, .keras, .safetensors, or a TF checkpoint prefix")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="load what matches and report the rest instead of refusing")
    p.add_argument("--freeze", action="store_true",
                   help="mark layers loaded unchanged as non-trainable (saved with the weights only if the format keeps it)")
    p.add_argument("--optimizer", action="store_true",
                   help="also load the optimizer state into the optimizer the --model function compiled the model "
                   "with (slots follow their variables, the step count is carried) and write both to --out, "
                   "which must be a TF checkpoint prefix (tf.train.Checkpoint(model=..., optimizer=...))")
    p.set_defaults(run=commands.load)

    p = sub.add_parser(allow_abbrev=False, name="convert",
                       help="convert a checkpoint into the layout of the new model's weights file, with no model code",
                       description="Match the checkpoint against the new model's structure as a weights file of it "
                       "(--like) records it (keys, shapes, dtypes, layer names), with the same rules and refusals "
                       "as `load`, and write --out: .weights.h5 (from a .weights.h5 or .keras --like), .keras (from "
                       "a .keras --like: its config is copied), .safetensors (from any --like), or a TF checkpoint "
                       "prefix (from a TF checkpoint --like; needs TensorFlow). Variables nothing is loaded into "
                       "keep their --like values. Both files must use the same kind of keys (Keras weights with "
                       "Keras weights, TF checkpoints with TF checkpoints), unless --like is a .keras archive of "
                       "built-in layers: Keras then rebuilds the model from its config and any --out is written.")
    _add_match_options(p, model=False)
    p.add_argument("--like", required=True, metavar="NEW_WEIGHTS",
                   help="a weights file of the new model (.weights.h5, .keras, .weights.json, TF checkpoint, "
                   ".safetensors, .npz): the layout to convert into")
    p.add_argument("--out", required=True,
                   help="where to write: .weights.h5, .keras, .safetensors, or a TF checkpoint prefix")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="convert what matches and report the rest instead of refusing")
    p.set_defaults(run=commands.convert)

    p = sub.add_parser(allow_abbrev=False, name="verify", help="check that the new model computes what the old one did",
                       description="Load the old checkpoint into the old model and the new weights (e.g. written by "
                       "`regraft load --reshape preserve --out`) into the new model, run both on the same probe "
                       "inputs (random of the right shape unless --inputs is given) and report the largest absolute "
                       "and relative output difference. Exit 0 within --tolerance, 1 above it, 2 on a user error.")
    p.add_argument("old_checkpoint", help="checkpoint of the old model")
    p.add_argument("--old-model", required=True, metavar="SPEC", help="FILE.py:CALLABLE building the old model")
    p.add_argument("new_weights", help="weights of the new model (.weights.h5 or TF checkpoint prefix)")
    p.add_argument("--model", required=True, metavar="SPEC", help="FILE.py:CALLABLE building the new model")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest absolute difference accepted (default 1e-5)")
    p.add_argument("--samples", type=int, default=8, help="number of random probe inputs (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the probe inputs (default 0)")
    p.add_argument("--inputs", metavar="NPY", help="probe inputs: a .npy array, or an .npz of several inputs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=_verify_command)

    p = sub.add_parser(allow_abbrev=False, name="demo", help="run the built-in examples: four model changes",
                       description="Build four model changes (inserted layer, more filters, renamed layer, a layer "
                       "inserted in a functional model), save each original model, load it into the modified one and print what regraft did.")
    p.set_defaults(run=commands.demo)
    return parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors suggest the closest command or flag."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}{self._suggestion(message)}\n")

    def _suggestion(self, message: str) -> str:
        import difflib
        import re

        choice = re.search(r"invalid choice: '([^']*)'", message)
        if choice:
            commands = [c for a in self._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices]
            close = difflib.get_close_matches(choice.group(1), commands, n=1)
            return f" (did you mean '{close[0]}'?)" if close else ""
        flags = re.findall(r"(--?[\w-]+)", message.split(":", 1)[-1]) if "unrecognized" in message else []
        known = [o for a in self._actions for o in a.option_strings]
        for flag in flags:
            close = difflib.get_close_matches(flag.split("=")[0], known, n=1)
            if close:
                return f" (did you mean '{close[0]}'?)"
        return ""


def _verify_command(args: argparse.Namespace) -> int:
    # Imported when run: numpy and the verifier are not needed by `regraft inspect` and the others.
    from regraft.cli.verify import verify_command

    return verify_command(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``regraft`` console script; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # report it with the subcommand's own usage, not the top-level one
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command != "inspect":  # every other command builds Keras models
        _quiet_tensorflow()
    shown, warnings.showwarning = warnings.showwarning, _show_warning  # "Warning: …" lines, restored after
    try:
        return args.run(args) or 0
    except LoadError as exc:
        if getattr(exc, "problems", None):  # a strict refusal: say the fix in flags, not keyword arguments
            exc.hint = _CLI_STRICT_HINT
        return fail(exc)
    except RegraftError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        print("Interrupted; nothing was written.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`regraft inspect X | head`): stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    finally:
        warnings.showwarning = shown


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """regraft's own warnings as one ``Warning:`` line on stderr; others as Python shows them."""
    text = str(message)
    if text.startswith("regraft: "):
        print(f"Warning: {text.removeprefix('regraft: ')}", file=sys.stderr)
    else:
        _PYTHON_SHOWWARNING(message, category, filename, lineno, file, line)


def _quiet_tensorflow() -> None:
    """Import TensorFlow with its C++ start-up log lines (oneDNN, CUDA probing) kept off the terminal.

    TF 2.21 writes them through absl before TF_CPP_MIN_LOG_LEVEL takes effect, so the
    variable alone does not silence them; stderr is pointed at /dev/null for the import
    and the device probe only. Python errors still surface: they are raised after.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(devnull, 2)
    try:
        import tensorflow as tf

        tf.config.list_physical_devices()
    except ImportError:
        pass  # the command itself will say what is missing
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_CLI_STRICT_HINT = (
    "Map renamed keys with --rename, allow expected gaps with --allow-missing / --allow-unused, confirm "
    "placements by order with --accept-order, or pass --no-strict to load what matches and report the rest."
)


if __name__ == "__main__":
    sys.exit(main())
