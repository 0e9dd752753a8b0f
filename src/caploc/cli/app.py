"""The typer application, shared options and error handling."""
from __future__ import annotations

import logging
import os

import typer
from rich.console import Console
from rich.text import Text

from ..errors import CaplocError
from ..progress import set_quiet

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="caploc: find, test and fine-tune the MLP neurons that carry a capability.")
console = Console(soft_wrap=True)
err_console = Console(stderr=True)


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (they are also off when stderr is "
                                     "not a terminal).")):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    set_quiet(quiet)


def print_error(message: str) -> None:
    """One line on stderr; the message is shown verbatim (no rich markup: '[locate]' and '[layer, index]' survive)."""
    err_console.print(Text.assemble(("error: ", "bold red"), " ".join(str(message).split())), soft_wrap=True)


def run(argv: list[str]) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        app(args=argv, prog_name="caploc", standalone_mode=False)
    except CaplocError as e:
        print_error(str(e))
        return 2
    except SystemExit as e:  # typer/click exit
        return int(e.code or 0)
    except KeyboardInterrupt:
        err_console.print(Text("interrupted: finished work (score shards, finished stages) is kept and the same command "
                               "resumes; no result directory was half-written"))
        return 130
    except (UnicodeDecodeError, RecursionError, MemoryError) as e:  # a user file caploc could not read
        print_error(f"{type(e).__name__} while reading input ({_first_line(e)}): check the files passed to this "
                    "command (text files must be UTF-8)")
        return 2
    except OSError as e:
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print_error(f"cannot access{where}: {e.strerror or _first_line(e)}")
        return 2
    except Exception as e:  # click usage errors (typer bundles its own click as typer._click)
        kinds = _click_kinds()
        if isinstance(e, kinds["exit"]):
            return getattr(e, "exit_code", 0)
        if isinstance(e, kinds["usage"]):
            e.show()
            return getattr(e, "exit_code", 2)
        if isinstance(e, kinds["abort"]):
            return 1
        raise
    return 0


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


def _click_kinds() -> dict:
    """Exception classes of both the standalone click and typer's bundled copy."""
    exit_, usage, abort = [], [], []
    for modname in ("click.exceptions", "typer._click.exceptions"):
        try:
            mod = __import__(modname, fromlist=["x"])
        except ImportError:
            continue
        for name, bucket in (("Exit", exit_), ("ClickException", usage), ("Abort", abort)):
            if hasattr(mod, name):
                bucket.append(getattr(mod, name))
    return {"exit": tuple(exit_) or (SystemExit,), "usage": tuple(usage) or (SystemExit,), "abort": tuple(abort) or (SystemExit,)}


def parse_layers(text: str | None) -> list[int] | None:
    """'10-29' or '0,3,5' or None."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out += list(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise CaplocError(f"cannot parse --layers {text!r}; use e.g. '10-29' or '0,3,5'") from None
    return out


def load_model_from_opts(model: str, dtype: str, device: str, device_map: str | None, layout: str | None):
    from ..models.loading import load_model

    with console.status(f"loading {model} ...", spinner="dots"):
        return load_model(model, dtype=dtype, device=device, device_map=device_map, layout=layout)


def print_neuron_summary(ns, title: str) -> None:
    from rich.table import Table

    counts = ns.per_layer_counts()
    share_p = ns.share_of_params()
    console.print(f"[bold]{title}[/]: {len(ns)} neurons = {100 * ns.share_of_neurons():.4f}% of MLP neurons"
                  + (f" = {100 * share_p:.4f}% of parameters" if share_p is not None else ""))
    if len(ns):
        t = Table("layer", "neurons", "", box=None, pad_edge=False)
        mx = max(counts.max(), 1)
        for l, c in enumerate(counts):
            if c:
                t.add_row(str(l), str(int(c)), "█" * max(1, round(30 * c / mx)))
        console.print(t)
