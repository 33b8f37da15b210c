from __future__ import annotations

from h3d.cli import main

raise SystemExit(main())
