from qaas.cli import main

raise SystemExit(main())
