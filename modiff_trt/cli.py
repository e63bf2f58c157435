"""The `modiff-trt` command line: a thin Typer layer over the library.

Each command parses options, calls one library function and renders its result with rich.
Library errors (`ModiffError`) become one red line naming the file and the fix, exit code 2.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from modiff_trt import __version__
from modiff_trt.errors import ModiffError

app = typer.Typer(
    name="modiff-trt",
    help="Deploy MoDiff-quantized diffusion UNets with TensorRT and ONNX Runtime.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., object])


def _version(value: bool) -> None:
    if value:
        typer.echo(f"modiff-trt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False, show_time=False)],
        force=True,
    )


def user_errors(func: F) -> F:
    """Turn a ModiffError into a one-line message and exit code 2 (no traceback)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ModiffError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def main() -> None:
    """Console-script entry point."""
    app()
