"""``python -m extract`` — the same as the ``extract`` console command."""

from extract.cli import main

main()
