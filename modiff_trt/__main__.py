"""`python -m modiff_trt` starts the same entry point as the `modiff-trt` console script."""

from modiff_trt.entry import main

main()
