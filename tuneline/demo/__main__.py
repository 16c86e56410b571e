"""`python -m tuneline.demo [--seed N] [--out DIR]`: write the demo data."""

from tuneline.demo.generator import main

raise SystemExit(main())
