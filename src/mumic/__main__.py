from mumic.cli import main

raise SystemExit(main())
