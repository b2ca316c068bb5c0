from cellmap_data.cli import main

raise SystemExit(main())
