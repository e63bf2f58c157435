"""`python -m modiff_trt` runs the same Typer app as the `modiff-trt` console script."""

from modiff_trt.cli import main

main()
