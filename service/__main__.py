"""`python -m service` runs the operator CLI."""

from service.cli import main

main()
