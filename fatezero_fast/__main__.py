"""`python -m fatezero_fast ...` is the `fatezero-fast` command."""
from .io.cli import main

raise SystemExit(main())
