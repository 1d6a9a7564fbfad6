"""`python -m saexport` (and `torchrun -m saexport`): the same command line as the `saexport` script."""

from saexport.cli import main

main(prog_name="saexport")
