"""The typer application, shared options and error handling."""
from __future__ import annotations

import logging
import os

import typer
from rich.console import Console
from rich.text import Text

from ..errors import CaplocError
from ..progress import set_quiet

# rich_markup_mode=None: help texts are shown as written ("[[layer, index], ...]" is not rich markup)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
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
        rc = app(args=argv, prog_name="caploc", standalone_mode=False)
        if rc == 130:  # typer returns Ctrl-C as exit code 130 when not in standalone mode
            return _interrupted()
        if isinstance(rc, int) and not isinstance(rc, bool):
            return rc
    except CaplocError as e:
        print_error(str(e))
        return 2
    except SystemExit as e:  # typer/click exit
        return int(e.code or 0)
    except KeyboardInterrupt:
        return _interrupted()
    except typer.Exit as e:  # typer turns Ctrl-C into Exit(130)
        code = int(getattr(e, "exit_code", 0) or 0)
        return _interrupted() if code == 130 else code
    except RecursionError as e:  # a crafted file: JSON nested deeper than Python's parser goes
        print_error(f"an input file is nested too deeply to read ({_first_line(e)}): check the files passed to this "
                    "command")
        return 2
    except (UnicodeDecodeError, MemoryError) as e:  # a user file caploc could not read
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


def _interrupted() -> int:
    err_console.print(Text("interrupted: finished work (score shards, finished stages) is kept and the same command "
                           "resumes; no result directory was half-written"))
    return 130


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
            if "-" in part.strip()[1:]:
                a, b = part.strip().split("-")
                a, b = int(a), int(b)
                if b < a:
                    raise CaplocError(f"--layers range {part.strip()!r} is reversed; write it low-high, e.g. '{b}-{a}'")
                out += list(range(a, b + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise CaplocError(f"cannot parse --layers {text!r}; use e.g. '10-29' or '0,3,5'") from None
    if any(x < 0 for x in out):
        raise CaplocError(f"--layers {text!r} has a negative layer; layers count from 0")
    if len(set(out)) != len(out):
        raise CaplocError(f"--layers {text!r} names a layer twice")
    return out


def load_model_from_opts(model: str, dtype: str, device: str, device_map: str | None, layout: str | None):
    from ..models.loading import load_model

    with console.status(f"loading {model} ...", spinner="dots"):
        return load_model(model, dtype=dtype, device=device, device_map=device_map, layout=layout)


def print_table(t) -> None:
    """Print a rich table with every column wrapping instead of cutting text ("…sentiment.csv:heldo…")."""
    for c in t.columns:
        c.overflow = "fold"
    console.print(t)


def print_cards(cards) -> None:
    """The top neurons: (layer, index), frequency, mean score and the context where each fires most."""
    from rich.table import Table
    from rich.text import Text

    t = Table("neuron", "freq", "mean score", box=None, pad_edge=False)
    t.add_column(Text("fires most at (token in [brackets])"))
    for c in cards:
        ctx = Text()
        if c.contexts:
            top = c.contexts[0]
            for i, tok in enumerate(top.tokens):
                tok = tok.replace("\n", "⏎")
                ctx.append(f"[{tok}]" if i == top.mark else tok, style="bold" if i == top.mark else None)
            ctx.append(f"  ({top.activation:.3g}, sample {top.sample_id})", style="dim")
        freq = "" if c.frequency is None else f"{c.frequency:.2f}"
        score = "" if c.mean_score is None else f"{c.mean_score:.3g}"
        t.add_row(f"L{c.layer}:{c.index}", freq, score, ctx)
    print_table(t)


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
